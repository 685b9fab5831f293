//! Database logins (issue 23) against a real PostgreSQL: each test makes a
//! scratch database with a group role and two tables, starts a real
//! broker whose policy makes logins there, and checks with PostgreSQL's
//! own view (`pg_roles`, `pg_stat_activity`), with sessions of its own
//! (tokio-postgres) and with `psql` (libpq, which shares no code with the
//! broker). Skipped, saying so, without `PORTCULLIS_TEST_DATABASE_URL`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test: a failure here is a test failure"
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Harness, ask, count_leases, grant, park, scratch_database};
use portcullis::dev::As;
use portcullis::pb;
use tokio_postgres::NoTls;
use tonic::Code;

/// An identity a workload hands part of its access to (token exchange).
const TOOL: &str = "spiffe://portcullis.dev/tool/report";

/// A database for logins: its URL, an admin session, the group role.
struct Target {
    url: String,
    admin: tokio_postgres::Client,
    group: String,
}

async fn target(test: &str) -> Option<Target> {
    let url = scratch_database(test)?;
    let (admin, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    // Roles are the cluster's, not the database's: one group per test.
    let group = format!("g_{}", &portcullis::text::new_id("", 0).unwrap()[12..28]);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {group} NOLOGIN;
             CREATE TABLE orders (id int); INSERT INTO orders VALUES (1), (2);
             CREATE TABLE secrets (x text);
             GRANT SELECT ON orders TO {group};"
        ))
        .await
        .unwrap();
    Some(Target { url, admin, group })
}

/// A policy whose `db.orders.read` (auto) and `db.orders.admin`
/// (approval) make logins on `t`; `extra` goes into its `[[database]]`.
fn policy(t: &Target, password_file: &Path, extra: &str) -> String {
    format!(
        r#"[broker]
admins = ["admins"]
[groups]
approvers = ["spiffe://portcullis.dev/human/alice"]
admins = ["spiffe://portcullis.dev/human/root-oncall"]

[[database]]
name = "orders"
url = "{url}"
password_file = "{pw}"
{extra}

[[scope]]
name = "db.orders.read"
tier = "auto"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
max_ttl = "1h"
login = {{ database = "orders", member_of = "{group}" }}

[[scope]]
name = "db.orders.admin"
tier = "approval"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
approvers = ["approvers"]
max_ttl = "1h"
login = {{ database = "orders", member_of = "{group}" }}

[[delegation]]
from = ["spiffe://portcullis.dev/ns/demo/*"]
to = ["{TOOL}"]
scopes = ["db.orders.read"]
"#,
        url = t.url,
        pw = password_file.display(),
        group = t.group,
    )
}

/// A broker on `t` (the admin is `postgres`, trusted on loopback by
/// `.ci/postgres`; its password file is read all the same).
async fn broker(t: &Target, extra: &str) -> Harness {
    let pw = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::write(&pw, "unused-by-trust\n").unwrap();
    let pw = pw.keep().unwrap();
    Harness::start_with(Some(&policy(t, &pw, extra))).await
}

/// Sign in as `l`.
async fn sign_in(
    l: &pb::DatabaseLogin,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::Config::new()
        .host(&l.host)
        .port(u16::try_from(l.port).unwrap())
        .user(&l.user)
        .password(&l.password)
        .dbname(&l.dbname)
        .connect(NoTls)
        .await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((c, task))
}

/// `psql` (libpq) signed in as `l`, running `sql`: its output or error.
fn psql(l: &pb::DatabaseLogin, sql: &str) -> Result<String, String> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin/psql")))
                .filter(|p| p.exists())
                .max()
        })
        .unwrap_or_else(|| "psql".into());
    let out = std::process::Command::new(bin)
        .args(["-h", &l.host, "-p", &l.port.to_string(), "-U", &l.user])
        .args(["-d", &l.dbname, "-tAXc", sql])
        .env("PGPASSWORD", &l.password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Roles that are members of `t`'s group.
async fn members(t: &Target) -> Vec<String> {
    t.admin
        .query(
            "SELECT r.rolname::text FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid \
             JOIN pg_roles g ON g.oid = m.roleid WHERE g.rolname = $1 ORDER BY 1",
            &[&t.group],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `role`'s `VALID UNTIL`, in seconds since the epoch.
async fn valid_until(t: &Target, role: &str) -> f64 {
    t.admin
        .query_one(
            "SELECT extract(epoch FROM rolvaliduntil)::float8 FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

async fn role_exists(t: &Target, role: &str) -> bool {
    t.admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .is_some()
}

/// Wait (up to 15 s) until `role` is gone.
async fn gone(t: &Target, role: &str) {
    for _ in 0..150 {
        if !role_exists(t, role).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("role {role} is still there");
}

/// A target for `test`, a broker on it, and a workload's client.
async fn started(
    test: &str,
) -> Option<(
    Target,
    Harness,
    pb::broker_client::BrokerClient<tonic::transport::Channel>,
)> {
    let t = target(test).await?;
    let h = broker(&t, "").await;
    let c = h.broker(As::Workload).await;
    Some((t, h, c))
}

/// A `db.orders.read` login for 60 s.
async fn read_for_a_minute(
    c: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
) -> pb::Grant {
    let ask = pb::RequestTokenRequest {
        ttl: common::secs(60),
        ..ask(&["db.orders.read"])
    };
    grant(c, ask).await
}

fn login_of(g: &pb::Grant) -> &pb::DatabaseLogin {
    g.login
        .as_ref()
        .expect("a login scope's grant holds a login")
}

#[tokio::test]
async fn a_login_has_its_groups_rights_only_and_revoke_ends_its_open_sessions() {
    let Some((t, h, mut c)) = started("a_login_has_its_groups_rights_only").await else {
        return;
    };
    let g = read_for_a_minute(&mut c).await;
    let l = login_of(&g).clone();
    let lease = g.lease.clone().unwrap();
    assert_eq!(
        (lease.login_target.as_str(), lease.login_role.as_str()),
        ("orders", l.user.as_str())
    );
    assert_eq!(l.user, format!("pc_{}", lease.id));
    assert_eq!(
        l.sslmode, "prefer",
        "the test database is on loopback, without TLS"
    );
    assert_eq!(l.password.len(), 43, "256 random bits");

    // What PostgreSQL says it is: a login, nothing more, until the lease's end.
    let row = t
        .admin
        .query_one(
            "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolvaliduntil IS NOT NULL \
             FROM pg_roles WHERE rolname = $1",
            &[&l.user],
        )
        .await
        .unwrap();
    let flags: (bool, bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(flags, (true, false, false, false, true));
    assert_eq!(members(&t).await, vec![l.user.clone()]);

    // It works, with the group's rights and no more; libpq agrees.
    let (s, task) = sign_in(&l).await.unwrap();
    let n: i64 = s
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let denied = s.query("SELECT * FROM secrets", &[]).await.unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    assert_eq!(psql(&l, "SELECT count(*) FROM orders").unwrap(), "2");
    let wrong = pb::DatabaseLogin {
        password: "not-the-password".into(),
        ..l.clone()
    };
    assert!(sign_in(&wrong).await.is_err(), "the password is checked");

    // Renew moves the login's end with the lease's.
    let before = valid_until(&t, &l.user).await;
    let renewed = common::renewed(&mut c, &lease.id, Some(1800)).await;
    let after = valid_until(&t, &l.user).await;
    let expires = renewed.expires_at.unwrap().seconds as f64;
    assert!(after > before + 1000.0, "{before} -> {after}");
    assert!((after - expires).abs() < 1.0, "{after} vs {expires}");

    // Revoke: the open session is ended, a new one is refused, the role is gone.
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: lease.id.clone(),
        reason: "done".into(),
    })
    .await
    .unwrap();
    let after = s.simple_query("SELECT 1").await;
    assert!(after.is_err(), "the open session was terminated: {after:?}");
    let _ = task.await;
    assert!(sign_in(&l).await.is_err());
    assert!(psql(&l, "SELECT 1").is_err());
    gone(&t, &l.user).await;

    // Each step is in the trail; the password in no record.
    let records = common::export(&h).await;
    let mine: Vec<&pb::AuditRecord> = records.iter().filter(|r| r.target == lease.id).collect();
    for action in [
        "token.granted",
        "db.login.created",
        "lease.revoked",
        "db.login.disabled",
        "db.login.dropped",
    ] {
        assert!(
            mine.iter().any(|r| r.action == action),
            "no {action} in {mine:#?}"
        );
    }
    let disabled = mine
        .iter()
        .find(|r| r.action == "db.login.disabled")
        .unwrap();
    assert!(disabled.reason.contains("1 sessions ended"), "{disabled:?}");
    let everything = format!("{records:?}");
    assert!(
        !everything.contains(&l.password),
        "the password is in the trail"
    );
    h.stop().await;
}

#[tokio::test]
async fn expiry_ends_the_login_and_an_unused_orphan_is_dropped_by_the_reconciler() {
    let Some((t, mut h, mut c)) = started("expiry_ends_the_login").await else {
        return;
    };
    let g = read_for_a_minute(&mut c).await;
    let expiring = login_of(&g).user.clone();
    let live = login_of(&grant(&mut c, ask(&["db.orders.read"])).await)
        .user
        .clone();
    h.advance(Duration::from_secs(120)).await;
    gone(&t, &expiring).await;
    assert!(role_exists(&t, &live).await, "a live lease keeps its login");

    // A role made for a grant whose lease was never written (a crash
    // between the two): marked as this deployment's, for a lease that does
    // not exist, long ago. The reconciler at the next start drops it;
    // a look-alike without the mark is not touched.
    let kek = portcullis::keys::Kek::from_file(&h.dev.path("kek")).unwrap();
    let orphan = "pc_l_000000000001aabbccddeeff0011223344";
    let lookalike = "pc_l_000000000001ffffffffffffffffffffff";
    let mark = format!(
        "portcullis {} l_000000000001aabbccddeeff0011223344",
        kek.deployment_id().unwrap()
    );
    t.admin
        .batch_execute(&format!(
            "CREATE ROLE {orphan} LOGIN IN ROLE {g}; COMMENT ON ROLE {orphan} IS '{mark}';
             CREATE ROLE {lookalike} LOGIN IN ROLE {g}; COMMENT ON ROLE {lookalike} IS 'portcullis someone-else l_000000000001ffffffffffffffffffffff';",
            g = t.group
        ))
        .await
        .unwrap();
    h.restart().await;
    gone(&t, orphan).await;
    assert!(
        role_exists(&t, lookalike).await,
        "another deployment's role is not touched"
    );
    assert!(role_exists(&t, &live).await);
    let records = common::export(&h).await;
    assert!(
        records
            .iter()
            .any(|r| r.action == "db.login.dropped" && r.reason.contains(orphan))
    );
    t.admin
        .batch_execute(&format!("DROP ROLE {lookalike}"))
        .await
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_delegated_login_is_its_own_and_ends_with_its_parent_sessions_and_all() {
    let Some((t, h, mut c)) = started("a_delegated_login_is_its_own").await else {
        return;
    };
    let parent = read_for_a_minute(&mut c).await;
    let mine = login_of(&parent).clone();
    let parent_id = parent.lease.unwrap().id;
    let ask = pb::ExchangeTokenRequest {
        subject_token: parent.token.clone(),
        scopes: vec!["db.orders.read".into()],
        for_identity: TOOL.into(),
        ..Default::default()
    };
    let out = c.exchange_token(ask).await.unwrap().into_inner().outcome;
    let Some(pb::request_token_response::Outcome::Granted(child)) = out else {
        panic!("not granted: {out:?}");
    };
    let theirs = login_of(&child).clone();
    let child_lease = child.lease.clone().unwrap();
    assert_eq!(child_lease.parent_id, parent_id);
    assert_ne!(theirs.user, mine.user, "the child has a login of its own");
    assert_ne!(theirs.password, mine.password);
    assert_eq!(theirs.user, format!("pc_{}", child_lease.id));

    // Both work; each has a session open when the parent is revoked.
    let (s_mine, t_mine) = sign_in(&mine).await.unwrap();
    let (s_theirs, t_theirs) = sign_in(&theirs).await.unwrap();
    assert_eq!(psql(&theirs, "SELECT count(*) FROM orders").unwrap(), "2");
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: parent_id.clone(),
        reason: "task over".into(),
    })
    .await
    .unwrap();
    // The revocation answers once both logins are ended.
    assert!(!role_exists(&t, &mine.user).await);
    assert!(!role_exists(&t, &theirs.user).await);
    for s in [&s_mine, &s_theirs] {
        let after = s.simple_query("SELECT 1").await;
        assert!(after.is_err(), "an open session survived: {after:?}");
    }
    let _ = (t_mine.await, t_theirs.await);
    assert!(psql(&theirs, "SELECT 1").is_err());

    // The child's login was made, disabled and dropped on the record.
    let records = common::export(&h).await;
    for action in ["db.login.created", "db.login.disabled", "db.login.dropped"] {
        assert!(
            records
                .iter()
                .any(|r| r.target == child_lease.id && r.action == action),
            "no {action} for the child"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn an_approved_login_is_made_once_when_claimed_concurrently() {
    let Some((t, h, mut c)) = started("an_approved_login_is_made_once").await else {
        return;
    };
    let req = park(&mut c, &["db.orders.admin"]).await;
    assert!(
        members(&t).await.is_empty(),
        "nothing exists before approval"
    );
    pb::approvals_client::ApprovalsClient::new(h.channel(As::Approver).await)
        .approve(pb::ApproveRequest {
            request_id: req.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(members(&t).await.is_empty(), "nor after it, until claimed");
    let claims = (0..6).map(|_| {
        let (mut c, id) = (c.clone(), req.id.clone());
        tokio::spawn(async move {
            c.get_request(pb::GetRequestRequest { request_id: id })
                .await
                .unwrap()
                .into_inner()
                .grant
        })
    });
    let mut grants = Vec::new();
    for claim in claims {
        grants.extend(claim.await.unwrap());
    }
    assert_eq!(grants.len(), 1, "exactly one claim gets the token");
    let l = login_of(&grants[0]).clone();
    assert_eq!(psql(&l, "SELECT count(*) FROM orders").unwrap(), "2");
    // The losers' logins, if any were made, are ended.
    for _ in 0..150 {
        if members(&t).await == vec![l.user.clone()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(members(&t).await, vec![l.user.clone()]);
    h.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_fails_the_grant_and_a_capped_identity_is_refused() {
    let Some(t) = target("an_unreachable_database_fails_the_grant").await else {
        return;
    };
    // Nothing listens on port 1.
    let down = Target {
        url: t.url.replace(":54329/", ":1/"),
        admin: t.admin,
        group: t.group.clone(),
    };
    let h = broker(&down, "").await;
    let mut c = h.broker(As::Workload).await;
    let e = c.request_token(ask(&["db.orders.read"])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("database `orders` is unavailable"),
        "{e:?}"
    );
    assert_eq!(count_leases(&mut c).await, 0, "no lease without its login");
    h.stop().await;

    let Some(t) = target("a_capped_identity_is_refused").await else {
        return;
    };
    let h = broker(&t, "max_logins_per_identity = 1").await;
    let mut c = h.broker(As::Workload).await;
    grant(&mut c, ask(&["db.orders.read"])).await;
    let e = c.request_token(ask(&["db.orders.read"])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_logins_per_identity"), "{e:?}");
    assert_eq!(members(&t).await.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn the_password_is_in_no_log_line_even_at_debug() {
    let Some(t) = target("the_password_is_in_no_log_line").await else {
        return;
    };
    let mut h = broker(&t, "").await;
    h.halt().await;
    let (mut child, addr, logs) = common::spawn_broker_with(&h, None, &[("RUST_LOG", "debug")]);
    let opts = portcullis::client::ClientOpts {
        server: Some(addr),
        cert: None,
        key: None,
        ca: None,
        dev_dir: Some(h.dev.root.clone()),
        federation_server: None,
        as_: As::Workload,
    };
    let mut c = pb::broker_client::BrokerClient::new(opts.connect().await.unwrap());
    let g = grant(&mut c, ask(&["db.orders.read"])).await;
    let l = login_of(&g).clone();
    let lease_id = g.lease.unwrap().id;
    let logged = lease_id.clone();
    assert_eq!(psql(&l, "SELECT 1").unwrap(), "1");
    c.renew_lease(pb::RenewLeaseRequest {
        lease_id: lease_id.clone(),
        ttl: None,
    })
    .await
    .unwrap();
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id,
        reason: String::new(),
    })
    .await
    .unwrap();
    gone(&t, &l.user).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let lines: Vec<String> = logs.try_iter().collect();
    assert!(
        lines.iter().any(|x| x.contains(&logged)),
        "the log names the lease: {lines:#?}"
    );
    for line in &lines {
        assert!(
            !line.contains(&l.password),
            "the password is in the log: {line}"
        );
        assert!(
            !line.contains("SCRAM-SHA-256$"),
            "a verifier is in the log: {line}"
        );
    }
}

/// The `KEY='value'` lines of the agent's env file at `path`, once it has
/// a `PGUSER` other than `not` (up to 20 s).
async fn env_file_other_than(path: &Path, not: &str) -> std::collections::HashMap<String, String> {
    for _ in 0..200 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let vars: std::collections::HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect();
        if vars.get("PGUSER").is_some_and(|u| u != not) {
            return vars;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no env file with a new login at {}", path.display());
}

fn login_from(vars: &std::collections::HashMap<String, String>) -> pb::DatabaseLogin {
    pb::DatabaseLogin {
        user: vars["PGUSER"].clone(),
        password: vars["PGPASSWORD"].clone(),
        host: vars["PGHOST"].clone(),
        port: vars["PGPORT"].parse().unwrap(),
        dbname: vars["PGDATABASE"].clone(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_agent_keeps_an_env_file_with_a_working_login_across_renewals_and_reissues() {
    let Some(t) = target("the_agent_keeps_an_env_file").await else {
        return;
    };
    let h = broker(&t, "").await;
    // The broker's clock keeps pace with PostgreSQL's (`VALID UNTIL` is
    // judged by the database's own clock).
    let clock = h.clock.clone();
    let ticking = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            clock.advance(Duration::from_millis(50));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("db.env");
    let cfg = portcullis::agent::AgentConfig {
        scopes: vec!["db.orders.read".into()],
        audience: String::new(),
        ttl: Some(Duration::from_secs(3)),
        out: None,
        env_file: Some(env.clone()),
        reason: String::new(),
        from_token: None,
        for_identity: String::new(),
        id_token: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(portcullis::agent::run(h.opts(As::Workload), cfg, async {
        let _ = stopped.await;
    }));
    let first = env_file_other_than(&env, "").await;
    let l = login_from(&first);
    assert_eq!(psql(&l, "SELECT count(*) FROM orders").unwrap(), "2");
    assert_eq!(
        first["PGUSER"],
        format!("pc_{}", first["PORTCULLIS_LEASE_ID"])
    );
    assert!(first["PORTCULLIS_TOKEN"].starts_with("ey"), "{first:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&env).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Renewed (the same lease, a fresh token): the login stays, still works.
    let mut c = h.broker(As::Workload).await;
    let lease = first["PORTCULLIS_LEASE_ID"].clone();
    let mut renewed = None;
    for _ in 0..100 {
        let now = env_file_other_than(&env, "").await;
        if now["PORTCULLIS_TOKEN"] != first["PORTCULLIS_TOKEN"] {
            renewed = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = renewed.expect("the agent wrote no renewed token in 10 s");
    let got = c
        .get_lease(pb::GetLeaseRequest {
            lease_id: lease.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.lease.unwrap().renewals > 0);
    assert_eq!(
        renewed["PORTCULLIS_LEASE_ID"], lease,
        "renewed, not re-issued"
    );
    assert_eq!(
        (&renewed["PGUSER"], &renewed["PGPASSWORD"]),
        (&first["PGUSER"], &first["PGPASSWORD"])
    );
    assert_eq!(psql(&l, "SELECT 1").unwrap(), "1");

    // Revoked: the agent asks again and writes the new login.
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: lease,
        reason: "rotate".into(),
    })
    .await
    .unwrap();
    let next = env_file_other_than(&env, &first["PGUSER"]).await;
    assert_ne!(next["PORTCULLIS_LEASE_ID"], first["PORTCULLIS_LEASE_ID"]);
    assert_eq!(psql(&login_from(&next), "SELECT 1").unwrap(), "1");
    assert!(psql(&l, "SELECT 1").is_err(), "the old login is gone");
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    ticking.abort();
    h.stop().await;
}

/// A non-superuser admin role on `t` with only what the README asks for
/// (`CREATEROLE`, `pg_signal_backend`, the group `WITH ADMIN OPTION`),
/// signing in with a password; its name and that password.
async fn least_admin(t: &Target) -> (String, String) {
    let admin = format!("a_{}", &t.group[2..]);
    let password = "first-admin-password".to_owned();
    t.admin
        .batch_execute(&format!(
            "CREATE ROLE {admin} LOGIN CREATEROLE PASSWORD '{password}';
             GRANT pg_signal_backend TO {admin};
             GRANT {g} TO {admin} WITH ADMIN OPTION;",
            g = t.group
        ))
        .await
        .unwrap();
    (admin, password)
}

/// A broker on `t` whose admin is `admin`, signing in with `password`
/// from its password file; `t` as that admin reaches it.
async fn broker_as(t: Target, admin: &str, password: &str) -> (Target, Harness) {
    let as_admin = Target {
        url: t.url.replacen("postgres@", &format!("{admin}@"), 1),
        admin: t.admin,
        group: t.group,
    };
    let pw = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    let h = Harness::start_with(Some(&policy(&as_admin, &pw.keep().unwrap(), ""))).await;
    (as_admin, h)
}

/// `password` signs in as `user` on `t`'s database (through libpq).
fn signs_in_as(t: &Target, user: &str, password: &str) -> bool {
    let config: tokio_postgres::Config = t.url.parse().unwrap();
    let tokio_postgres::config::Host::Tcp(host) = &config.get_hosts()[0] else {
        panic!("{config:?}");
    };
    let l = pb::DatabaseLogin {
        user: user.to_owned(),
        password: password.to_owned(),
        host: host.clone(),
        port: u32::from(config.get_ports()[0]),
        dbname: config.get_dbname().unwrap().to_owned(),
        ..Default::default()
    };
    psql(&l, "SELECT 1").is_ok()
}

#[tokio::test]
async fn a_least_privileged_admin_works_and_its_password_rotates_into_the_store() {
    let Some(t) = target("a_least_privileged_admin").await else {
        return;
    };
    // A superuser admin (the throwaway cluster's `postgres`) is not rotated.
    let h = broker(&t, "").await;
    let e = pb::keys_client::KeysClient::new(h.channel(As::Admin).await)
        .rotate_database_root(pb::RotateDatabaseRootRequest {
            database: "orders".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is a superuser"), "{e:?}");
    h.stop().await;

    let (admin, first) = least_admin(&t).await;
    let (t, mut h) = broker_as(t, &admin, &first).await;
    let mut c = h.broker(As::Workload).await;

    // The least privileges make, end (sessions and all) and drop a login.
    let g = read_for_a_minute(&mut c).await;
    let l = login_of(&g).clone();
    let (s, task) = sign_in(&l).await.unwrap();
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: g.lease.unwrap().id,
        reason: String::new(),
    })
    .await
    .unwrap();
    assert!(s.simple_query("SELECT 1").await.is_err());
    let _ = task.await;
    gone(&t, &l.user).await;

    // Rotation: admins only, a database the policy names, and then the
    // first password signs in no more; the broker goes on with the new one.
    let mut keys = pb::keys_client::KeysClient::new(h.channel(As::Admin).await);
    let rotate = |database: &str| pb::RotateDatabaseRootRequest {
        database: database.to_owned(),
        reason: "weekly".into(),
    };
    let e = pb::keys_client::KeysClient::new(h.channel(As::Workload).await)
        .rotate_database_root(rotate("orders"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = keys.rotate_database_root(rotate("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("`database`"), "{e:?}");
    assert!(signs_in_as(&t, &admin, &first));
    let r = keys
        .rotate_database_root(rotate("orders"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.database, "orders");
    assert!(
        !signs_in_as(&t, &admin, &first),
        "the old password still works"
    );
    let g = read_for_a_minute(&mut c).await;
    assert_eq!(
        psql(login_of(&g), "SELECT count(*) FROM orders").unwrap(),
        "2"
    );

    // After a restart the broker reads it back (the file is stale now), and
    // rotates again from it.
    h.restart().await;
    let mut c = h.broker(As::Workload).await;
    let g2 = read_for_a_minute(&mut c).await;
    assert_eq!(psql(login_of(&g2), "SELECT 1").unwrap(), "1");
    let mut keys = pb::keys_client::KeysClient::new(h.channel(As::Admin).await);
    keys.rotate_database_root(rotate("orders")).await.unwrap();
    let g3 = read_for_a_minute(&mut c).await;
    assert_eq!(psql(login_of(&g3), "SELECT 1").unwrap(), "1");

    // On the record, by whom; no password in the trail.
    let records = common::export(&h).await;
    let rotated: Vec<_> = records
        .iter()
        .filter(|r| r.action == "db.root.rotated")
        .collect();
    assert_eq!(rotated.len(), 2, "{rotated:#?}");
    assert!(rotated.iter().all(|r| r.target == "orders"
        && r.actor.ends_with("root-oncall")
        && r.reason.contains("weekly")));
    assert!(records.iter().any(|r| r.action == "db.root.rotating"));
    let everything = format!("{records:?}");
    assert!(!everything.contains(&first));
    assert!(
        !everything.contains("SCRAM-SHA-256$"),
        "a verifier is in the trail"
    );
    h.stop().await;
    t.admin
        .batch_execute(&format!("DROP OWNED BY {admin}; DROP ROLE {admin}"))
        .await
        .ok();
}

#[tokio::test]
async fn a_login_that_owns_objects_elsewhere_is_kept_unable_to_sign_in_and_without_rights() {
    let Some(t) = target("a_login_that_owns_objects_elsewhere").await else {
        return;
    };
    let elsewhere = common::scratch_database("owns_objects_elsewhere").unwrap();
    let h = broker(&t, "").await;
    let mut c = h.broker(As::Workload).await;
    let g = read_for_a_minute(&mut c).await;
    let l = login_of(&g).clone();
    let lease = g.lease.unwrap().id;
    // It comes to own a table in another database of the cluster, which
    // `DROP OWNED` on its own database cannot reach.
    let (other, conn) = tokio_postgres::connect(&elsewhere, NoTls).await.unwrap();
    tokio::spawn(conn);
    other
        .batch_execute(&format!(
            "CREATE TABLE left_behind (x int); ALTER TABLE left_behind OWNER TO {}",
            l.user
        ))
        .await
        .unwrap();
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: lease.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();

    // Kept: it cannot sign in, it is no longer in the group, and its mark
    // says why, so that no reconciler pass ends it again.
    assert!(role_exists(&t, &l.user).await);
    assert!(sign_in(&l).await.is_err());
    assert!(members(&t).await.is_empty(), "{:?}", members(&t).await);
    let (can_login, mark): (bool, String) = {
        let row = t
            .admin
            .query_one(
                "SELECT rolcanlogin, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
                &[&l.user],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(!can_login);
    assert!(mark.contains("kept, owns objects elsewhere"), "{mark}");
    let records = common::export(&h).await;
    let fate = records
        .iter()
        .find(|r| r.target == lease && r.action == "db.login.dropped")
        .unwrap();
    assert!(fate.reason.contains("kept"), "{fate:?}");
    assert_eq!(h.running().engine.reconcile_logins().await, 0);
    h.stop().await;
    other
        .batch_execute(&format!("DROP TABLE left_behind; DROP ROLE {}", l.user))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_rotation_cut_short_after_the_database_took_the_password_is_found_and_settled() {
    let Some(t) = target("a_rotation_cut_short").await else {
        return;
    };
    let (admin, first) = least_admin(&t).await;
    // A session of the cluster's superuser, to hold the admin role's row.
    let (holder, conn) = tokio_postgres::connect(&t.url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let (t, mut h) = broker_as(t, &admin, &first).await;
    let mut keys = pb::keys_client::KeysClient::new(h.channel(As::Admin).await);
    let rotate = pb::RotateDatabaseRootRequest {
        database: "orders".into(),
        reason: "weekly".into(),
    };

    // The `ALTER ROLE` waits on the role's row past the broker's patience:
    // the rotation fails with its new password sealed as pending, while the
    // statement is still queued on the database, which takes it once the
    // row is let go. Neither side knows the outcome.
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM pg_authid WHERE rolname = '{admin}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let e = keys.rotate_database_root(rotate.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("may not have been set"), "{e:?}");
    assert!(signs_in_as(&t, &admin, &first), "not yet changed");
    holder.batch_execute("ROLLBACK").await.unwrap();
    let mut changed = false;
    for _ in 0..50 {
        if !signs_in_as(&t, &admin, &first) {
            changed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(changed, "the queued ALTER ROLE never took effect");

    // The broker finds the password the database took (the pending one),
    // after a restart too, and the next rotation settles it and goes on.
    let mut c = h.broker(As::Workload).await;
    let g = read_for_a_minute(&mut c).await;
    assert_eq!(psql(login_of(&g), "SELECT 1").unwrap(), "1");
    h.restart().await;
    let mut c = h.broker(As::Workload).await;
    let g = read_for_a_minute(&mut c).await;
    assert_eq!(psql(login_of(&g), "SELECT 1").unwrap(), "1");
    let mut keys = pb::keys_client::KeysClient::new(h.channel(As::Admin).await);
    keys.rotate_database_root(rotate).await.unwrap();
    let g = read_for_a_minute(&mut c).await;
    assert_eq!(psql(login_of(&g), "SELECT 1").unwrap(), "1");
    let records = common::export(&h).await;
    let count = |a: &str| records.iter().filter(|r| r.action == a).count();
    assert_eq!(
        (count("db.root.rotating"), count("db.root.rotated")),
        (2, 1)
    );
    h.stop().await;
    t.admin
        .batch_execute(&format!("DROP OWNED BY {admin}; DROP ROLE {admin}"))
        .await
        .ok();
}

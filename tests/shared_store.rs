//! Several brokers on one PostgreSQL database (issue 11): each guarantee
//! with two or three real brokers, real mTLS and the generated client.
//! Skipped, saying so, when `PORTCULLIS_TEST_DATABASE_URL` is not set;
//! `.ci/run` always sets it.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use portcullis::dev::As;
use portcullis::pb;
use portcullis::pb::approvals_client::ApprovalsClient;
use portcullis::pb::audit_client::AuditClient;
use portcullis::pb::keys_client::KeysClient;
use portcullis::server::Running;

/// Two brokers on a fresh database, or `None` when there is no database.
async fn pair(test: &str) -> Option<(Harness, Running)> {
    let db = scratch_database(test)?;
    let h = Harness::start_shared(db, None).await;
    let b = h.another().await;
    Some((h, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_on_one_broker_reaches_a_watcher_on_another_once() {
    let Some((h, b)) = pair("an_approval_on_one_broker_reaches_a_watcher_on_another_once").await
    else {
        return;
    };
    let mut on_a = h.broker(As::Workload).await;
    let req = park(&mut on_a, &["orders.admin"]).await;
    let mut watch = on_a
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        first.request.unwrap().state,
        pb::RequestState::Pending as i32
    );

    // Broker B lists it and takes the decision.
    let mut approver = ApprovalsClient::new(h.opts_on(&b, As::Approver).connect().await.unwrap());
    let pending = approver
        .list_pending(pb::ListPendingRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(pending.len(), 1, "B sees the request parked on A");
    let decided = Instant::now();
    approver
        .approve(pb::ApproveRequest {
            request_id: req.id.clone(),
            reason: "ok".into(),
            digest: req.digest.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    // The watcher on A learns of it within a second, with the token.
    let msg = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let m = watch.message().await.unwrap().unwrap();
            if m.grant.is_some() {
                return m;
            }
        }
    })
    .await
    .expect("the watcher on A hears of B's decision within 1 s");
    let waited = decided.elapsed();
    let grant = msg.grant.unwrap();
    assert_eq!(msg.request.unwrap().state, pb::RequestState::Issued as i32);

    // No second copy from either broker.
    for client in [&mut on_a, &mut h.broker_on(&b, As::Workload).await] {
        let again = client
            .get_request(pb::GetRequestRequest {
                request_id: req.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(again.grant.is_none(), "delivered once");
    }
    // B verifies the token A delivered.
    let active = h
        .broker_on(&b, As::Workload)
        .await
        .introspect(pb::IntrospectRequest {
            token: grant.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active;
    assert!(active, "the token from A is active on B");
    eprintln!("watcher on A heard of B's decision after {waited:?}");
    b.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_on_another_broker_gets_the_same_lease() {
    let Some((h, b)) = pair("a_retry_on_another_broker_gets_the_same_lease").await else {
        return;
    };
    let ask_once = || pb::RequestTokenRequest {
        client_request_id: "deploy-42".into(),
        ..ask(&["orders.read"])
    };
    let first = grant(&mut h.broker(As::Workload).await, ask_once()).await;
    let second = grant(&mut h.broker_on(&b, As::Workload).await, ask_once()).await;
    assert_eq!(
        first.lease.unwrap().id,
        second.lease.unwrap().id,
        "one lease for one client_request_id, whichever broker answers"
    );
    assert_eq!(count_leases(&mut h.broker(As::Workload).await).await, 1);

    // The same key sent to both brokers at the same moment, many times over.
    for n in 0..20 {
        let same = || pb::RequestTokenRequest {
            client_request_id: format!("race-{n}"),
            ..ask(&["orders.read"])
        };
        let (mut on_a, mut on_b) = (
            h.broker(As::Workload).await,
            h.broker_on(&b, As::Workload).await,
        );
        let (x, y) = tokio::join!(grant(&mut on_a, same()), grant(&mut on_b, same()));
        assert_eq!(x.lease.unwrap().id, y.lease.unwrap().id, "race {n}");
    }
    assert_eq!(count_leases(&mut h.broker(As::Workload).await).await, 21);
    b.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_broker_is_seen_at_once_on_another() {
    let Some((h, b)) = pair("a_revocation_on_one_broker_is_seen_at_once_on_another").await else {
        return;
    };
    let mut on_a = h.broker(As::Workload).await;
    let g = grant(&mut on_a, ask(&["orders.read"])).await;
    let introspect = |token: String| pb::IntrospectRequest {
        token,
        ..Default::default()
    };
    assert!(
        on_a.introspect(introspect(g.token.clone()))
            .await
            .unwrap()
            .into_inner()
            .active
    );
    h.broker_on(&b, As::Workload)
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: g.lease.unwrap().id,
            reason: "done".into(),
        })
        .await
        .unwrap();
    assert!(
        !on_a
            .introspect(introspect(g.token))
            .await
            .unwrap()
            .into_inner()
            .active,
        "revoked on B, inactive on A at once"
    );
    b.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_brokers_records_form_one_chain_that_verifies() {
    let Some((h, b)) = pair("every_brokers_records_form_one_chain_that_verifies").await else {
        return;
    };
    let c = h.another().await;
    let brokers = [h.running(), &b, &c];
    let mut tasks = Vec::new();
    for r in brokers {
        for _ in 0..4 {
            let mut client = h.broker_on(r, As::Workload).await;
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    grant(&mut client, ask(&["orders.read"])).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    for r in brokers {
        let mut auditor = AuditClient::new(h.opts_on(r, As::Admin).connect().await.unwrap());
        let v = auditor
            .verify(pb::VerifyRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(v.ok, "chain verifies from every broker: {v:?}");
        let granted = auditor
            .export(pb::ExportRequest {
                action: "token.granted".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        assert_eq!(
            granted.len(),
            120,
            "120 grants over three brokers, each recorded once in one chain"
        );
    }
    c.shutdown().await;
    b.shutdown().await;
    h.stop().await;
}

async fn jwks_of(r: &Running) -> String {
    http_get(r.http_addr.unwrap(), "/.well-known/jwks.json").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_on_one_broker_is_published_by_every_broker() {
    let Some((h, b)) = pair("a_rotation_on_one_broker_is_published_by_every_broker").await else {
        return;
    };
    assert_eq!(
        jwks_of(h.running()).await,
        jwks_of(&b).await,
        "one key ring"
    );
    KeysClient::new(h.opts_on(&b, As::Admin).connect().await.unwrap())
        .rotate(pb::RotateRequest {
            emergency: false,
            kid: String::new(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let on_b = jwks_of(&b).await;
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let on_a = jwks_of(h.running()).await;
        if on_a == on_b {
            break;
        }
        assert!(
            Instant::now() < until,
            "A still publishes {on_a} while B publishes {on_b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: serde_json::Value = serde_json::from_str(&on_b).unwrap();
    assert_eq!(
        keys["keys"].as_array().unwrap().len(),
        2,
        "the next key is published"
    );
    b.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_broker_leads_the_time_driven_work_and_another_takes_over() {
    let Some((h, b)) = pair("one_broker_leads_the_time_driven_work_and_another_takes_over").await
    else {
        return;
    };
    let leaders = || [h.running().engine.leads(), b.engine.leads()];
    let until = Instant::now() + Duration::from_secs(3);
    while leaders().iter().filter(|l| **l).count() != 1 {
        assert!(Instant::now() < until, "no single leader: {:?}", leaders());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A lease granted on the follower expires under the leader.
    let (leader, follower) = if b.engine.leads() {
        (&b, h.running())
    } else {
        (h.running(), &b)
    };
    let mut on_follower = h.broker_on(follower, As::Workload).await;
    let g = grant(
        &mut on_follower,
        pb::RequestTokenRequest {
            ttl: secs(60),
            ..ask(&["orders.read"])
        },
    )
    .await;
    let lease_id = g.lease.unwrap().id;
    h.clock.advance(Duration::from_secs(61));
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let lease = on_follower
            .get_lease(pb::GetLeaseRequest {
                lease_id: lease_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap();
        if lease.state == pb::LeaseState::Expired as i32 {
            break;
        }
        assert!(Instant::now() < until, "the leader did not expire it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(leader.engine.leads());

    // The leader stops; the other broker takes over.
    let follower_was_b = !b.engine.leads();
    let mut h = h;
    let survivor = if follower_was_b {
        h.halt().await;
        b
    } else {
        b.shutdown().await;
        h.running.take().unwrap()
    };
    let until = Instant::now() + Duration::from_secs(7);
    while !survivor.engine.leads() {
        assert!(Instant::now() < until, "nobody took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    survivor.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brokers_starting_together_migrate_once_and_share_one_first_key() {
    let Some(db) =
        scratch_database("brokers_starting_together_migrate_once_and_share_one_first_key")
    else {
        return;
    };
    let mut h = Harness::start_shared(db.clone(), None).await;
    h.halt().await;
    // A fresh database for the race itself.
    let Some(fresh) = scratch_database("race") else {
        return;
    };
    h.database = Some(fresh);
    let (a, b, c) = tokio::join!(h.another(), h.another(), h.another());
    let sets = [jwks_of(&a).await, jwks_of(&b).await, jwks_of(&c).await];
    assert!(
        sets.iter().all(|s| *s == sets[0]),
        "one first key for every broker: {sets:?}"
    );
    let keys: serde_json::Value = serde_json::from_str(&sets[0]).unwrap();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    for r in [a, b, c] {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_of_a_newer_schema_is_refused() {
    let Some(db) = scratch_database("a_database_of_a_newer_schema_is_refused") else {
        return;
    };
    let mut h = Harness::start_shared(db.clone(), None).await;
    h.halt().await;
    let (client, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute("INSERT INTO portcullis_migrations (version) VALUES (999)")
        .await
        .unwrap();
    let Err(e) = portcullis::server::start(h.config()).await else {
        panic!("a newer schema must be refused");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("999") && msg.contains("schema"),
        "names the versions: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sled_store_moves_to_postgres_with_its_leases_keys_and_trail() {
    let Some(db) =
        scratch_database("a_sled_store_moves_to_postgres_with_its_leases_keys_and_trail")
    else {
        return;
    };
    let mut h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let kept = grant(&mut c, ask(&["orders.read"])).await;
    let parked = park(&mut c, &["orders.admin"]).await;
    let before = AuditClient::new(h.channel(As::Admin).await)
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    h.halt().await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["store", "copy", "--from"])
        .arg(h.dev.data())
        .args(["--to", &db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2 leases") || said.contains("1 leases"),
        "{said}"
    );
    // A second copy into the same database is refused: it is not empty.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["store", "copy", "--from"])
        .arg(h.dev.data())
        .args(["--to", &db])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // The same broker, now on PostgreSQL: the token, the parked request and
    // the whole trail came along.
    h.database = Some(db);
    h.boot().await;
    let mut c = h.broker(As::Workload).await;
    assert!(
        c.introspect(pb::IntrospectRequest {
            token: kept.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active,
        "a token issued on sled is still active"
    );
    let req = c
        .get_request(pb::GetRequestRequest {
            request_id: parked.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(req.state, pb::RequestState::Pending as i32);
    // The new start's records are noted, not waited on: they join the chain
    // at the next commit, which the note asks for.
    let mut auditor = AuditClient::new(h.channel(As::Admin).await);
    let until = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let v = auditor
            .verify(pb::VerifyRequest::default())
            .await
            .unwrap()
            .into_inner();
        if v.records > before.records || Instant::now() > until {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after.ok, "{after:?}");
    assert!(
        after.records > before.records,
        "every record of the sled trail, then the new start: {before:?} {after:?}"
    );
    h.stop().await;
}

/// Issue 13 with issue 11: a console session or sign-in link made on one
/// broker works on every broker of the database, a link still only once,
/// and signing out on one ends the session on all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_session_and_its_link_work_across_brokers() {
    let Some((h, b)) = pair("a_console_session_and_its_link_work_across_brokers").await else {
        return;
    };
    let (a_http, b_http) = (h.running().http_addr.unwrap(), b.http_addr.unwrap());
    let mut on_a = ApprovalsClient::new(h.opts(As::Approver).connect().await.unwrap());
    let url = on_a
        .create_console_link(pb::CreateConsoleLinkRequest::default())
        .await
        .unwrap()
        .into_inner()
        .url;
    let secret = url.split_once("?t=").unwrap().1.to_owned();
    assert!(url.starts_with(&format!("{CONSOLE_URL}/ui/login/link?t=")));

    // Made on A, opened and used on B.
    let path = format!("/ui/login/link?t={secret}");
    let (status, _, page) = http(b_http, "GET", &path, None, None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(portcullis::dev::APPROVER), "{page}");
    let (status, cookies, page) = http(
        b_http,
        "POST",
        "/ui/login/link",
        None,
        Some(format!("t={secret}")),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let session = cookies
        .iter()
        .find(|c| c.starts_with("__Host-portcullis_session="))
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert!(session.contains("Secure") && session.contains("SameSite=Strict"));
    let cookie = session.split(';').next().unwrap().to_owned();
    // Used: not again, on either broker.
    for on in [a_http, b_http] {
        let (status, _, _) = http(
            on,
            "POST",
            "/ui/login/link",
            None,
            Some(format!("t={secret}")),
        )
        .await;
        assert_eq!(status, 401);
    }

    // The session B opened works on A.
    let (status, _, page) = http(a_http, "GET", "/ui/pending", Some(&cookie), None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(portcullis::dev::APPROVER), "{page}");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();

    // Signed out on A: gone on B too.
    let (status, _, _) = http(
        a_http,
        "POST",
        "/ui/logout",
        Some(&cookie),
        Some(format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(status, 303);
    let (status, _, _) = http(b_http, "GET", "/ui/pending", Some(&cookie), None).await;
    assert_eq!(status, 303, "signed out everywhere");
    b.shutdown().await;
}

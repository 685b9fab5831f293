//! Issue 9, "what an attacker found": one test per finding fixed, against a
//! real broker over mTLS. Each reproduces the attack and checks it fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::time::Duration;

use common::{Harness, ask, grant, secs};
use portcullis::dev::As;
use portcullis::pb;
use portcullis::pb::approvals_client::ApprovalsClient;
use portcullis::pb::broker_client::BrokerClient;
use tonic::Code;
use tonic::transport::Channel;

async fn park(c: &mut BrokerClient<Channel>, scopes: &[&str]) -> pb::TokenRequest {
    match c
        .request_token(ask(scopes))
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
    {
        pb::request_token_response::Outcome::Pending(r) => r,
        other => panic!("expected a parked request, got {other:?}"),
    }
}

fn approve(id: &str, ttl: Option<prost_types::Duration>) -> pb::ApproveRequest {
    pb::ApproveRequest {
        request_id: id.into(),
        reason: "ok".into(),
        ttl,
        ..Default::default()
    }
}

/// The token of an approved request, as its requester collects it.
async fn collect(c: &mut BrokerClient<Channel>, id: &str) -> pb::Grant {
    c.get_request(pb::GetRequestRequest {
        request_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .grant
    .expect("the approved token")
}

fn lease_life(l: &pb::Lease) -> (i64, i64) {
    let issued = l.issued_at.as_ref().unwrap().seconds;
    (
        l.expires_at.as_ref().unwrap().seconds - issued,
        l.max_expires_at.as_ref().unwrap().seconds - issued,
    )
}

/// Finding 1: what approvers approved bounds the lease for its whole life.
#[tokio::test]
async fn f01_renewal_never_stretches_an_approved_ttl() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let req = park(&mut c, &["orders.admin"]).await;
    let mut alice = ApprovalsClient::new(h.channel(As::Approver).await);
    alice.approve(approve(&req.id, secs(60))).await.unwrap();
    let g = collect(&mut c, &req.id).await;
    let lease = g.lease.unwrap();
    assert_eq!(
        lease_life(&lease),
        (60, 60),
        "ttl and ceiling are the approved 60 s"
    );

    // The scope's max_ttl is 15 minutes; the approval said 60 s.
    let renewed = common::renewed(&mut c, &lease.id, Some(900)).await;
    assert!(lease_life(&renewed).0 <= 60, "{renewed:?}");
    h.clock.advance(Duration::from_secs(60));
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id,
            ttl: secs(900),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    h.stop().await;
}

/// Rewrite the dev policy with `f`; the result must be a valid policy
/// (an invalid one would be rejected, and the test would wait for nothing).
fn rewrite_policy(h: &Harness, f: impl Fn(String) -> String) {
    let path = h.dev.path("policy.toml");
    let text = f(std::fs::read_to_string(&path).unwrap());
    if let Err(e) = portcullis::policy::Policy::parse(&text) {
        panic!("the rewritten policy is invalid: {e}\n{text}");
    }
    std::fs::write(&path, text).unwrap();
}

/// Finding 7: approve, claim and renew answer to the policy in force now.
#[tokio::test]
async fn f07_policy_changes_reach_requests_and_leases_in_flight() {
    let h = Harness::start().await;
    let mut reloads = h.running().engine.policy_reloads();
    let mut c = h.broker(As::Workload).await;
    let mut alice = ApprovalsClient::new(h.channel(As::Approver).await);
    let pending = park(&mut c, &["orders.admin"]).await;
    let approved = park(&mut c, &["orders.admin"]).await;
    alice.approve(approve(&approved.id, None)).await.unwrap();
    let read = grant(&mut c, ask(&["orders.read"])).await.lease.unwrap();
    let write = grant(&mut c, ask(&["orders.write"])).await.lease.unwrap();

    // orders.admin removed; orders.read now needs approval; orders.write's
    // max_ttl lowered from 15m to 2m.
    rewrite_policy(&h, |p| {
        p.replace("name = \"orders.admin\"", "name = \"orders.gone\"")
            // The dev policy's delegation rule names it too.
            .replace(", \"orders.admin\"]", "]")
            .replace(
                "name = \"orders.read\"\ndescription = \"read orders and their line items\"\ntier = \"auto\"",
                "name = \"orders.read\"\ntier = \"approval\"\napprovers = [\"approvers\"]",
            )
            .replace(
                "name = \"orders.write\"\ndescription = \"create and update orders\"\ntier = \"auto\"\nworkloads = [\"spiffe://portcullis.dev/ns/demo/*\"]\ndefault_ttl = \"5m\"\nmax_ttl = \"15m\"",
                "name = \"orders.write\"\ntier = \"auto\"\nworkloads = [\"spiffe://portcullis.dev/ns/demo/*\"]\ndefault_ttl = \"1m\"\nmax_ttl = \"2m\"",
            )
    });
    tokio::time::timeout(Duration::from_secs(30), reloads.wait_for(|r| r.loaded >= 1))
        .await
        .expect("no policy reload within 30 s")
        .unwrap();

    let e = alice.approve(approve(&pending.id, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "scope gone: {e:?}");
    let e = c
        .get_request(pb::GetRequestRequest {
            request_id: approved.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "no claim after removal: {e:?}"
    );

    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: read.id,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("now needs approval"),
        "{}",
        e.message()
    );

    let renewed = common::renewed(&mut c, &write.id, Some(600)).await;
    assert_eq!(
        lease_life(&renewed),
        (120, 120),
        "the lowered ceiling applies"
    );
    h.stop().await;
}

/// Finding 9: a decision after the deadline is refused where it is made,
/// whether or not the expiry sweep has run yet.
#[tokio::test]
async fn f09_no_decision_lands_after_the_deadline() {
    let mut h = Harness::start().await;
    // No sweep: only the check where the decision is made can refuse.
    h.expiry = false;
    h.restart().await;
    let mut c = h.broker(As::Workload).await;
    let a = park(&mut c, &["orders.admin"]).await;
    let b = park(&mut c, &["orders.admin"]).await;
    // One millisecond past pending_ttl (30m).
    h.clock
        .advance(Duration::from_secs(30 * 60) + Duration::from_millis(1));
    let mut alice = ApprovalsClient::new(h.channel(As::Approver).await);
    let e = alice.approve(approve(&a.id, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = alice
        .deny(pb::DenyRequest {
            request_id: b.id.clone(),
            reason: "late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    h.stop().await;
}

/// Finding 13a: the idempotency digest covers break-glass.
#[tokio::test]
async fn f13_a_retry_that_toggles_break_glass_is_a_conflict() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let mut first = ask(&["orders.read"]);
    first.client_request_id = "retry-1".into();
    first.justification = "pager".into();
    grant(&mut c, first.clone()).await;
    let toggled = pb::RequestTokenRequest {
        break_glass: true,
        ..first
    };
    let e = c.request_token(toggled).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    h.stop().await;
}

/// A token signed by the broker's own active key with `header` and
/// `claims`: what an attacker holding a signing oracle could present.
fn signed(h: &Harness, header: serde_json::Value, claims: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let keys = h.running().engine.keys().current();
    let input = format!("{}.{}", b64(&header), b64(&claims));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &keys.active.encoding, keys.active.alg)
        .unwrap();
    format!("{input}.{sig}")
}

/// Finding 13b and 13c: an unknown `crit` header is refused (RFC 7515
/// §4.1.11), and introspection reports the lease's scope, not the token's.
#[tokio::test]
async fn f13_crit_headers_are_refused_and_introspection_trusts_the_lease() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let g = grant(&mut c, ask(&["orders.read"])).await;
    let header = common::part(&g.token, 0);
    let mut claims = common::part(&g.token, 1);
    let introspect = |token: String| pb::IntrospectRequest {
        token,
        ..Default::default()
    };

    // Control: the same construction without changes is active.
    let same = signed(&h, header.clone(), claims.clone());
    let a = c.introspect(introspect(same)).await.unwrap().into_inner();
    assert!(a.active);

    let mut crit = header.clone();
    crit["crit"] = serde_json::json!(["exp"]);
    let a = c
        .introspect(introspect(signed(&h, crit, claims.clone())))
        .await
        .unwrap()
        .into_inner();
    assert!(!a.active, "crit must be refused");

    claims["scope"] = serde_json::json!("orders.admin");
    let a = c
        .introspect(introspect(signed(&h, header, claims)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.scope, "orders.read", "the lease's scope");
    h.stop().await;
}

/// Finding 13d: SPIFFE IDs the spec forbids are refused at authentication.
#[tokio::test]
async fn f13_dot_segments_and_percent_encoding_are_not_identities() {
    let h = Harness::start().await;
    for uri in [
        "spiffe://portcullis.dev/ns/demo/../admin",
        "spiffe://portcullis.dev/ns/demo/./app",
        "spiffe://portcullis.dev/ns/demo/sa/%61pp",
    ] {
        let mut c = BrokerClient::new(h.channel_for(uri).await);
        let e = c.request_token(ask(&["orders.read"])).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{uri}: {e:?}");
    }
    h.stop().await;
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Finding 11: the store is owner-only, a readable KEK stops the broker,
/// and the atomic writer neither reuses a planted file nor writes through a
/// planted link.
#[cfg(unix)]
#[tokio::test]
async fn f11_store_kek_and_written_secrets_stay_private() {
    use portcullis::fsutil::{Access, write_atomic};
    use std::os::unix::fs::PermissionsExt as _;

    let mut h = Harness::start().await;
    let data = h.dev.data();
    assert_eq!(mode(&data), 0o700, "data directory");
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    let cfg = h.config();
    let kek = h.dev.path("kek");
    h.halt().await;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    let Err(e) = portcullis::server::start(cfg).await else {
        panic!("a broker started with a world-readable KEK")
    };
    assert!(e.to_string().contains("chmod 600"), "{e}");

    // The agent's token file: planted temporaries and links change nothing.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    for planted in [".token.tmp", ".token.1.0.tmp", "token.tmp"] {
        let p = dir.path().join(planted);
        std::fs::write(&p, "planted").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    write_atomic(&token, b"secret", Access::Private).unwrap();
    assert_eq!(mode(&token), 0o600);
    assert_eq!(
        std::fs::read(dir.path().join(".token.tmp")).unwrap(),
        b"planted"
    );
    let elsewhere = dir.path().join("elsewhere");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let e = write_atomic(&link, b"secret", Access::Private).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert!(!elsewhere.exists(), "nothing written through the link");
}

/// Finding 14: the issuer belongs to the store, not to a port. Without
/// `--issuer` the first start's URL is kept; a broker back on another port
/// still honours its tokens; a different configured issuer is refused
/// unless the operator says to change it.
#[tokio::test]
async fn f14_the_issuer_survives_a_restart_on_another_port() {
    let mut h = Harness::start().await;
    h.halt().await;
    std::fs::remove_dir_all(h.dev.data()).unwrap();
    h.restart_with(|cfg| {
        cfg.issuer = None;
    })
    .await;
    let first = h.running().http_addr.unwrap();
    let mut c = h.broker(As::Workload).await;
    let token = grant(&mut c, ask(&["orders.read"])).await.token;
    assert_eq!(common::part(&token, 1)["iss"], format!("http://{first}"));

    h.restart_with(|cfg| {
        cfg.issuer = None;
    })
    .await;
    assert_ne!(h.running().http_addr.unwrap(), first, "a new port");
    let mut c = h.broker(As::Workload).await;
    let a = c
        .introspect(pb::IntrospectRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(a.active, "a token from before the restart is still live");

    h.halt().await;
    let mut cfg = h.config();
    cfg.issuer = Some("https://elsewhere.example".into());
    let Err(e) = portcullis::server::start(cfg).await else {
        panic!("the issuer changed silently")
    };
    assert!(e.to_string().contains("--change-issuer"), "{e}");
    h.restart_with(|cfg| {
        cfg.issuer = Some("https://elsewhere.example".into());
        cfg.allow_issuer_change = true;
    })
    .await;
    h.stop().await;
}

/// Finding 12: one identity cannot hold unbounded parked requests or watch
/// streams; the refusal names the limit, and room comes back when one ends.
#[tokio::test]
async fn f12_open_requests_and_watch_streams_are_bounded_per_identity() {
    let mut h = Harness::start().await;
    h.restart_with(|cfg| {
        cfg.limits = portcullis::server::Limits {
            open_requests_per_identity: 3,
            watches_per_identity: 2,
            ..Default::default()
        }
    })
    .await;
    let mut c = h.broker(As::Workload).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(park(&mut c, &["orders.admin"]).await.id);
    }
    let e = c.request_token(ask(&["orders.admin"])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-open-requests"),
        "{}",
        e.message()
    );
    // Another identity is not affected.
    let mut other = BrokerClient::new(
        h.channel_for("spiffe://portcullis.dev/ns/demo/sa/other")
            .await,
    );
    park(&mut other, &["orders.admin"]).await;
    c.withdraw_request(pb::WithdrawRequestRequest {
        request_id: ids[0].clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    park(&mut c, &["orders.admin"]).await;

    let watch = |c: &mut BrokerClient<Channel>, id: &str| {
        let mut c = c.clone();
        let id = id.to_owned();
        async move {
            c.watch_request(pb::WatchRequestRequest { request_id: id })
                .await
        }
    };
    let first = watch(&mut c, &ids[1]).await.unwrap();
    let _second = watch(&mut c, &ids[2]).await.unwrap();
    let e = watch(&mut c, &ids[1]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-watches"), "{}", e.message());
    drop(first);
    // The stream's end reaches the broker asynchronously.
    let mut again = Err(e);
    for _ in 0..100 {
        again = watch(&mut c, &ids[1]).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_ok(), "a closed stream frees its place: {again:?}");
    h.stop().await;
}

/// `GET path` over a fresh plain connection; `None` when the broker closed
/// it without an answer.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    match read {
        Ok(Ok(_)) if !out.is_empty() => Some(String::from_utf8_lossy(&out).into_owned()),
        _ => None,
    }
}

/// Finding 6: idle connections neither starve token requests nor stay
/// forever: the HTTP listener holds a bounded number, closes the rest at
/// once, and reaps the silent ones after the header-read timeout.
#[tokio::test]
async fn f06_idle_connections_are_capped_and_reaped() {
    let mut h = Harness::start().await;
    h.restart_with(|cfg| {
        cfg.conn_limits.http_connections = 4;
        cfg.conn_limits.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let http = h.running().http_addr.unwrap();
    assert!(raw_get(http, "/healthz").await.unwrap().contains("200 OK"));

    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(http).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Token requests go on meanwhile.
    let mut c = h.broker(As::Workload).await;
    grant(&mut c, ask(&["orders.read"])).await;
    assert!(
        raw_get(http, "/healthz").await.is_none(),
        "the HTTP listener is full: new connections are closed, not queued"
    );
    // The silent ones are reaped; the listener answers again.
    let mut answered = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answered = raw_get(http, "/healthz").await;
        if answered.is_some() {
            break;
        }
    }
    assert!(answered.unwrap_or_default().contains("200 OK"));
    drop(idle);

    // A keep-alive connection that goes quiet after a request is closed
    // after the header-read timeout too, not kept until its lifetime.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "idle keep-alive still open: {closed:?}"
        );
    }
    h.stop().await;
}

/// Issue 21, finding 1: no phase of an HTTP connection holds a slot
/// unbounded, and one peer cannot take every slot. A peer is held to its
/// share of connections; a body that trickles in gets 408 and the
/// connection closes; over TLS, a peer that completes the handshake and
/// then says nothing is closed after the header-read timeout.
#[tokio::test]
async fn i21_01_http_slots_are_bounded_per_peer_and_in_every_phase() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut h = Harness::start().await;
    h.restart_with(|cfg| {
        cfg.conn_limits.http_connections_per_peer = 3;
        cfg.conn_limits.header_read_timeout = Duration::from_secs(3);
        cfg.conn_limits.body_read_timeout = Duration::from_millis(400);
    })
    .await;
    let http = h.running().http_addr.unwrap();
    // Three connections, each mid-headers: this peer's share is taken...
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        raw_get(http, "/healthz").await.is_none(),
        "a fourth connection from the same peer is closed at once"
    );
    // ...and given back when they go.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(raw_get(http, "/healthz").await.unwrap().contains("200 OK"));

    // A body sent one byte at a time, slower than the body timeout.
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\na")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if s.write_all(b"a").await.is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            match tokio::time::timeout(Duration::from_millis(10), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(read.is_ok(), "a trickled body kept its connection: {text}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    h.stop().await;

    // The first letter of the HTTP/2 preface, then nothing: the listener
    // speaks HTTP/1.1 only, whose header timer runs from the first byte.
    let mut h = Harness::start().await;
    h.restart_with(|cfg| cfg.conn_limits.header_read_timeout = Duration::from_millis(500))
        .await;
    let http = h.running().http_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"P").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a peer that sent one byte still holds its slot"
    );
    // Idle keep-alive: one request answered, then nothing; closed by the
    // same timer.
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let idle = tokio::time::timeout(Duration::from_secs(5), async {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    })
    .await;
    let answered = String::from_utf8_lossy(idle.as_deref().unwrap_or_default()).into_owned();
    assert!(
        idle.is_ok(),
        "an idle keep-alive connection still holds its slot"
    );
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    h.stop().await;

    // Over TLS: the handshake completes, then nothing comes.
    let mut h = Harness::start().await;
    h.https = true;
    h.restart_with(|cfg| cfg.conn_limits.header_read_timeout = Duration::from_millis(500))
        .await;
    let port = h.running().http_addr.unwrap().port();
    let mut tls = tls_to(&h.dev.path("ca.pem"), port).await;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent TLS peer still holds its slot: {closed:?}"
    );
    // Over TLS too: one byte, then nothing (whatever the listener answers,
    // it closes in time).
    let mut tls = tls_to(&h.dev.path("ca.pem"), port).await;
    tls.write_all(b"P").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a one-byte TLS peer still holds its slot");
    h.stop().await;
}

/// A TLS connection to the broker's HTTPS listener on `port`, handshake
/// done, nothing sent.
async fn tls_to(
    ca: &std::path::Path,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Finding 8: refused calls cannot make the trail unreadable: what a
/// refusal records is bounded, and export pages are bounded by bytes too,
/// so every page fits a client's default 4 MiB message limit.
#[tokio::test]
async fn f08_refused_calls_cannot_break_audit_export() {
    use portcullis::pb::audit_client::AuditClient;
    let h = Harness::start().await;
    let mut nobody = BrokerClient::new(
        h.channel_for("spiffe://portcullis.dev/ns/nobody/sa/x")
            .await,
    );
    let scopes: Vec<String> = (0..64)
        .map(|i| format!("{i:02}{}", "s".repeat(126)))
        .collect();
    for _ in 0..300 {
        let e = nobody
            .request_token(pb::RequestTokenRequest {
                scopes: scopes.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let (mut after, mut refused, mut pages) = (0, 0, 0);
    loop {
        let page = a
            .export(pb::ExportRequest {
                page_size: 5000,
                after_seq: after,
                ..Default::default()
            })
            .await
            .expect("every page fits the client's message limit")
            .into_inner();
        pages += 1;
        for r in &page.records {
            if r.action == "token.refused" {
                refused += 1;
                assert_eq!(r.scopes.len(), 1, "only the refused scope is kept");
                assert!(r.reason.contains("64 scopes asked"), "{}", r.reason);
            }
        }
        if page.next_after_seq == 0 {
            break;
        }
        after = page.next_after_seq;
    }
    assert_eq!(
        refused, 300,
        "every refusal is in the trail ({pages} pages)"
    );
    h.stop().await;
}

/// Issue 13: session cookies and decisions never cross a network in the
/// clear — plain HTTP beyond loopback with the console is refused at start.
#[tokio::test]
async fn the_console_is_never_served_as_plain_http_beyond_loopback() {
    let h = Harness::start().await;
    let data = tempfile::tempdir().unwrap();
    let cfg = |tls: bool| {
        let mut cfg = h.config();
        cfg.http_listen = Some("0.0.0.0:0".parse().unwrap());
        cfg.data_dir = data.path().to_owned();
        cfg.http_tls = tls;
        cfg
    };
    let e = portcullis::server::start(cfg(false)).await.err().unwrap();
    assert!(e.to_string().contains("only over HTTPS"), "{e}");
    // With TLS on the HTTP listener it starts, given the URL people use
    // (nobody opens https://0.0.0.0).
    let mut unnamed = cfg(true);
    unnamed.console = Some(portcullis::server::ConsoleOptions::default());
    let e = portcullis::server::start(unnamed).await.err().unwrap();
    assert!(e.to_string().contains("needs --public-url"), "{e}");
    let running = portcullis::server::start(cfg(true)).await.unwrap();
    assert_eq!(
        running.console_url.as_deref(),
        Some("https://portcullis.example.org/ui/")
    );
    running.shutdown().await;
}

/// Sign `who` in to the console with a one-time link, over plain HTTP/1.1
/// as a browser would; the session cookie (`name=value`).
async fn console_session(h: &Harness, who: As) -> String {
    let http = h.running().http_addr.unwrap();
    let mut c = ApprovalsClient::new(h.channel(who).await);
    let url = c
        .create_console_link(pb::CreateConsoleLinkRequest::default())
        .await
        .unwrap()
        .into_inner()
        .url;
    let secret = url.split_once("?t=").unwrap().1.to_owned();
    let (status, cookies, page) = common::http(
        http,
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
    session.split(';').next().unwrap().to_owned()
}

/// Issue 21, finding 6: a person removed from the policy has their console
/// sessions ended at the removal, so adding them back does not revive one;
/// an admin can end a person's sessions at any time; both are recorded.
#[tokio::test]
async fn i21_06_removal_from_the_policy_ends_console_sessions_for_good() {
    let h = Harness::start().await;
    let http = h.running().http_addr.unwrap();
    let mut reloads = h.running().engine.policy_reloads();
    let pending = |cookie: String| async move {
        common::http(http, "GET", "/ui/pending", Some(&cookie), None)
            .await
            .0
    };
    let before = console_session(&h, As::Approver).await;
    assert_eq!(pending(before.clone()).await, 200);

    // Removed, then added back before the session is used again.
    let alice = "approvers = [\"spiffe://portcullis.dev/human/alice\"]";
    let bob = "approvers = [\"spiffe://portcullis.dev/human/bob\"]";
    for (from, to, loaded) in [(alice, bob, 1), (bob, alice, 2)] {
        rewrite_policy(&h, |p| p.replace(from, to));
        tokio::time::timeout(
            Duration::from_secs(30),
            reloads.wait_for(|r| r.loaded >= loaded),
        )
        .await
        .expect("no policy reload within 30 s")
        .unwrap();
    }
    // The swap is acted on by a task of its own: give it its moment.
    let mut ended = false;
    for _ in 0..100 {
        if pending(before.clone()).await == 303 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "the session of a removed person lived on");
    // Signing in again works: the end was of the sessions open then (the
    // harness's clock stands still; a session opened in the very
    // millisecond of an end is ended too).
    h.advance(Duration::from_millis(1)).await;
    let again = console_session(&h, As::Approver).await;
    assert_eq!(pending(again.clone()).await, 200);

    // An admin ends them on purpose; a non-admin cannot, and bad input
    // names its field.
    let mut admin = ApprovalsClient::new(h.channel(As::Admin).await);
    let mut approver = ApprovalsClient::new(h.channel(As::Approver).await);
    let end = |identity: &str, reason: &str| pb::EndConsoleSessionsRequest {
        identity: identity.into(),
        reason: reason.into(),
    };
    let e = approver
        .end_console_sessions(end(portcullis::dev::ADMIN, "coup"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = admin
        .end_console_sessions(end("alice", "laptop lost"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("identity"), "{e:?}");
    let e = admin
        .end_console_sessions(end(portcullis::dev::APPROVER, ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("reason"), "{e:?}");
    assert_eq!(pending(again.clone()).await, 200, "refusals change nothing");
    admin
        .end_console_sessions(end(portcullis::dev::APPROVER, "laptop lost"))
        .await
        .unwrap();
    assert_eq!(pending(again).await, 303);

    // Every end is in the trail: the broker's at each removal, the admin's.
    let mut audit = portcullis::pb::audit_client::AuditClient::new(h.channel(As::Admin).await);
    let records = audit
        .export(pb::ExportRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let ends: Vec<(String, String, String)> = records
        .iter()
        .filter(|r| r.action == "console.sessions_ended")
        .map(|r| (r.actor.clone(), r.target.clone(), r.reason.clone()))
        .collect();
    assert_eq!(
        ends,
        [
            (
                "portcullis".into(),
                portcullis::dev::APPROVER.into(),
                "no longer an approver or admin in the policy".into()
            ),
            // Bob, removed again when Alice came back.
            (
                "portcullis".into(),
                "spiffe://portcullis.dev/human/bob".into(),
                "no longer an approver or admin in the policy".into()
            ),
            (
                portcullis::dev::ADMIN.into(),
                portcullis::dev::APPROVER.into(),
                "laptop lost".into()
            ),
        ]
    );
    h.stop().await;
}

/// Issue 21, findings 3 and 4: console links are rate-limited per identity
/// (RESOURCE_EXHAUSTED, then again after the wait), sign-ins per address
/// (429 with `Retry-After`).
#[tokio::test]
async fn i21_03_console_links_and_sign_ins_are_rate_limited() {
    let h = Harness::start().await;
    let http = h.running().http_addr.unwrap();
    let mut alice = ApprovalsClient::new(h.channel(As::Approver).await);
    let link = pb::CreateConsoleLinkRequest::default();
    let burst = portcullis::server::Limits::default().console_links.burst;
    for _ in 0..burst {
        alice.create_console_link(link.clone()).await.unwrap();
    }
    let e = alice.create_console_link(link.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("try again in 6 s"), "{e:?}");
    // Another identity has its own; and after the wait, one more.
    let mut admin = ApprovalsClient::new(h.channel(As::Admin).await);
    admin.create_console_link(link.clone()).await.unwrap();
    h.advance(Duration::from_secs(6)).await;
    alice.create_console_link(link.clone()).await.unwrap();

    // Sign-in link uses from one address: junk secrets, each refused, until
    // the address is refused before its secret is looked at.
    let burst = portcullis::server::Limits::default().sign_ins.burst;
    for _ in 0..burst {
        let (status, _, _) =
            common::http(http, "POST", "/ui/login/link", None, Some("t=junk".into())).await;
        assert_eq!(status, 401);
    }
    let (status, _, page) =
        common::http(http, "POST", "/ui/login/link", None, Some("t=junk".into())).await;
    assert_eq!(status, 429, "{page}");
    assert!(page.contains("try again in 1 s"), "{page}");
    h.stop().await;
}

/// Issue 21, finding 1: health answers on a listener of its own while the
/// HTTP listener's slots are all taken (the probes of the shipped
/// Kubernetes manifests point there).
#[tokio::test]
async fn i21_01_health_answers_on_its_own_listener_under_a_flood() {
    use tokio::io::AsyncWriteExt as _;
    let mut h = Harness::start().await;
    h.restart_with(|cfg| {
        cfg.conn_limits.http_connections = 4;
        cfg.health_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let http = h.running().http_addr.unwrap();
    let health = h.running().health_addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        raw_get(http, "/healthz").await.is_none(),
        "the HTTP listener is full"
    );
    let ok = raw_get(health, "/healthz").await.unwrap();
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok\n"),
        "{ok}"
    );
    let metrics = raw_get(health, "/metrics").await.unwrap();
    assert!(metrics.contains("portcullis_"), "{metrics}");
    // Health only: no keys, no console there.
    for path in ["/.well-known/jwks.json", "/ui/login"] {
        let r = raw_get(health, path).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
    }
    drop(held);
    h.stop().await;
}

//! Failure under load (issue 11): PostgreSQL crashing and coming back, and
//! a broker process killed with SIGKILL, while clients keep asking. Nothing
//! acknowledged may be lost, no approved token may be delivered twice, the
//! brokers must refuse cleanly (UNAVAILABLE, health NOT_SERVING) while the
//! database is gone and serve again on their own when it is back.
//!
//! The test runs its own PostgreSQL cluster (`.ci/postgres` with another
//! directory and port), so crashing it disturbs no other test. Skipped,
//! saying so, without `PORTCULLIS_TEST_DATABASE_URL` (which `.ci/test`
//! always sets).
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use portcullis::dev::As;
use portcullis::pb;
use portcullis::pb::approvals_client::ApprovalsClient;
use portcullis::pb::audit_client::AuditClient;
use portcullis::pb::broker_client::BrokerClient;
use tonic::transport::Channel;

/// A PostgreSQL cluster of this test's own, removed when dropped.
struct Cluster {
    env: [(&'static str, String); 2],
}

impl Cluster {
    fn ci(&self, verb: &str) -> String {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres"))
            .arg(verb)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            ".ci/postgres {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn start() -> (Self, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Self {
            env: [
                (
                    "PORTCULLIS_PG_DIR",
                    format!("/tmp/portcullis-pg-chaos-{}", std::process::id()),
                ),
                ("PORTCULLIS_PG_PORT", port.to_string()),
            ],
        };
        let url = c.ci("start");
        (c, url)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres"))
            .arg("stop")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status();
    }
}

/// What the load saw: every acknowledged lease, and every refusal's code.
#[derive(Default)]
struct Seen {
    acknowledged: Mutex<Vec<String>>,
    /// Statuses brokers answered with.
    refused: Mutex<BTreeMap<String, usize>>,
    /// Calls cut off by the death of the broker process they were on.
    cut_off: AtomicUsize,
    ok: AtomicUsize,
    /// Set just before the child broker is killed.
    killed: AtomicBool,
}

/// Grant in a loop until `stop`, each ask with its own idempotency key.
async fn load(
    mut c: BrokerClient<Channel>,
    name: String,
    on_child: bool,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let ask = pb::RequestTokenRequest {
            client_request_id: format!("{name}-{n}"),
            ..ask(&["orders.read"])
        };
        match c.request_token(ask).await {
            Ok(r) => {
                if let Some(pb::request_token_response::Outcome::Granted(g)) =
                    r.into_inner().outcome
                {
                    seen.acknowledged.lock().unwrap().push(g.lease.unwrap().id);
                    seen.ok.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) if on_child && seen.killed.load(Ordering::Relaxed) => {
                let _ = e;
                seen.cut_off.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                *seen
                    .refused
                    .lock()
                    .unwrap()
                    .entry(match e.code() {
                        tonic::Code::Unavailable => "Unavailable".to_owned(),
                        other => format!("{other:?}: {}", e.message()),
                    })
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Claim approved requests through two brokers at once until `stop`;
/// every token delivered, by request.
async fn claim(
    mut c: BrokerClient<Channel>,
    ids: Vec<String>,
    delivered: Arc<Mutex<BTreeMap<String, usize>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        for id in &ids {
            if let Ok(r) = c
                .get_request(pb::GetRequestRequest {
                    request_id: id.clone(),
                })
                .await
                && r.into_inner().grant.is_some()
            {
                *delivered.lock().unwrap().entry(id.clone()).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until `ok` has grown by `by` (grants succeed again), or panic.
async fn until_granting(seen: &Seen, by: usize, what: &str) {
    let from = seen.ok.load(Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(30);
    while seen.ok.load(Ordering::Relaxed) < from + by {
        assert!(Instant::now() < until, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_database_and_a_killed_broker_lose_nothing_acknowledged() {
    if postgres_for("a_crashed_database_and_a_killed_broker_lose_nothing_acknowledged").is_none() {
        return;
    }
    let (cluster, url) = Cluster::start();
    let mut h = Harness::start_shared(url.clone(), None).await;
    let (mut child, child_addr) = spawn_broker(&h, Some(&url));
    // Hand the lead to the child process (the one that will be killed): the
    // in-process broker stops, resigning, and comes back as a follower.
    h.halt().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.boot().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !h.running().engine.leads(),
        "the child process took the lead while the other was down"
    );
    let on_child = || {
        let opts = portcullis::client::ClientOpts {
            server: Some(child_addr.clone()),
            ..h.opts(As::Workload)
        };
        async move { BrokerClient::new(opts.connect().await.unwrap()) }
    };

    // Approved requests, to be claimed through both brokers during the chaos.
    let mut parked = Vec::new();
    let mut approver = ApprovalsClient::new(h.channel(As::Approver).await);
    let mut requester = h.broker(As::Workload).await;
    for _ in 0..6 {
        let p = park(&mut requester, &["orders.admin"]).await;
        approver
            .approve(pb::ApproveRequest {
                request_id: p.id.clone(),
                reason: "ok".into(),
                digest: p.digest.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        parked.push(p.id);
    }

    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let client = if i % 2 == 0 {
            h.broker(As::Workload).await
        } else {
            on_child().await
        };
        tasks.push(tokio::spawn(load(
            client,
            format!("client{i}"),
            i % 2 == 1,
            seen.clone(),
            stop.clone(),
        )));
    }
    for client in [h.broker(As::Workload).await, on_child().await] {
        tasks.push(tokio::spawn(claim(
            client,
            parked.clone(),
            delivered.clone(),
            stop.clone(),
        )));
    }
    until_granting(&seen, 50, "no grants before the crash").await;

    // The database dies mid-load: refusals are UNAVAILABLE, health goes
    // NOT_SERVING, nothing is granted.
    cluster.ci("crash");
    let engine = h.running().engine.clone();
    let until = Instant::now() + Duration::from_secs(15);
    while engine.healthy().await {
        assert!(Instant::now() < until, "still healthy without a database");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = |status: &'static str| {
        let addr = h.running().http_addr.unwrap();
        async move {
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                if out.starts_with(status) {
                    return;
                }
                assert!(Instant::now() < until, "/healthz says {out}, not {status}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    health("HTTP/1.1 503").await;
    let before = seen.ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        seen.ok.load(Ordering::Relaxed),
        before,
        "nothing is granted while the database is down"
    );
    cluster.ci("resume");
    until_granting(
        &seen,
        50,
        "the brokers did not serve again after the database came back",
    )
    .await;
    assert!(engine.healthy().await, "healthy again");
    health("HTTP/1.1 200").await;

    // The leading broker process dies without warning (no resignation):
    // the other carries on, and takes the lead once the dead one's term
    // runs out.
    seen.killed.store(true, Ordering::Relaxed);
    child.kill().unwrap();
    let _ = child.wait();
    until_granting(&seen, 50, "the surviving broker stopped granting").await;
    let killed = Instant::now();
    let until = killed + Duration::from_secs(10);
    while !engine.leads() {
        assert!(Instant::now() < until, "the survivor did not take the lead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = killed.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let refused = seen.refused.lock().unwrap().clone();
    let codes: BTreeSet<&str> = refused.keys().map(String::as_str).collect();
    assert!(
        codes.is_subset(&BTreeSet::from(["Unavailable"])),
        "refusals are UNAVAILABLE only: {refused:?}"
    );

    // Every acknowledged grant is there, on the surviving broker.
    let acknowledged = seen.acknowledged.lock().unwrap().clone();
    let mut c = h.broker(As::Workload).await;
    for id in &acknowledged {
        let lease = c
            .get_lease(pb::GetLeaseRequest {
                lease_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged lease {id} lost: {e}"))
            .into_inner()
            .lease
            .unwrap();
        assert_eq!(&lease.id, id);
    }
    // No approved token went out twice.
    for (id, n) in delivered.lock().unwrap().iter() {
        assert_eq!(*n, 1, "request {id} delivered {n} times");
    }
    // One chain, intact across the crash and the kill.
    let v = AuditClient::new(h.channel(As::Admin).await)
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    eprintln!(
        "chaos: {} grants acknowledged, refusals {refused:?}, {} calls cut off by the kill, {} approved tokens delivered once, {} records verified, lead taken over {takeover:?} after the kill",
        acknowledged.len(),
        seen.cut_off.load(Ordering::Relaxed),
        delivered.lock().unwrap().len(),
        v.records
    );
    h.stop().await;
}

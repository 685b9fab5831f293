//! No state without its record (issue 20): a broker process killed with
//! SIGKILL, three times, in the middle of mixed load — grants, parked
//! requests approved or denied, claims, revocations — on sled and on
//! PostgreSQL. Afterwards, read straight from the store: every lease has the
//! record that made it (a grant or a claim) and, if revoked, the record of
//! that; every decided request has its decision record; every issued request
//! its lease; and `Audit.Verify` passes on a broker restarted on the data.
//!
//! The PostgreSQL half is skipped, saying so, without
//! `PORTCULLIS_TEST_DATABASE_URL` (which `.ci/test` always sets).
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use portcullis::client::ClientOpts;
use portcullis::dev::As;
use portcullis::model::{LeaseState, RequestState};
use portcullis::pb;
use portcullis::pb::approvals_client::ApprovalsClient;
use portcullis::pb::audit_client::AuditClient;
use portcullis::pb::broker_client::BrokerClient;
use portcullis::store::{Row, Store, Table};
use tonic::transport::Channel;

fn opts(h: &Harness, addr: &str, who: As) -> ClientOpts {
    ClientOpts {
        server: Some(addr.to_owned()),
        cert: None,
        key: None,
        ca: None,
        dev_dir: Some(h.dev.root.clone()),
        federation_server: None,
        as_: who,
    }
}

/// Calls answered `Ok`, of each kind.
#[derive(Default)]
struct Done {
    /// Leases whose grant was acknowledged.
    granted: std::sync::Mutex<Vec<String>>,
    grants: AtomicUsize,
    revocations: AtomicUsize,
    decisions: AtomicUsize,
    claims: AtomicUsize,
}

/// Grant, and revoke every third lease, until `stop`.
async fn grant_and_revoke(
    mut c: BrokerClient<Channel>,
    name: String,
    done: Arc<Done>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let ask = pb::RequestTokenRequest {
            client_request_id: format!("{name}-{n}"),
            ..ask(&["orders.read"])
        };
        let Ok(r) = c.request_token(ask).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        done.grants.fetch_add(1, Ordering::Relaxed);
        let Some(pb::request_token_response::Outcome::Granted(g)) = r.into_inner().outcome else {
            continue;
        };
        let id = g.lease.unwrap().id;
        done.granted.lock().unwrap().push(id.clone());
        if n.is_multiple_of(3) {
            let revoke = pb::RevokeLeaseRequest {
                lease_id: id,
                reason: "done".into(),
            };
            if c.revoke_lease(revoke).await.is_ok() {
                done.revocations.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Park, approve or deny (alternately), claim what was approved, until
/// `stop`.
async fn park_decide_claim(
    mut c: BrokerClient<Channel>,
    mut approver: ApprovalsClient<Channel>,
    done: Arc<Done>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let Ok(r) = c.request_token(ask(&["orders.admin"])).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Some(pb::request_token_response::Outcome::Pending(p)) = r.into_inner().outcome else {
            continue;
        };
        let decided = if n.is_multiple_of(2) {
            approver
                .approve(pb::ApproveRequest {
                    request_id: p.id.clone(),
                    reason: "ok".into(),
                    digest: p.digest.clone(),
                    ..Default::default()
                })
                .await
                .is_ok()
        } else {
            approver
                .deny(pb::DenyRequest {
                    request_id: p.id.clone(),
                    reason: "no".into(),
                })
                .await
                .is_ok()
        };
        if decided {
            done.decisions.fetch_add(1, Ordering::Relaxed);
        }
        if n.is_multiple_of(2)
            && let Ok(r) = c
                .get_request(pb::GetRequestRequest { request_id: p.id })
                .await
            && r.into_inner().grant.is_some()
        {
            done.claims.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Load the broker at `addr` for a while, then kill it with SIGKILL
/// while the load goes on.
async fn load_then_kill(h: &Harness, child: Child, addr: &str, round: u64, done: &Arc<Done>) {
    let (stop, tasks) = load(h, addr, round, done).await;
    // A different moment in each round.
    tokio::time::sleep(Duration::from_millis(1200 + 350 * round)).await;
    kill_and_stop(child, stop, tasks).await;
}

/// SIGKILL the broker, then stop the load once it has seen the broker go.
async fn kill_and_stop(
    mut child: Child,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    child.kill().unwrap();
    let _ = child.wait();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

/// Start the mixed load on the broker at `addr`: six clients granting and
/// revoking, two parking requests that are decided and claimed.
async fn load(
    h: &Harness,
    addr: &str,
    round: u64,
    done: &Arc<Done>,
) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = BrokerClient::new(opts(h, addr, As::Workload).connect().await.unwrap());
        tasks.push(tokio::spawn(grant_and_revoke(
            c,
            format!("r{round}c{i}"),
            done.clone(),
            stop.clone(),
        )));
    }
    for _ in 0..2 {
        let c = BrokerClient::new(opts(h, addr, As::Workload).connect().await.unwrap());
        let a = ApprovalsClient::new(opts(h, addr, As::Approver).connect().await.unwrap());
        tasks.push(tokio::spawn(park_decide_claim(
            c,
            a,
            done.clone(),
            stop.clone(),
        )));
    }
    (stop, tasks)
}

/// Every record of the trail: (action, target, reason).
async fn trail(store: &dyn Store) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.audit_after(after, 1000).await.unwrap();
        let done = page.len() < 1000;
        for (seq, bytes) in page {
            let r: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            out.push((text("action"), text("target"), text("reason")));
            after = Some(seq);
        }
        if done {
            return out;
        }
    }
}

async fn rows(store: &dyn Store, table: Table) -> Vec<Row> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(table, after.as_deref(), 1000).await.unwrap();
        let done = page.len() < 1000;
        for (k, row) in page {
            after = Some(k);
            out.push(row);
        }
        if done {
            return out;
        }
    }
}

/// The invariants, read from the store: what is there has its record.
async fn check(store: &dyn Store, done: &Done) {
    let records = trail(store).await;
    let has = |action: &str, target: &str| -> bool {
        records.iter().any(|(a, t, _)| a == action && t == target)
    };
    let by_action: BTreeMap<&str, BTreeSet<&str>> =
        records.iter().fold(BTreeMap::new(), |mut m, (a, t, _)| {
            m.entry(a.as_str()).or_default().insert(t.as_str());
            m
        });
    let claimed: BTreeSet<String> = records
        .iter()
        .filter(|(a, _, _)| a == "request.issued")
        .filter_map(|(_, _, reason)| reason.strip_prefix("lease ").map(str::to_owned))
        .collect();
    let empty = BTreeSet::new();
    let granted = by_action.get("token.granted").unwrap_or(&empty);
    let (mut leases, mut revoked, mut requests) = (0, 0, 0);
    let mut missing = Vec::new();
    for row in rows(store, Table::Leases).await {
        let Row::Lease(l) = row else { continue };
        leases += 1;
        if !granted.contains(l.id.as_str()) && !claimed.contains(&l.id) {
            missing.push(format!("lease {} has no grant or issue record", l.id));
        }
        if l.state == LeaseState::Revoked {
            revoked += 1;
            if !has("lease.revoked", &l.id) {
                missing.push(format!("revoked lease {} has no revocation record", l.id));
            }
        }
    }
    for row in rows(store, Table::Requests).await {
        let Row::Request(r) = row else { continue };
        requests += 1;
        if !has("request.parked", &r.id) {
            missing.push(format!("request {} has no parked record", r.id));
        }
        let decision = match r.state {
            RequestState::Approved | RequestState::Issued => Some("request.approved"),
            RequestState::Denied => Some("request.denied"),
            _ => None,
        };
        if let Some(action) = decision
            && !has(action, &r.id)
        {
            missing.push(format!(
                "{} request {} has no {action} record",
                r.state.name(),
                r.id
            ));
        }
        if r.state == RequestState::Issued {
            let lease = match r.lease_id.as_deref() {
                Some(id) => store.lease(id).await.unwrap(),
                None => None,
            };
            if lease.is_none() || !has("request.issued", &r.id) {
                missing.push(format!("issued request {} lacks its lease or record", r.id));
            }
        }
    }
    eprintln!(
        "after the kills: {leases} leases ({revoked} revoked), {requests} requests, {} records; acknowledged {} grants, {} revocations, {} decisions, {} claims",
        records.len(),
        done.grants.load(Ordering::Relaxed),
        done.revocations.load(Ordering::Relaxed),
        done.decisions.load(Ordering::Relaxed),
        done.claims.load(Ordering::Relaxed),
    );
    assert!(missing.is_empty(), "state without its record: {missing:#?}");
    // And nothing acknowledged is missing.
    let granted_ids: Vec<String> = done.granted.lock().unwrap().iter().cloned().collect();
    for id in &granted_ids {
        assert!(
            store.lease(id).await.unwrap().is_some(),
            "acknowledged lease {id} lost"
        );
        assert!(
            granted.contains(id.as_str()),
            "acknowledged lease {id} has no record"
        );
    }
    assert!(
        leases > 100 && revoked > 0 && requests > 0,
        "the load did too little to prove anything"
    );
}

/// `Audit.Verify` on a broker started on the data afterwards.
async fn verify(h: &mut Harness) {
    h.boot().await;
    let v = AuditClient::new(h.channel(As::Admin).await)
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    h.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_mixed_load_leaves_no_state_without_its_record_on_sled() {
    let mut h = Harness::start().await;
    // The child processes use the harness's sled directory.
    h.halt().await;
    let done = Arc::new(Done::default());
    for round in 0..3 {
        let (child, addr) = spawn_broker(&h, None);
        load_then_kill(&h, child, &addr, round, &done).await;
    }
    verify(&mut h).await;
    let store = portcullis::store::sled_store::SledStore::open(&h.dev.data()).unwrap();
    check(&store, &done).await;
}

/// Killed in the middle of writing a batch (issue 22): a debug build's
/// failpoint stops sled's writer after the group's journal frame, its slot
/// and half its changes were written, with sled's buffers written out — so
/// sled itself holds half a group — and the test SIGKILLs the process
/// there, under load. After two more ordinary kills (which lose what sled
/// had not written out, for the journal to give back), every acknowledged
/// grant is there with its record, nothing is there without its record,
/// and the trail verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_in_the_middle_of_a_batch_on_sled_leaves_no_state_without_its_record() {
    let mut h = Harness::start().await;
    h.halt().await;
    let done = Arc::new(Done::default());
    let (child, addr, lines) =
        spawn_broker_with(&h, None, &[("PORTCULLIS_FAILPOINT", "sled-mid-group:400")]);
    let (stop, tasks) = load(&h, &addr, 9, &done).await;
    let reached = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(l) if l.contains("failpoint reached") => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(reached, "the writer never reached the failpoint");
    kill_and_stop(child, stop, tasks).await;
    for round in 1..3 {
        let (child, addr) = spawn_broker(&h, None);
        load_then_kill(&h, child, &addr, round, &done).await;
    }
    verify(&mut h).await;
    let store = portcullis::store::sled_store::SledStore::open(&h.dev.data()).unwrap();
    check(&store, &done).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_mixed_load_leaves_no_state_without_its_record_on_postgres() {
    let Some(url) =
        scratch_database("sigkill_under_mixed_load_leaves_no_state_without_its_record_on_postgres")
    else {
        return;
    };
    let mut h = Harness::start_shared(url.clone(), None).await;
    h.halt().await;
    let done = Arc::new(Done::default());
    for round in 0..3 {
        let (child, addr) = spawn_broker(&h, Some(&url));
        load_then_kill(&h, child, &addr, round, &done).await;
    }
    verify(&mut h).await;
    let store =
        portcullis::store::postgres::PgStore::connect(&portcullis::store::postgres::PgOptions {
            url,
            ca_file: None,
            pool_size: 2,
        })
        .await
        .unwrap();
    check(&store, &done).await;
}

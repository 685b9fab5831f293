//! Durable lease writes through the store and group commit, without gRPC:
//! `cargo bench --bench store -- [writers] [seconds]` (default 64, 5).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark driver")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portcullis::model::{KeyRecord, KeyState, Lease, LeaseState};
use portcullis::store::batch::applied;
use portcullis::store::commit::GroupCommit;
use portcullis::store::sled_store::SledStore;
use portcullis::store::{Applied, Batch, Store, Write};

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let writers = args.first().copied().unwrap_or(64);
    let secs = args.get(1).copied().unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    // The key the leases name: a lease signed by a key the store does not
    // hold as signing is refused.
    let key = KeyRecord {
        kid: "kid".into(),
        alg: "ES256".into(),
        state: KeyState::Active,
        public: vec![],
        sealed_private: vec![],
        created_at: 0,
        activated_at: Some(0),
        retire_at: None,
    };
    let out = applied(store.apply(Batch {
        writes: vec![Write::PutKey(key)],
        ..Batch::default()
    }))
    .await
    .unwrap();
    assert!(matches!(out, Applied::Done(_)));
    let cancel = tokio_util::sync::CancellationToken::new();
    let (gc, _t) = GroupCommit::start(store.clone(), cancel.clone());
    let count = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, gc, count) = (store.clone(), gc.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < end {
                let id = format!("l_{w:04}_{i:012}");
                i += 1;
                let lease = Lease {
                    id,
                    subject: format!("spiffe://bench.test/w/{w}"),
                    client_id: String::new(),
                    scopes: vec!["orders.read".into()],
                    audience: "bench".into(),
                    justification: String::new(),
                    issued_at: 1,
                    expires_at: 1_000_000 + i,
                    max_expires_at: 2_000_000,
                    ttl_ms: 300_000,
                    state: LeaseState::Active,
                    kid: "kid".into(),
                    renewals: 0,
                    token_issued_at: 1,
                    revoked_at: None,
                    revoked_by: None,
                    revoke_reason: None,
                    expired_at: None,
                    request_id: None,
                    approved_by: vec![],
                    break_glass: false,
                    token_mac: None,
                    delegation: None,
                    cnf: None,
                    login: None,
                };
                let out = applied(store.apply(Batch {
                    writes: vec![Write::CreateLease { lease, idem: None }],
                    ..Batch::default()
                }))
                .await
                .unwrap();
                assert!(matches!(out, Applied::Done(_)));
                gc.durable().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = count.load(Ordering::Relaxed);
    let st = gc.stats();
    println!(
        "{writers} writers: {:.0} durable lease writes/s; {} syncs, {:.1} writes per sync",
        n as f64 / secs as f64,
        st.syncs,
        st.writes as f64 / st.syncs.max(1) as f64
    );
}

//! Bulk revocation and expiry at scale, against a real sled directory.
//!
//! `cargo bench --bench bulk_revoke -- [N] [D]` (defaults 100000 and
//! 10000): creates N active leases for one subject, then times
//! `RevokeLeases` (through the engine, durable at the end) and a
//! restart-style reopen of the store; then builds a delegation tree of D
//! descendants under one lease (100 children, the rest their children) and
//! times revoking its root, which ends the whole tree (issue 12).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark driver")]

use std::sync::Arc;
use std::time::Instant;

use portcullis::clock::{Clock, SystemClock};
use portcullis::engine::{Engine, Parts};
use portcullis::identity::Identity;
use portcullis::keys::{Kek, KeyRing, SigningAlg};
use portcullis::model::{Lease, LeaseState};
use portcullis::policy::Policy;
use portcullis::store::batch::applied;
use portcullis::store::commit::GroupCommit;
use portcullis::store::sled_store::SledStore;
use portcullis::store::{Applied, Batch, Due, Store, Write};

#[tokio::main]
async fn main() {
    let numbers: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let n = numbers.first().copied().unwrap_or(100_000);
    let d = numbers.get(1).copied().unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let subject = "spiffe://bench.test/ns/a/sa/b";
    let now = SystemClock.now();
    let (kek, _) = Kek::generate().unwrap();
    let ring = Arc::new(
        KeyRing::load_or_create(store.as_ref(), &kek, SigningAlg::Es256, now)
            .await
            .unwrap(),
    );
    let kid = ring.current().active.kid.clone();
    let t = Instant::now();
    for i in 0..n {
        let lease = Lease {
            id: format!("l_{now:012x}{i:020x}"),
            subject: subject.into(),
            client_id: subject.into(),
            scopes: vec!["orders.read".into()],
            audience: "bench".into(),
            justification: String::new(),
            issued_at: now,
            expires_at: now + 3_600_000 + i as u64,
            max_expires_at: now + 7_200_000,
            ttl_ms: 3_600_000,
            state: LeaseState::Active,
            kid: kid.clone(),
            renewals: 0,
            token_issued_at: now,
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
        put(store.as_ref(), Write::CreateLease { lease, idem: None }).await;
    }
    store.sync().await.unwrap();
    println!("created {n} leases in {:.2?}", t.elapsed());

    let policy = Policy::parse(
        "[broker]\nadmins = [\"a\"]\n[groups]\na = [\"spiffe://bench.test/human/admin\"]\n",
    )
    .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (commit, flusher) = GroupCommit::start(store.clone(), cancel.clone());
    let engine = Arc::new(Engine::new(Parts {
        store: store.clone(),
        commit,
        policy,
        keys: ring,
        clock: Arc::new(SystemClock),
        issuer: "https://bench".into(),
        audit: portcullis::audit::AuditLog::open(store.as_ref())
            .await
            .unwrap(),
        limits: Default::default(),
    }));
    let admin = Identity::parse("spiffe://bench.test/human/admin").unwrap();

    let t = Instant::now();
    let (revoked, _) = engine.revoke_all(&admin, subject, "bench").await.unwrap();
    let took = t.elapsed();
    assert_eq!(revoked as usize, n);
    println!(
        "bulk revoke: {revoked} leases in {took:.2?} ({:.0} leases/s), durable",
        revoked as f64 / took.as_secs_f64()
    );
    assert!(
        store.next_deadline(Due::Leases).await.unwrap().is_none(),
        "expiry index emptied"
    );
    cascade(&engine, store.as_ref(), d, now, &kid).await;
    cancel.cancel();
    flusher.await.unwrap();
    drop(engine);
    drop(store);

    let t = Instant::now();
    let reopened = SledStore::open(dir.path()).unwrap();
    let next = reopened.next_deadline(Due::Leases).await.unwrap();
    println!(
        "reopen + next deadline: {:.2?} (next = {next:?})",
        t.elapsed()
    );
}

/// A root lease of an agent with `d` descendants (100 children, the rest
/// spread under them); revoking the root ends all of them, durably.
async fn cascade(engine: &Engine, store: &dyn Store, d: usize, now: u64, kid: &str) {
    let agent = "spiffe://bench.test/agent/a";
    let lease = |id: String, subject: &str, parent: Option<(&str, u32)>| Lease {
        delegation: parent.map(|(p, depth)| portcullis::model::Delegation {
            parent_id: p.to_owned(),
            depth,
            actors: vec![agent.to_owned()],
        }),
        ..Lease::active(
            id,
            subject,
            &portcullis::model::Terms {
                scopes: vec!["orders.read".into()],
                audience: "bench".into(),
                justification: String::new(),
                ttl_ms: 3_600_000,
                max_ttl_ms: 7_200_000,
            },
            now,
            kid,
        )
    };
    let root = format!("l_{now:012x}root");
    put(
        store,
        Write::CreateLease {
            lease: lease(root.clone(), agent, None),
            idem: None,
        },
    )
    .await;
    let children = d.min(100);
    for c in 0..children {
        let child = format!("l_{now:012x}c{c:06}");
        let lease = lease(child, "spiffe://bench.test/tool/t", Some((&root, 1)));
        put(store, Write::CreateLease { lease, idem: None }).await;
    }
    for g in 0..d - children {
        let parent = format!("l_{now:012x}c{:06}", g % children);
        let id = format!("l_{now:012x}g{g:08}");
        let lease = lease(id, "spiffe://bench.test/tool/u", Some((&parent, 2)));
        put(store, Write::CreateLease { lease, idem: None }).await;
    }
    store.sync().await.unwrap();
    let t = Instant::now();
    engine
        .revoke(&Identity::parse(agent).unwrap(), &root, "bench")
        .await
        .unwrap();
    let took = t.elapsed();
    let mut still = 0;
    for id in store
        .children(&format!("l_{now:012x}c{:06}", 0), None, usize::MAX)
        .await
        .unwrap()
    {
        still += usize::from(store.lease(&id).await.unwrap().unwrap().state == LeaseState::Active);
    }
    assert_eq!(still, 0, "every descendant ended");
    println!("cascade: revoking one lease ended {d} descendants in {took:.2?}, durable");
}

/// One write, applied and waited for.
async fn put(store: &dyn Store, w: Write) {
    let out = applied(store.apply(Batch {
        writes: vec![w],
        ..Batch::default()
    }))
    .await
    .unwrap();
    assert!(matches!(out, Applied::Done(_)), "{out:?}");
}

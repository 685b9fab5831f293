// Test-only: declared `#[cfg(test)] pub(crate) mod conformance;` in store/mod.rs.
//! One suite every [`Store`] backend must pass, following the split of the
//! contract: the tests of one part ([`LeaseStore`], [`RequestStore`],
//! [`AuditStore`], [`KeyStore`]) see only that part, so a new backend
//! (PostgreSQL) can be brought up one part at a time; the cross-part tests
//! (idempotency, retention, metadata) come after. A new backend adds one
//! line to `backends()` below.

use super::mem::MemStore;
use super::sled_store::SledStore;
use super::*;
use crate::model::*;

fn backends() -> Vec<(&'static str, Box<dyn Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(dir.path()).unwrap();
    let mut all: Vec<(&'static str, Box<dyn Store>, Option<tempfile::TempDir>)> = vec![
        ("mem", Box::new(MemStore::new()), None),
        ("sled", Box::new(sled), Some(dir)),
    ];
    if let Some(pg) = postgres_store() {
        all.push(("postgres", Box::new(pg), None));
    }
    all
}

/// A PostgreSQL store on a database of its own, when the tests were given
/// one; otherwise says once, on stderr, that these runs were skipped.
pub(crate) fn postgres_store() -> Option<super::postgres::PgStore> {
    use super::postgres::{PgOptions, PgStore, TEST_DATABASE_ENV, scratch_database};
    static SKIPPED: std::sync::Once = std::sync::Once::new();
    let Ok(base) = std::env::var(TEST_DATABASE_ENV) else {
        SKIPPED.call_once(|| {
            eprintln!(
                "SKIPPED: store conformance on PostgreSQL ({TEST_DATABASE_ENV} is not set; `.ci/postgres start` prints a URL for it)"
            );
        });
        return None;
    };
    let url = scratch_database(&base).unwrap();
    Some(
        PgStore::connect(&PgOptions {
            url,
            ca_file: None,
            pool_size: 4,
        })
        .unwrap(),
    )
}

/// A signing key record `kid`, ACTIVE (its key material is never read by
/// a store).
pub(crate) fn test_key(kid: &str) -> KeyRecord {
    KeyRecord {
        kid: kid.into(),
        alg: "ES256".into(),
        state: KeyState::Active,
        public: vec![1],
        sealed_private: vec![2],
        created_at: 0,
        activated_at: Some(0),
        retire_at: None,
    }
}

/// Store [`test_key`] `kid`, which test leases name.
pub(crate) fn put_test_key(s: &dyn Store, kid: &str) {
    batch::write_one(s, Write::PutKey(test_key(kid))).unwrap();
}

/// The writes of the earlier per-call contract, as one-write batches
/// through [`Store::apply`]: the tests read as before and exercise the
/// real apply path. A lease whose key the store lacks gets [`test_key`]
/// first (tests make leases before keys).
pub(crate) trait TestWrites {
    fn create_lease(
        &self,
        l: &Lease,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError>;
    fn swap_lease(&self, c: &Lease, n: &Lease) -> Result<bool, StoreError>;
    fn create_request(
        &self,
        r: &TokenRequest,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError>;
    fn swap_request(&self, c: &TokenRequest, n: &TokenRequest) -> Result<bool, StoreError>;
    fn put_key(&self, k: &KeyRecord) -> Result<(), StoreError>;
    fn delete_key(&self, kid: &str) -> Result<(), StoreError>;
    fn put_meta(&self, n: &str, v: &[u8]) -> Result<(), StoreError>;
    fn put_checkpoint(&self, seq: u64, jws: &[u8]) -> Result<(), StoreError>;
    fn append_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;
}

fn one(w: Write) -> Batch {
    Batch {
        writes: vec![w],
        ..Batch::default()
    }
}

impl<S: Store + ?Sized> TestWrites for S {
    fn create_lease(
        &self,
        l: &Lease,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let w = Write::CreateLease {
            lease: l.clone(),
            idem: i.cloned(),
        };
        let mut out = batch::wait(self.apply((one(w.clone())).clone()))?;
        if let Applied::Lost(Lost::KeyInactive(kid)) = &out {
            batch::write_one(self, Write::PutKey(test_key(kid)))?;
            out = batch::wait(self.apply((one(w)).clone()))?;
        }
        match out {
            Applied::Done(_) => Ok(None),
            Applied::Lost(Lost::Idempotency(e)) => Ok(Some(e)),
            Applied::Lost(l) => Err(StoreError::Unavailable(format!("{l:?}"))),
        }
    }
    fn swap_lease(&self, c: &Lease, n: &Lease) -> Result<bool, StoreError> {
        let w = Write::SwapLease {
            old: c.clone(),
            new: n.clone(),
        };
        Ok(matches!(
            batch::wait(self.apply((one(w)).clone()))?,
            Applied::Done(_)
        ))
    }
    fn create_request(
        &self,
        r: &TokenRequest,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let w = Write::CreateRequest {
            req: r.clone(),
            idem: i.cloned(),
        };
        match batch::wait(self.apply((one(w)).clone()))? {
            Applied::Done(_) => Ok(None),
            Applied::Lost(Lost::Idempotency(e)) => Ok(Some(e)),
            Applied::Lost(l) => Err(StoreError::Unavailable(format!("{l:?}"))),
        }
    }
    fn swap_request(&self, c: &TokenRequest, n: &TokenRequest) -> Result<bool, StoreError> {
        let w = Write::SwapRequest {
            old: c.clone(),
            new: n.clone(),
        };
        Ok(matches!(
            batch::wait(self.apply((one(w)).clone()))?,
            Applied::Done(_)
        ))
    }
    fn put_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        batch::write_one(self, Write::PutKey(k.clone()))
    }
    fn delete_key(&self, kid: &str) -> Result<(), StoreError> {
        batch::write_one(self, Write::DeleteKey(kid.into()))
    }
    fn put_meta(&self, n: &str, v: &[u8]) -> Result<(), StoreError> {
        batch::write_one(self, Write::PutMeta(n.into(), v.to_vec()))
    }
    fn put_checkpoint(&self, seq: u64, jws: &[u8]) -> Result<(), StoreError> {
        batch::write_one(self, Write::PutCheckpoint(seq, jws.to_vec()))
    }
    fn append_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        batch::write_one(self, Write::CopyAudit(seq, bytes.to_vec()))
    }
}

pub(crate) fn lease(id: &str, subject: &str, expires_at: Millis) -> Lease {
    Lease {
        id: id.into(),
        subject: subject.into(),
        client_id: subject.into(),
        scopes: vec!["a".into()],
        audience: "aud".into(),
        justification: String::new(),
        issued_at: 0,
        expires_at,
        max_expires_at: expires_at * 2,
        ttl_ms: expires_at,
        state: LeaseState::Active,
        kid: "k".into(),
        renewals: 0,
        token_issued_at: 0,
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
    }
}

fn request(id: &str, deadline: Millis) -> TokenRequest {
    TokenRequest {
        id: id.into(),
        requester: "spiffe://t/w".into(),
        scopes: vec!["s".into()],
        ttl_ms: 1000,
        max_ttl_ms: 2000,
        audience: "aud".into(),
        justification: String::new(),
        state: RequestState::Pending,
        created_at: 0,
        deadline,
        waiting_for: vec![],
        approvals: vec![],
        lease_id: None,
        digest: "d".into(),
        history: vec![],
        client_request_id: None,
        break_glass: false,
        review_pending: false,
        reviewed_by: None,
        review_reason: None,
        delegation: None,
    }
}

fn idem(key: &str, outcome: IdempotentOutcome) -> Idempotency {
    Idempotency {
        caller: "spiffe://t/w".into(),
        key: key.into(),
        params_digest: "p".into(),
        outcome,
    }
}

/// A lease delegated from `parent` at `depth`.
fn child(id: &str, parent: &str, depth: u32, expires_at: Millis) -> Lease {
    Lease {
        delegation: Some(Delegation {
            parent_id: parent.into(),
            depth,
            actors: vec!["spiffe://t/a".into()],
        }),
        cnf: Some("thumb".into()),
        ..lease(id, "spiffe://t/tool", expires_at)
    }
}

#[test]
fn delegated_leases_are_found_from_their_parent_and_keep_their_chain() {
    for (name, s, _dir) in backends() {
        s.create_lease(&lease("l_root", "spiffe://t/a", 100), None)
            .unwrap();
        for (id, parent, depth) in [
            ("l_c2", "l_root", 1),
            ("l_c1", "l_root", 1),
            ("l_g1", "l_c1", 2),
        ] {
            s.create_lease(&child(id, parent, depth, 90), None).unwrap();
        }
        // Through the idempotent path too.
        assert!(
            s.create_lease(
                &child("l_c3", "l_root", 1, 90),
                Some(&idem("k", IdempotentOutcome::Lease("l_c3".into())))
            )
            .unwrap()
            .is_none()
        );
        assert_eq!(
            s.children("l_root", None, 10).unwrap(),
            ["l_c1", "l_c2", "l_c3"],
            "{name}"
        );
        assert_eq!(
            s.children("l_root", Some("l_c1"), 1).unwrap(),
            ["l_c2"],
            "{name}: pages"
        );
        assert_eq!(s.children("l_c1", None, 10).unwrap(), ["l_g1"], "{name}");
        assert!(s.children("l_c2", None, 10).unwrap().is_empty(), "{name}");
        assert!(
            s.children("l_ro", None, 10).unwrap().is_empty(),
            "{name}: no prefix match"
        );
        assert_eq!(
            s.lease("l_g1").unwrap().unwrap(),
            child("l_g1", "l_c1", 2, 90),
            "{name}: chain and binding survive"
        );
        // An ended child leaves the index when retention removes it.
        let c2 = s.lease("l_c2").unwrap().unwrap();
        let ended = Lease {
            state: LeaseState::Revoked,
            revoked_at: Some(10),
            ..c2.clone()
        };
        assert!(s.swap_lease(&c2, &ended).unwrap(), "{name}");
        assert_eq!(s.purge_leases(20).unwrap(), 1, "{name}");
        assert_eq!(
            s.children("l_root", None, 10).unwrap(),
            ["l_c1", "l_c3"],
            "{name}"
        );
    }
}

#[test]
fn leases_create_read_list_and_page() {
    for (name, s, _dir) in backends() {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        for (i, id) in ["l_3", "l_1", "l_2"].iter().enumerate() {
            assert!(
                s.create_lease(&lease(id, "spiffe://t/a", 100 + i as u64), None)
                    .unwrap()
                    .is_none()
            );
        }
        s.create_lease(&lease("l_9", "spiffe://t/ab", 5), None)
            .unwrap();
        assert_eq!(
            s.lease("l_1").unwrap().unwrap().subject,
            "spiffe://t/a",
            "{name}"
        );
        assert!(s.lease("missing").unwrap().is_none(), "{name}");
        let all: Vec<String> = s
            .leases_of("spiffe://t/a", None, 10)
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(
            all,
            ["l_1", "l_2", "l_3"],
            "{name}: prefix must not leak into spiffe://t/ab"
        );
        let page: Vec<String> = s
            .leases_of("spiffe://t/a", Some("l_1"), 1)
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(page, ["l_2"], "{name}");
        assert!(
            s.leases_of("spiffe://t/none", None, 10).unwrap().is_empty(),
            "{name}"
        );
    }
}

#[test]
fn idempotency_key_is_claimed_once_and_writes_nothing_the_second_time() {
    for (name, s, _dir) in backends() {
        let first = idem("k1", IdempotentOutcome::Lease("l_1".into()));
        assert!(
            s.create_lease(&lease("l_1", "spiffe://t/a", 10), Some(&first))
                .unwrap()
                .is_none()
        );
        let again = idem("k1", IdempotentOutcome::Lease("l_2".into()));
        let existing = s
            .create_lease(&lease("l_2", "spiffe://t/a", 10), Some(&again))
            .unwrap();
        assert_eq!(existing, Some(first.clone()), "{name}");
        assert!(
            s.lease("l_2").unwrap().is_none(),
            "{name}: second lease must not be written"
        );
        // Keys are shared between leases and requests of one caller.
        let r = s.create_request(&request("r_1", 10), Some(&again)).unwrap();
        assert_eq!(r, Some(first), "{name}");
        assert!(s.request("r_1").unwrap().is_none(), "{name}");
    }
}

#[test]
fn swap_is_compare_and_swap_and_keeps_the_expiry_index() {
    for (name, s, _dir) in backends() {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        let a = lease("l_a", "spiffe://t/a", 50);
        let b = lease("l_b", "spiffe://t/a", 20);
        s.create_lease(&a, None).unwrap();
        s.create_lease(&b, None).unwrap();
        assert_eq!(s.next_lease_deadline().unwrap(), Some(20), "{name}");
        assert_eq!(s.leases_due(49, 10).unwrap(), ["l_b"], "{name}");
        assert_eq!(s.leases_due(50, 10).unwrap(), ["l_b", "l_a"], "{name}");
        assert_eq!(s.leases_due(50, 1).unwrap(), ["l_b"], "{name}: limit");

        // Renew b to 80: index moves.
        let renewed = Lease {
            expires_at: 80,
            ..b.clone()
        };
        assert!(s.swap_lease(&b, &renewed).unwrap(), "{name}");
        assert!(
            !s.swap_lease(&b, &renewed).unwrap(),
            "{name}: stale current must fail"
        );
        assert_eq!(s.leases_due(79, 10).unwrap(), ["l_a"], "{name}");
        // Revoke a: leaves the index.
        let revoked = Lease {
            state: LeaseState::Revoked,
            ..a.clone()
        };
        assert!(s.swap_lease(&a, &revoked).unwrap(), "{name}");
        assert_eq!(s.leases_due(1000, 10).unwrap(), ["l_b"], "{name}");
        assert_eq!(s.next_lease_deadline().unwrap(), Some(80), "{name}");
        assert_eq!(
            s.lease("l_a").unwrap().unwrap().state,
            LeaseState::Revoked,
            "{name}"
        );
    }
}

#[test]
fn a_parked_delegation_keeps_its_chain() {
    for (name, s, _dir) in backends() {
        let s: &dyn Store = s.as_ref();
        let chain = crate::model::Delegation {
            parent_id: "l_parent".into(),
            depth: 2,
            actors: vec!["spiffe://t/tool".into(), "spiffe://t/agent".into()],
        };
        let r = TokenRequest {
            delegation: Some(chain.clone()),
            ..request("r_d", 30)
        };
        s.create_request(&r, None).unwrap();
        let back = s.request("r_d").unwrap().unwrap();
        assert_eq!(back.delegation, Some(chain), "{name}");
        assert_eq!(back, r, "{name}");
    }
}

#[test]
fn requests_index_only_non_terminal() {
    for (name, s, _dir) in backends() {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        let r = request("r_1", 30);
        s.create_request(&r, None).unwrap();
        s.create_request(&request("r_2", 40), None).unwrap();
        assert_eq!(s.next_request_deadline().unwrap(), Some(30), "{name}");
        assert_eq!(s.requests_due(35, 10).unwrap(), ["r_1"], "{name}");
        assert_eq!(
            s.count_open_requests().unwrap(),
            2,
            "{name}: two open requests"
        );
        let done = TokenRequest {
            state: RequestState::Expired,
            ..r.clone()
        };
        assert!(s.swap_request(&r, &done).unwrap(), "{name}");
        assert!(!s.swap_request(&r, &done).unwrap(), "{name}");
        assert_eq!(s.requests_due(100, 10).unwrap(), ["r_2"], "{name}");
        assert_eq!(
            s.request("r_1").unwrap().unwrap().state,
            RequestState::Expired,
            "{name}"
        );
    }
}

#[test]
fn open_requests_track_decisions_claims_and_reviews() {
    for (name, s, _dir) in backends() {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        let a = request("r_a", 10);
        let b = request("r_b", 20);
        let c = TokenRequest {
            state: RequestState::Issued,
            break_glass: true,
            review_pending: true,
            ..request("r_c", 30)
        };
        let d = TokenRequest {
            state: RequestState::Denied,
            ..request("r_d", 40)
        };
        for r in [&a, &b, &c, &d] {
            s.create_request(r, None).unwrap();
        }
        let ids = |v: Vec<TokenRequest>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.open_requests(None, 10).unwrap()),
            ["r_a", "r_b", "r_c"],
            "{name}"
        );
        assert_eq!(
            ids(s.open_requests(Some("r_a"), 1).unwrap()),
            ["r_b"],
            "{name}"
        );
        let approved = TokenRequest {
            state: RequestState::Approved,
            ..a.clone()
        };
        assert!(s.swap_request(&a, &approved).unwrap());
        assert_eq!(
            s.open_requests(None, 10).unwrap().len(),
            3,
            "{name}: approved still open (claim)"
        );
        let issued = TokenRequest {
            state: RequestState::Issued,
            ..approved.clone()
        };
        assert!(s.swap_request(&approved, &issued).unwrap());
        let reviewed = TokenRequest {
            review_pending: false,
            ..c.clone()
        };
        assert!(s.swap_request(&c, &reviewed).unwrap());
        assert_eq!(ids(s.open_requests(None, 10).unwrap()), ["r_b"], "{name}");
    }
}

#[test]
fn audit_records_keep_sequence_order() {
    for (name, s, _dir) in backends() {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        assert!(s.audit_last().unwrap().is_none(), "{name}");
        for seq in [1u64, 2, 3, 256, 257] {
            s.append_audit(seq, format!("r{seq}").as_bytes()).unwrap();
        }
        let all: Vec<u64> = s
            .audit_after(None, 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            all,
            [1, 2, 3, 256, 257],
            "{name}: numeric, not lexicographic, order"
        );
        let page = s.audit_after(Some(3), 1).unwrap();
        assert_eq!(page, vec![(256, b"r256".to_vec())], "{name}");
        assert_eq!(
            s.audit_last().unwrap(),
            Some((257, b"r257".to_vec())),
            "{name}"
        );
        s.put_checkpoint(3, b"jws").unwrap();
        assert_eq!(
            s.checkpoints().unwrap(),
            vec![(3, b"jws".to_vec())],
            "{name}"
        );
        s.put_checkpoint(9, b"jws9").unwrap();
        s.put_checkpoint(300, b"jws300").unwrap();
        let between = |a, b| -> Vec<u64> {
            s.checkpoints_between(a, b)
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect()
        };
        assert_eq!(between(3, 300), [9, 300], "{name}: after is excluded");
        assert_eq!(between(0, 9), [3, 9], "{name}");
        assert!(between(9, 9).is_empty(), "{name}");
    }
}

#[test]
fn retention_purges_only_what_ended_before_the_cutoff() {
    for (name, s, _dir) in backends() {
        let active = lease("l_a", "spiffe://t/a", 10);
        let gone = Lease {
            state: LeaseState::Revoked,
            revoked_at: Some(5),
            ..lease("l_b", "spiffe://t/a", 50)
        };
        let recent = Lease {
            state: LeaseState::Expired,
            expired_at: Some(90),
            ..lease("l_c", "spiffe://t/a", 90)
        };
        for l in [&active, &gone, &recent] {
            s.create_lease(l, None).unwrap();
        }
        let old_req = TokenRequest {
            state: RequestState::Denied,
            ..request("r_old", 1)
        };
        let open_req = request("r_open", 1);
        s.create_request(&old_req, None).unwrap();
        s.create_request(&open_req, None).unwrap();
        assert_eq!(s.purge_ended(60).unwrap(), (1, 1), "{name}");
        assert!(s.lease("l_b").unwrap().is_none(), "{name}");
        assert!(
            s.lease("l_a").unwrap().is_some() && s.lease("l_c").unwrap().is_some(),
            "{name}"
        );
        let ids: Vec<String> = s
            .leases_of("spiffe://t/a", None, 10)
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, ["l_a", "l_c"], "{name}");
        assert!(
            s.request("r_old").unwrap().is_none() && s.request("r_open").unwrap().is_some(),
            "{name}"
        );
    }
}

#[test]
fn keys_and_meta() {
    for (name, s, _dir) in backends() {
        assert!(s.keys().unwrap().is_empty(), "{name}");
        let k = KeyRecord {
            kid: "k1".into(),
            alg: "ES256".into(),
            state: KeyState::Active,
            public: vec![4; 65],
            sealed_private: vec![1, 2, 3],
            created_at: 1,
            activated_at: Some(1),
            retire_at: None,
        };
        s.put_key(&k).unwrap();
        assert_eq!(s.keys().unwrap(), vec![k], "{name}");
        put_test_key(s.as_ref(), "k");
        s.create_lease(&lease("l_k", "spiffe://t/a", 9), None)
            .unwrap();
        assert_eq!(s.active_leases_signed_by("k").unwrap(), ["l_k"], "{name}");
        assert!(
            s.active_leases_signed_by("other").unwrap().is_empty(),
            "{name}"
        );
        s.delete_key("k1").unwrap();
        assert_eq!(s.keys().unwrap(), vec![test_key("k")], "{name}");
        s.put_meta("x", b"y").unwrap();
        assert_eq!(s.meta("x").unwrap().as_deref(), Some(&b"y"[..]), "{name}");
        s.sync().unwrap();
    }
}

#[test]
fn console_secrets_live_until_their_end_and_are_taken_once() {
    for (name, s, _dir) in backends() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        s.put_ephemeral(&a, b"session", 100).unwrap();
        s.put_ephemeral(&b, b"link", 100).unwrap();
        s.put_ephemeral(&c, b"old", 10).unwrap();
        assert_eq!(
            s.ephemeral(&a, 99).unwrap().as_deref(),
            Some(&b"session"[..]),
            "{name}"
        );
        assert_eq!(
            s.ephemeral(&a, 100).unwrap(),
            None,
            "{name}: ended at its end"
        );
        assert_eq!(s.ephemeral(&[9; 32], 0).unwrap(), None, "{name}");
        // Replaced, not duplicated.
        s.put_ephemeral(&a, b"session 2", 200).unwrap();
        assert_eq!(
            s.ephemeral(&a, 150).unwrap().as_deref(),
            Some(&b"session 2"[..]),
            "{name}"
        );
        // Taken once.
        assert_eq!(
            s.take_ephemeral(&b, 50).unwrap().as_deref(),
            Some(&b"link"[..]),
            "{name}"
        );
        assert_eq!(s.take_ephemeral(&b, 50).unwrap(), None, "{name}: once");
        // An ended one is gone when taken, and not returned.
        assert_eq!(s.take_ephemeral(&c, 50).unwrap(), None, "{name}");
        s.put_ephemeral(&c, b"old", 10).unwrap();
        assert_eq!(s.purge_ephemeral(50).unwrap(), 1, "{name}: only what ended");
        assert_eq!(
            s.ephemeral(&a, 150).unwrap().as_deref(),
            Some(&b"session 2"[..]),
            "{name}"
        );
        assert_eq!(s.purge_ephemeral(500).unwrap(), 1, "{name}");

        // Eight takers at once (brokers sharing the store): one gets it.
        let d = [4u8; 32];
        s.put_ephemeral(&d, b"link", 1_000).unwrap();
        let store = &*s;
        let got: usize = std::thread::scope(|sc| {
            let takers: Vec<_> = (0..8)
                .map(|_| sc.spawn(|| store.take_ephemeral(&d, 10).unwrap().is_some()))
                .collect();
            takers
                .into_iter()
                .map(|t| usize::from(t.join().unwrap()))
                .sum()
        });
        assert_eq!(got, 1, "{name}: taken once");
    }
}

#[test]
fn sled_keeps_everything_across_reopen_and_refuses_unknown_schema() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        s.create_lease(&lease("l_1", "spiffe://t/a", 7), None)
            .unwrap();
        s.create_request(&request("r_1", 9), None).unwrap();
        s.sync().unwrap();
    }
    {
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.lease("l_1").unwrap().unwrap().expires_at, 7);
        assert_eq!(s.next_lease_deadline().unwrap(), Some(7));
        assert_eq!(s.next_request_deadline().unwrap(), Some(9));
        s.put_meta("schema_version", b"99").unwrap();
        s.sync().unwrap();
    }
    match SledStore::open(dir.path()) {
        Err(StoreError::Schema { found: 99, .. }) => {}
        other => panic!("expected a schema error, got {:?}", other.err()),
    }
}

#[test]
fn sled_upgrades_a_schema_one_store_and_reads_its_json_leases() {
    let dir = tempfile::tempdir().unwrap();
    let old = lease("l_old", "spiffe://t/a", 7);
    {
        // What a schema 1 broker left: JSON leases, version "1".
        let s = SledStore::open(dir.path()).unwrap();
        s.create_lease(&old, None).unwrap();
        s.leases
            .insert("l_old", serde_json::to_vec(&old).unwrap())
            .unwrap();
        s.put_meta("schema_version", b"1").unwrap();
        s.sync().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    // Opening and reading change nothing: a build that then fails to start
    // leaves the store to the version that wrote it.
    assert_eq!(s.lease("l_old").unwrap().unwrap(), old);
    assert_eq!(s.meta("schema_version").unwrap().unwrap(), b"1");
    let new = lease("l_new", "spiffe://t/a", 8);
    s.create_lease(&new, None).unwrap();
    assert_eq!(
        s.meta("schema_version").unwrap().unwrap(),
        SCHEMA_VERSION.to_string().as_bytes()
    );
    assert_eq!(s.leases.get("l_new").unwrap().unwrap()[0], 0x01);
    assert_eq!(s.lease("l_new").unwrap().unwrap(), new);
    let both: Vec<_> = s
        .leases_of("spiffe://t/a", None, 10)
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(both, ["l_new", "l_old"]);
    // A lease read in either format swaps like any other.
    let revoked = Lease {
        state: LeaseState::Revoked,
        ..old.clone()
    };
    assert!(s.swap_lease(&old, &revoked).unwrap());
    assert_eq!(s.lease("l_old").unwrap().unwrap(), revoked);
    s.put_meta("schema_version", b"not a number").unwrap();
    s.sync().unwrap();
    drop(s);
    assert!(matches!(
        SledStore::open(dir.path()),
        Err(StoreError::Schema { found: 0, .. })
    ));
}

#[test]
fn sled_drops_expiry_entries_a_crash_left_behind() {
    // What a crash between the index write and the lease write leaves.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    s.create_lease(&lease("l_1", "spiffe://t/a", 7), None)
        .unwrap();
    s.lease_expiry.insert(deadline_key(5, "l_0"), &[]).unwrap();
    // What a crash inside `swap_lease` leaves: an entry at a stale time, and
    // one for a lease that is no longer active.
    s.create_lease(&lease("l_2", "spiffe://t/a", 20), None)
        .unwrap();
    s.lease_expiry.insert(deadline_key(6, "l_2"), &[]).unwrap();
    let gone = lease("l_3", "spiffe://t/a", 8);
    s.create_lease(&gone, None).unwrap();
    s.leases
        .insert(
            "l_3",
            encode(&Lease {
                state: LeaseState::Revoked,
                ..gone
            })
            .unwrap(),
        )
        .unwrap();
    assert_eq!(s.leases_due(10, 10).unwrap(), ["l_1"]);
    assert_eq!(
        s.leases_due(100, 10).unwrap(),
        ["l_1", "l_2"],
        "stale entries removed"
    );
    assert_eq!(s.lease_expiry.len(), 2);
}

#[test]
fn corrupt_record_is_reported_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    s.create_lease(&lease("l_1", "spiffe://t/a", 7), None)
        .unwrap();
    s.leases.insert("l_1", &b"{not json"[..]).unwrap();
    assert!(matches!(
        s.lease("l_1"),
        Err(StoreError::Corrupt { tree: "leases", .. })
    ));
}

#[tokio::test]
async fn group_commit_batches_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
    let cancel = tokio_util::sync::CancellationToken::new();
    let (gc, task) = commit::GroupCommit::start(store.clone(), cancel.clone());
    let s = store.clone();
    tokio::task::spawn_blocking(move || put_test_key(s.as_ref(), "k"))
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..200 {
        let (gc, store) = (gc.clone(), store.clone());
        handles.push(tokio::spawn(async move {
            let lease = lease(&format!("l_{i:04}"), "spiffe://t/a", 5);
            let done = batch::applied(store.apply(Batch {
                writes: vec![Write::CreateLease { lease, idem: None }],
                ..Batch::default()
            }))
            .await
            .unwrap();
            assert!(matches!(done, Applied::Done(_)));
            gc.durable().await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let stats = gc.stats();
    assert_eq!(stats.writes, 200);
    assert!(stats.syncs >= 1 && stats.syncs <= 200, "{stats:?}");
    cancel.cancel();
    task.await.unwrap();
    // After shutdown nothing more can be acknowledged.
    assert!(gc.durable().await.is_err());
}

/// A store whose `sync` fails while `.1` is set: writers must get an error.
/// Everything else is the memory store's.
pub(crate) struct FailingSync(
    pub(crate) MemStore,
    pub(crate) std::sync::atomic::AtomicBool,
);

impl std::ops::Deref for FailingSync {
    type Target = MemStore;
    fn deref(&self) -> &MemStore {
        &self.0
    }
}

crate::store::delegate_reads!(FailingSync);

impl Store for FailingSync {
    fn apply(&self, b: Batch) -> Applying {
        self.0.apply(b)
    }
    fn meta(&self, n: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.meta(n)
    }
    fn scan(
        &self,
        t: Table,
        a: Option<&[u8]>,
        l: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        self.0.scan(t, a, l)
    }
    fn sync(&self) -> Result<(), StoreError> {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Unavailable("disk on fire".into()))
        } else {
            Ok(())
        }
    }
}

/// A store that fails in the middle of applying every batch it is given
/// (halfway through its writes), as a full disk or a lost connection would.
pub(crate) struct FailMidway(pub(crate) Box<dyn Store>);

impl std::ops::Deref for FailMidway {
    type Target = dyn Store;
    fn deref(&self) -> &dyn Store {
        self.0.as_ref()
    }
}

crate::store::delegate_reads!(FailMidway);

impl Store for FailMidway {
    fn apply(&self, mut b: Batch) -> Applying {
        b.writes.insert(b.writes.len() / 2, Write::Fail);
        self.0.apply(b)
    }
    fn meta(&self, n: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.meta(n)
    }
    fn scan(
        &self,
        t: Table,
        a: Option<&[u8]>,
        l: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        self.0.scan(t, a, l)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.0.sync()
    }
}

/// An audit body as `audit::body_json` writes it.
fn body(action: &str) -> Vec<u8> {
    format!(r#"{{"at":1,"actor":"a","action":"{action}","target":"","scopes":[],"outcome":"ok","reason":"","rule":"","peer":"","call_id":""}}"#).into_bytes()
}

/// Pages of rows and of the trail.
type Seen = (
    Vec<(Vec<u8>, Row)>,
    Vec<(Vec<u8>, Row)>,
    Vec<(Vec<u8>, Row)>,
    Vec<(u64, Vec<u8>)>,
);

/// Everything a reader can see of a store's leases, requests and trail.
fn visible(s: &dyn Store) -> Seen {
    (
        s.scan(Table::Leases, None, 100).unwrap(),
        s.scan(Table::Requests, None, 100).unwrap(),
        s.scan(Table::Idempotency, None, 100).unwrap(),
        s.audit_after(None, 100).unwrap(),
    )
}

/// One operation's worth of writes on the leases `l_1` (made here) and a
/// new `l_2`, a new request with a claimed key, and two records.
fn operation(s: &dyn Store) -> Batch {
    put_test_key(s, "k");
    s.create_lease(&lease("l_1", "spiffe://t/a", 10), None)
        .unwrap();
    let l1 = s.lease("l_1").unwrap().unwrap();
    let mut revoked = l1.clone();
    revoked.state = LeaseState::Revoked;
    Batch {
        writes: vec![
            Write::SwapLease {
                old: l1,
                new: revoked,
            },
            Write::CreateLease {
                lease: lease("l_2", "spiffe://t/b", 20),
                idem: None,
            },
            Write::CreateRequest {
                req: request("r_1", 30),
                idem: Some(Idempotency {
                    caller: "spiffe://t/a".into(),
                    key: "k1".into(),
                    params_digest: "d".into(),
                    outcome: IdempotentOutcome::Request("r_1".into()),
                }),
            },
        ],
        audit: vec![body("lease.revoked"), body("token.granted")],
        fence: None,
    }
}

#[test]
fn a_batch_that_fails_midway_leaves_nothing_visible_and_the_chain_whole() {
    for (name, s, _dir) in backends() {
        let batch = operation(s.as_ref());
        let before = visible(s.as_ref());
        let failing = FailMidway(s);
        assert!(
            matches!(
                batch::wait(failing.apply((batch).clone())),
                Err(StoreError::Unavailable(_))
            ),
            "{name}"
        );
        assert!(
            visible(failing.0.as_ref()) == before,
            "{name}: a failed batch left something"
        );
        // The same batch then applies whole, its records chained right
        // after the last one (the failure moved no head).
        let s = failing.0;
        let Applied::Done(records) = batch::wait(s.apply((batch).clone())).unwrap() else {
            panic!("{name}: the batch did not apply");
        };
        assert_eq!(
            records.iter().map(|r| r.0).collect::<Vec<_>>(),
            [1, 2],
            "{name}"
        );
        assert_eq!(s.audit_after(None, 10).unwrap(), records, "{name}");
        assert_eq!(
            s.lease("l_1").unwrap().unwrap().state,
            LeaseState::Revoked,
            "{name}"
        );
        assert!(
            s.lease("l_2").unwrap().is_some() && s.request("r_1").unwrap().is_some(),
            "{name}"
        );
        let second = String::from_utf8(records[1].1.clone()).unwrap();
        let prev = format!("\"prev\":\"{}\"", crate::chain::sha256_hex(&records[0].1));
        assert!(second.ends_with(&format!("{prev}}}")), "{name}: {second}");
    }
}

#[test]
fn a_lost_check_anywhere_in_a_batch_writes_none_of_it() {
    for (name, s, _dir) in backends() {
        let batch = operation(s.as_ref());
        let before = visible(s.as_ref());
        // A stale compare-and-swap at the end.
        let mut stale = batch.clone();
        let Write::SwapLease { old, new } = batch.writes[0].clone() else {
            unreachable!()
        };
        // (Later writes see earlier ones: `old` is no longer what is stored.)
        stale.writes.push(Write::SwapLease { old, new });
        assert_eq!(
            batch::wait(s.apply((stale).clone())).unwrap(),
            Applied::Lost(Lost::Lease("l_1".into())),
            "{name}"
        );
        assert!(visible(s.as_ref()) == before, "{name}");
        // A taken key: nothing of the batch, the entry that holds it back.
        let Write::CreateRequest { idem: Some(i), .. } = &batch.writes[2] else {
            unreachable!()
        };
        let mut holder = i.clone();
        holder.outcome = IdempotentOutcome::Lease("l_other".into());
        batch::write_one(s.as_ref(), Write::CopyRow(Row::Idempotency(holder.clone()))).unwrap();
        let before = visible(s.as_ref());
        assert_eq!(
            batch::wait(s.apply((batch).clone())).unwrap(),
            Applied::Lost(Lost::Idempotency(holder)),
            "{name}"
        );
        assert!(visible(s.as_ref()) == before, "{name}");
    }
}

#[test]
fn a_lease_or_renewal_signed_by_a_withdrawn_key_writes_none_of_the_batch() {
    for (name, s, _dir) in backends() {
        let batch = operation(s.as_ref());
        let before = visible(s.as_ref());
        // A new lease signed by a key that no longer signs.
        let mut withdrawn = test_key("k");
        withdrawn.state = KeyState::Withdrawn;
        s.put_key(&withdrawn).unwrap();
        let mut late = batch.clone();
        late.writes.truncate(2);
        assert_eq!(
            batch::wait(s.apply((late).clone())).unwrap(),
            Applied::Lost(Lost::KeyInactive("k".into())),
            "{name}"
        );
        assert!(visible(s.as_ref()) == before, "{name}");
        // A renewal signed by it: refused too (the token would leave).
        let l1 = s.lease("l_1").unwrap().unwrap();
        let mut renewed = l1.clone();
        renewed.token_issued_at += 1;
        renewed.renewals += 1;
        let renewal = Batch {
            writes: vec![Write::SwapLease {
                old: l1.clone(),
                new: renewed,
            }],
            ..Batch::default()
        };
        assert_eq!(
            batch::wait(s.apply(renewal)).unwrap(),
            Applied::Lost(Lost::KeyInactive("k".into())),
            "{name}"
        );
        assert_eq!(s.lease("l_1").unwrap().unwrap(), l1, "{name}");
    }
}

/// Renew `l0` (to renewal `i + 1`) and make lease `l_new<i>`, recorded.
fn renewal(i: u32, l0: Lease) -> Batch {
    let mut renewed = l0.clone();
    renewed.renewals = i + 1;
    Batch {
        writes: vec![
            Write::CreateLease {
                lease: lease(&format!("l_new{i}"), "spiffe://t/b", 20),
                idem: None,
            },
            Write::SwapLease {
                old: l0,
                new: renewed,
            },
        ],
        audit: vec![body("lease.renewed")],
        fence: None,
    }
}

/// Eight operations at once on the same lease (PostgreSQL puts them in one
/// group transaction): one wins; every other leaves nothing, and the
/// winner's records chain on.
#[test]
fn concurrent_batches_on_one_record_one_wins_and_the_rest_leave_nothing() {
    for (name, s, _dir) in backends() {
        put_test_key(s.as_ref(), "k");
        s.create_lease(&lease("l_0", "spiffe://t/a", 10), None)
            .unwrap();
        let l0 = s.lease("l_0").unwrap().unwrap();
        let s: std::sync::Arc<dyn Store> = std::sync::Arc::from(s);
        let outcomes: Vec<Applied> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (s, l0) = (s.clone(), l0.clone());
                    scope.spawn(move || batch::wait(s.apply((renewal(i, l0)).clone())).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Applied::Done(_)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(won.len(), 1, "{name}: {outcomes:?}");
        for (i, o) in outcomes.iter().enumerate() {
            let made = s.lease(&format!("l_new{i}")).unwrap().is_some();
            match o {
                Applied::Done(records) => {
                    assert!(made, "{name}");
                    assert_eq!(records.len(), 1, "{name}");
                }
                Applied::Lost(lost) => {
                    assert_eq!(lost, &Lost::Lease("l_0".into()), "{name}");
                    assert!(!made, "{name}: a lost batch left its lease");
                }
            }
        }
        let trail = s.audit_after(None, 100).unwrap();
        assert_eq!(trail.len(), 1, "{name}: only the winner's record");
        assert_eq!(
            s.lease("l_0").unwrap().unwrap().renewals as usize,
            won[0] + 1,
            "{name}"
        );
    }
}

#[test]
fn a_stale_leader_is_fenced_on_a_shared_store() {
    let Some(s) = postgres_store() else { return };
    let g1 = s.lead("upkeep", "a", 60_000).unwrap().unwrap();
    assert_eq!(
        s.lead("upkeep", "a", 60_000).unwrap(),
        Some(g1),
        "a renewal keeps the term"
    );
    assert_eq!(s.lead("upkeep", "b", 60_000).unwrap(), None, "held by a");
    let fenced = |holder: &str, generation| Batch {
        writes: vec![Write::PutMeta("m".into(), holder.as_bytes().to_vec())],
        audit: vec![body("audit.compacted")],
        fence: Some(Fence {
            role: "upkeep".into(),
            holder: holder.into(),
            generation,
        }),
    };
    assert!(matches!(
        batch::wait(s.apply((fenced("a", g1)).clone())).unwrap(),
        Applied::Done(_)
    ));
    // a's term ends (it stalled, or gave up); b takes the role.
    s.resign("upkeep", "a").unwrap();
    let g2 = s.lead("upkeep", "b", 60_000).unwrap().unwrap();
    assert!(g2 > g1);
    let last = s.audit_last().unwrap();
    assert_eq!(
        batch::wait(s.apply((fenced("a", g1)).clone())).unwrap(),
        Applied::Lost(Lost::Fenced)
    );
    assert_eq!(s.meta("m").unwrap().as_deref(), Some(&b"a"[..]));
    assert_eq!(
        s.audit_last().unwrap(),
        last,
        "no record of the fenced batch"
    );
    assert!(matches!(
        batch::wait(s.apply((fenced("b", g2)).clone())).unwrap(),
        Applied::Done(_)
    ));
    // a comes back and takes the role again: a new term, not its old one.
    s.resign("upkeep", "b").unwrap();
    let g3 = s.lead("upkeep", "a", 60_000).unwrap().unwrap();
    assert!(g3 > g2);
    assert_eq!(
        batch::wait(s.apply((fenced("a", g1)).clone())).unwrap(),
        Applied::Lost(Lost::Fenced)
    );
}

pub(crate) fn failing_store() -> std::sync::Arc<dyn Store> {
    std::sync::Arc::new(FailingSync(
        MemStore::new(),
        std::sync::atomic::AtomicBool::new(true),
    ))
}

#[tokio::test]
async fn failed_sync_is_reported_to_every_writer_in_the_batch() {
    let store = failing_store();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (gc, _task) = commit::GroupCommit::start(store.clone(), cancel.clone());
    store
        .create_lease(&lease("l_1", "spiffe://t/a", 5), None)
        .unwrap();
    assert!(matches!(
        gc.durable().await,
        Err(StoreError::Unavailable(_))
    ));
    cancel.cancel();
}

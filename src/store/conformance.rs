// Test-only: declared `#[cfg(test)] pub(crate) mod conformance;` in store/mod.rs.
//! One suite every [`Store`] backend must pass: leases, requests, the
//! trail, keys, metadata and console secrets read back as written; batches
//! apply whole, lose a check, or fail midway leaving nothing visible. A new
//! backend adds one line to `backends()` below.

use super::mem::MemStore;
use super::sled_store::SledStore;
use super::*;
use crate::model::*;

async fn backends() -> Vec<(&'static str, Box<dyn Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(dir.path()).unwrap();
    let mut all: Vec<(&'static str, Box<dyn Store>, Option<tempfile::TempDir>)> = vec![
        ("mem", Box::new(MemStore::new()), None),
        ("sled", Box::new(sled), Some(dir)),
    ];
    if let Some(pg) = postgres_store().await {
        all.push(("postgres", Box::new(pg), None));
    }
    all
}

/// A PostgreSQL store on a database of its own, when the tests were given
/// one; otherwise says once, on stderr, that these runs were skipped.
pub(crate) async fn postgres_store() -> Option<super::postgres::PgStore> {
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
    let url = scratch_database(&base).await.unwrap();
    Some(
        PgStore::connect(&PgOptions {
            url,
            ca_file: None,
            pool_size: 4,
        })
        .await
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
pub(crate) async fn put_test_key(s: &dyn Store, kid: &str) {
    batch::write_one(s, Write::PutKey(test_key(kid)))
        .await
        .unwrap();
}

/// The writes of the earlier per-call contract, as one-write batches
/// through [`Store::apply`]: the tests read as before and exercise the
/// real apply path. A lease whose key the store lacks gets [`test_key`]
/// first (tests make leases before keys).
#[async_trait::async_trait]
pub(crate) trait TestWrites {
    async fn create_lease(
        &self,
        l: &Lease,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError>;
    async fn swap_lease(&self, c: &Lease, n: &Lease) -> Result<bool, StoreError>;
    async fn create_request(
        &self,
        r: &TokenRequest,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError>;
    async fn swap_request(&self, c: &TokenRequest, n: &TokenRequest) -> Result<bool, StoreError>;
    async fn put_key(&self, k: &KeyRecord) -> Result<(), StoreError>;
    async fn delete_key(&self, kid: &str) -> Result<(), StoreError>;
    async fn put_meta(&self, n: &str, v: &[u8]) -> Result<(), StoreError>;
    async fn put_checkpoint(&self, seq: u64, jws: &[u8]) -> Result<(), StoreError>;
    async fn append_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;
    /// Apply `b` and wait for the outcome.
    async fn apply_now(&self, b: Batch) -> Result<Applied, StoreError>;
}

fn one(w: Write) -> Batch {
    Batch {
        writes: vec![w],
        ..Batch::default()
    }
}

#[async_trait::async_trait]
impl<S: Store + ?Sized> TestWrites for S {
    async fn create_lease(
        &self,
        l: &Lease,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let w = Write::CreateLease {
            lease: l.clone(),
            idem: i.cloned(),
        };
        let mut out = self.apply_now(one(w.clone())).await?;
        if let Applied::Lost(Lost::KeyInactive(kid)) = &out {
            batch::write_one(self, Write::PutKey(test_key(kid))).await?;
            out = self.apply_now(one(w)).await?;
        }
        match out {
            Applied::Done(_) => Ok(None),
            Applied::Lost(Lost::Idempotency(e)) => Ok(Some(e)),
            Applied::Lost(l) => Err(StoreError::Unavailable(format!("{l:?}"))),
        }
    }
    async fn swap_lease(&self, c: &Lease, n: &Lease) -> Result<bool, StoreError> {
        let w = Write::SwapLease {
            old: c.clone(),
            new: n.clone(),
        };
        Ok(matches!(self.apply_now(one(w)).await?, Applied::Done(_)))
    }
    async fn create_request(
        &self,
        r: &TokenRequest,
        i: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let w = Write::CreateRequest {
            req: r.clone(),
            idem: i.cloned(),
        };
        match self.apply_now(one(w)).await? {
            Applied::Done(_) => Ok(None),
            Applied::Lost(Lost::Idempotency(e)) => Ok(Some(e)),
            Applied::Lost(l) => Err(StoreError::Unavailable(format!("{l:?}"))),
        }
    }
    async fn swap_request(&self, c: &TokenRequest, n: &TokenRequest) -> Result<bool, StoreError> {
        let w = Write::SwapRequest {
            old: c.clone(),
            new: n.clone(),
        };
        Ok(matches!(self.apply_now(one(w)).await?, Applied::Done(_)))
    }
    async fn put_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        batch::write_one(self, Write::PutKey(k.clone())).await
    }
    async fn delete_key(&self, kid: &str) -> Result<(), StoreError> {
        batch::write_one(self, Write::DeleteKey(kid.into())).await
    }
    async fn put_meta(&self, n: &str, v: &[u8]) -> Result<(), StoreError> {
        batch::write_one(self, Write::PutMeta(n.into(), v.to_vec())).await
    }
    async fn put_checkpoint(&self, seq: u64, jws: &[u8]) -> Result<(), StoreError> {
        batch::write_one(self, Write::PutCheckpoint(seq, jws.to_vec())).await
    }
    async fn append_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        batch::write_one(self, Write::CopyAudit(seq, bytes.to_vec())).await
    }
    async fn apply_now(&self, b: Batch) -> Result<Applied, StoreError> {
        batch::applied(self.apply(b)).await
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
        login: None,
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
        sign_in: None,
        claim_digest: None,
    }
}

/// An open request `id` by `who`.
fn request_by(id: &str, who: &str) -> TokenRequest {
    TokenRequest {
        requester: who.into(),
        ..request(id, 10)
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

#[tokio::test]
async fn delegated_leases_are_found_from_their_parent_and_keep_their_chain() {
    for (name, s, _dir) in backends().await {
        s.create_lease(&lease("l_root", "spiffe://t/a", 100), None)
            .await
            .unwrap();
        for (id, parent, depth) in [
            ("l_c2", "l_root", 1),
            ("l_c1", "l_root", 1),
            ("l_g1", "l_c1", 2),
        ] {
            s.create_lease(&child(id, parent, depth, 90), None)
                .await
                .unwrap();
        }
        // Through the idempotent path too.
        assert!(
            s.create_lease(
                &child("l_c3", "l_root", 1, 90),
                Some(&idem("k", IdempotentOutcome::Lease("l_c3".into())))
            )
            .await
            .unwrap()
            .is_none()
        );
        // (parent, after, limit): children; `l_ro` is no prefix match.
        for (parent, after, limit, want) in [
            ("l_root", None, 10, &["l_c1", "l_c2", "l_c3"][..]),
            ("l_root", Some("l_c1"), 1, &["l_c2"][..]),
            ("l_c1", None, 10, &["l_g1"][..]),
            ("l_c2", None, 10, &[][..]),
            ("l_ro", None, 10, &[][..]),
        ] {
            let got = s.children(parent, after, limit).await.unwrap();
            assert_eq!(got, want, "{name}: {parent} after {after:?}");
        }
        assert_eq!(
            s.lease("l_g1").await.unwrap().unwrap(),
            child("l_g1", "l_c1", 2, 90),
            "{name}: chain and binding survive"
        );
        // An ended child leaves the index when retention removes it.
        let c2 = s.lease("l_c2").await.unwrap().unwrap();
        let ended = Lease {
            state: LeaseState::Revoked,
            revoked_at: Some(10),
            ..c2.clone()
        };
        assert!(s.swap_lease(&c2, &ended).await.unwrap(), "{name}");
        s.apply_now(one(Write::DeleteLease(ended))).await.unwrap();
        assert_eq!(
            s.children("l_root", None, 10).await.unwrap(),
            ["l_c1", "l_c3"],
            "{name}"
        );
    }
}

#[tokio::test]
async fn leases_create_read_list_and_page() {
    for (name, s, _dir) in backends().await {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        for (i, id) in ["l_3", "l_1", "l_2"].iter().enumerate() {
            assert!(
                s.create_lease(&lease(id, "spiffe://t/a", 100 + i as u64), None)
                    .await
                    .unwrap()
                    .is_none()
            );
        }
        s.create_lease(&lease("l_9", "spiffe://t/ab", 5), None)
            .await
            .unwrap();
        assert_eq!(
            s.lease("l_1").await.unwrap().unwrap().subject,
            "spiffe://t/a",
            "{name}"
        );
        assert!(s.lease("missing").await.unwrap().is_none(), "{name}");
        let all: Vec<String> = s
            .leases_of("spiffe://t/a", None, 10)
            .await
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
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(page, ["l_2"], "{name}");
        assert!(
            s.leases_of("spiffe://t/none", None, 10)
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn idempotency_key_is_claimed_once_and_writes_nothing_the_second_time() {
    for (name, s, _dir) in backends().await {
        let first = idem("k1", IdempotentOutcome::Lease("l_1".into()));
        assert!(
            s.create_lease(&lease("l_1", "spiffe://t/a", 10), Some(&first))
                .await
                .unwrap()
                .is_none()
        );
        let again = idem("k1", IdempotentOutcome::Lease("l_2".into()));
        let existing = s
            .create_lease(&lease("l_2", "spiffe://t/a", 10), Some(&again))
            .await
            .unwrap();
        assert_eq!(existing, Some(first.clone()), "{name}");
        assert!(
            s.lease("l_2").await.unwrap().is_none(),
            "{name}: second lease must not be written"
        );
        // Keys are shared between leases and requests of one caller.
        let r = s
            .create_request(&request("r_1", 10), Some(&again))
            .await
            .unwrap();
        assert_eq!(r, Some(first), "{name}");
        assert!(s.request("r_1").await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn swap_is_compare_and_swap_and_keeps_the_expiry_index() {
    for (name, s, _dir) in backends().await {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        let a = lease("l_a", "spiffe://t/a", 50);
        let b = lease("l_b", "spiffe://t/a", 20);
        s.create_lease(&a, None).await.unwrap();
        s.create_lease(&b, None).await.unwrap();
        assert_eq!(
            s.next_deadline(Due::Leases).await.unwrap(),
            Some(20),
            "{name}"
        );
        assert_eq!(s.due(Due::Leases, 49, 10).await.unwrap(), ["l_b"], "{name}");
        assert_eq!(
            s.due(Due::Leases, 50, 10).await.unwrap(),
            ["l_b", "l_a"],
            "{name}"
        );
        assert_eq!(
            s.due(Due::Leases, 50, 1).await.unwrap(),
            ["l_b"],
            "{name}: limit"
        );

        // Renew b to 80: index moves.
        let renewed = Lease {
            expires_at: 80,
            ..b.clone()
        };
        assert!(s.swap_lease(&b, &renewed).await.unwrap(), "{name}");
        assert!(
            !s.swap_lease(&b, &renewed).await.unwrap(),
            "{name}: stale current must fail"
        );
        assert_eq!(s.due(Due::Leases, 79, 10).await.unwrap(), ["l_a"], "{name}");
        // Revoke a: leaves the index.
        let revoked = Lease {
            state: LeaseState::Revoked,
            ..a.clone()
        };
        assert!(s.swap_lease(&a, &revoked).await.unwrap(), "{name}");
        assert_eq!(
            s.due(Due::Leases, 1000, 10).await.unwrap(),
            ["l_b"],
            "{name}"
        );
        assert_eq!(
            s.next_deadline(Due::Leases).await.unwrap(),
            Some(80),
            "{name}"
        );
        assert_eq!(
            s.lease("l_a").await.unwrap().unwrap().state,
            LeaseState::Revoked,
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_parked_delegation_keeps_its_chain() {
    for (name, s, _dir) in backends().await {
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
        s.create_request(&r, None).await.unwrap();
        let back = s.request("r_d").await.unwrap().unwrap();
        assert_eq!(back.delegation, Some(chain), "{name}");
        assert_eq!(back, r, "{name}");
    }
}

#[tokio::test]
async fn requests_index_only_non_terminal() {
    for (name, s, _dir) in backends().await {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        let r = request("r_1", 30);
        s.create_request(&r, None).await.unwrap();
        s.create_request(&request("r_2", 40), None).await.unwrap();
        assert_eq!(
            s.next_deadline(Due::Requests).await.unwrap(),
            Some(30),
            "{name}"
        );
        assert_eq!(
            s.due(Due::Requests, 35, 10).await.unwrap(),
            ["r_1"],
            "{name}"
        );
        assert_eq!(s.counts().await.unwrap().1, 2, "{name}: two open requests");
        let done = TokenRequest {
            state: RequestState::Expired,
            ..r.clone()
        };
        assert!(s.swap_request(&r, &done).await.unwrap(), "{name}");
        assert!(!s.swap_request(&r, &done).await.unwrap(), "{name}");
        assert_eq!(
            s.due(Due::Requests, 100, 10).await.unwrap(),
            ["r_2"],
            "{name}"
        );
        assert_eq!(
            s.request("r_1").await.unwrap().unwrap().state,
            RequestState::Expired,
            "{name}"
        );
    }
}

#[tokio::test]
async fn open_requests_track_decisions_claims_and_reviews() {
    for (name, s, _dir) in backends().await {
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
            s.create_request(r, None).await.unwrap();
        }
        let ids = |v: Vec<TokenRequest>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.open_requests(None, 10).await.unwrap()),
            ["r_a", "r_b", "r_c"],
            "{name}"
        );
        assert_eq!(
            ids(s.open_requests(Some("r_a"), 1).await.unwrap()),
            ["r_b"],
            "{name}"
        );
        let approved = TokenRequest {
            state: RequestState::Approved,
            ..a.clone()
        };
        assert!(s.swap_request(&a, &approved).await.unwrap());
        assert_eq!(
            s.open_requests(None, 10).await.unwrap().len(),
            3,
            "{name}: approved still open (claim)"
        );
        let issued = TokenRequest {
            state: RequestState::Issued,
            ..approved.clone()
        };
        assert!(s.swap_request(&approved, &issued).await.unwrap());
        let reviewed = TokenRequest {
            review_pending: false,
            ..c.clone()
        };
        assert!(s.swap_request(&c, &reviewed).await.unwrap());
        assert_eq!(
            ids(s.open_requests(None, 10).await.unwrap()),
            ["r_b"],
            "{name}"
        );
    }
}

/// Issue 21, finding 6: the open requests of one identity — as requester,
/// or as the holder who made an exchange for another — are read through
/// an index that follows every change (and, on sled, is rebuilt at open).
#[tokio::test]
async fn open_requests_of_follow_their_requester_and_maker() {
    for (name, s, dir) in backends().await {
        let s: &dyn Store = s.as_ref();
        let a = request_by("r_a", "spiffe://t/w1");
        let b = request_by("r_b", "spiffe://t/w2");
        let c = TokenRequest {
            delegation: Some(crate::model::Delegation {
                parent_id: "l_p".into(),
                depth: 1,
                actors: vec!["spiffe://t/w1".into()],
            }),
            ..request_by("r_c", "spiffe://t/w3")
        };
        let d = TokenRequest {
            state: RequestState::Denied,
            ..request_by("r_d", "spiffe://t/w1")
        };
        // A name that starts with another's is not that identity.
        let e = request_by("r_e", "spiffe://t/w1x");
        for r in [&a, &b, &c, &d, &e] {
            s.create_request(r, None).await.unwrap();
        }
        let of = |who: &'static str, after: Option<&'static str>, n: usize| async move {
            s.open_requests_of(who, after, n)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            of("spiffe://t/w1", None, 10).await,
            ["r_a", "r_c"],
            "{name}"
        );
        assert_eq!(
            of("spiffe://t/w1", Some("r_a"), 10).await,
            ["r_c"],
            "{name}"
        );
        assert_eq!(of("spiffe://t/w1", None, 1).await, ["r_a"], "{name}");
        assert_eq!(of("spiffe://t/w3", None, 10).await, ["r_c"], "{name}");
        assert_eq!(of("spiffe://t/w2", None, 10).await, ["r_b"], "{name}");
        assert!(of("spiffe://t/nobody", None, 10).await.is_empty(), "{name}");
        let issued = TokenRequest {
            state: RequestState::Issued,
            ..a.clone()
        };
        assert!(s.swap_request(&a, &issued).await.unwrap());
        assert_eq!(of("spiffe://t/w1", None, 10).await, ["r_c"], "{name}");
        s.apply_now(one(Write::DeleteRequest(c.clone())))
            .await
            .unwrap();
        assert!(of("spiffe://t/w1", None, 10).await.is_empty(), "{name}");
        assert!(of("spiffe://t/w3", None, 10).await.is_empty(), "{name}");
        assert_eq!(of("spiffe://t/w1x", None, 10).await, ["r_e"], "{name}");
        drop(dir);
    }
}

/// sled: the open-request index is rebuilt at open (a build before it did
/// not keep it), from the open requests.
#[tokio::test]
async fn sled_rebuilds_the_open_request_index_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        s.create_request(&request("r_1", 10), None).await.unwrap();
    }
    {
        let db = sled::open(dir.path()).unwrap();
        db.drop_tree("requests_open_by").unwrap();
        db.flush().unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    let found = s.open_requests_of("spiffe://t/w", None, 10).await.unwrap();
    assert_eq!(found.len(), 1);
}

/// An open request by `w1`, an open exchange `w1` asked for on behalf of
/// `w3`, and a denied request by `w1`.
async fn write_a_request_of_each_kind(s: &dyn Store) {
    s.create_request(&request_by("r_a", "spiffe://t/w1"), None)
        .await
        .unwrap();
    let exchange = TokenRequest {
        delegation: Some(crate::model::Delegation {
            parent_id: "l_p".into(),
            depth: 1,
            actors: vec!["spiffe://t/w1".into()],
        }),
        ..request_by("r_c", "spiffe://t/w3")
    };
    s.create_request(&exchange, None).await.unwrap();
    let denied = TokenRequest {
        state: RequestState::Denied,
        ..request_by("r_d", "spiffe://t/w1")
    };
    s.create_request(&denied, None).await.unwrap();
}

/// PostgreSQL: migration 4 fills the party columns of the open requests a
/// database written before it holds, from their JSON records (the
/// requester, and the nearest actor of a parked exchange), and leaves
/// closed ones alone.
#[tokio::test]
async fn postgres_migration_4_fills_the_parties_of_open_requests() {
    use super::postgres::{PgOptions, PgStore, TEST_DATABASE_ENV, scratch_database};
    let Ok(base) = std::env::var(TEST_DATABASE_ENV) else {
        eprintln!("SKIPPED: PostgreSQL migration 4 backfill ({TEST_DATABASE_ENV} is not set)");
        return;
    };
    let url = scratch_database(&base).await.unwrap();
    let options = PgOptions {
        url: url.clone(),
        ca_file: None,
        pool_size: 2,
    };
    write_a_request_of_each_kind(&PgStore::connect(&options).await.unwrap()).await;
    // Back to the schema of version 3: no party columns, no version 4.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    client
        .batch_execute(
            "ALTER TABLE requests DROP COLUMN requester, DROP COLUMN made_by;
             DELETE FROM portcullis_migrations WHERE version = 4;",
        )
        .await
        .unwrap();
    let s = PgStore::connect(&options).await.unwrap();
    let of = |who: &'static str| {
        let s = &s;
        async move {
            s.open_requests_of(who, None, 10)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(of("spiffe://t/w1").await, ["r_a", "r_c"]);
    assert_eq!(of("spiffe://t/w3").await, ["r_c"]);
    let closed = client
        .query_one("SELECT made_by FROM requests WHERE id = 'r_d'", &[])
        .await
        .unwrap();
    assert_eq!(closed.get::<_, Option<String>>(0), None);
    drop(client);
    driver.abort();
}

#[tokio::test]
async fn audit_records_keep_sequence_order() {
    for (name, s, _dir) in backends().await {
        // This part only: a backend can be checked one part at a time.
        let s: &dyn Store = s.as_ref();
        assert!(s.audit_last().await.unwrap().is_none(), "{name}");
        for seq in [1u64, 2, 3, 256, 257] {
            s.append_audit(seq, format!("r{seq}").as_bytes())
                .await
                .unwrap();
        }
        let all: Vec<u64> = s
            .audit_after(None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            all,
            [1, 2, 3, 256, 257],
            "{name}: numeric, not lexicographic, order"
        );
        let page = s.audit_after(Some(3), 1).await.unwrap();
        assert_eq!(page, vec![(256, b"r256".to_vec())], "{name}");
        assert_eq!(
            s.audit_last().await.unwrap(),
            Some((257, b"r257".to_vec())),
            "{name}"
        );
        s.put_checkpoint(3, b"jws").await.unwrap();
        assert_eq!(
            s.checkpoints(0, u64::MAX).await.unwrap(),
            vec![(3, b"jws".to_vec())],
            "{name}"
        );
        s.put_checkpoint(9, b"jws9").await.unwrap();
        s.put_checkpoint(300, b"jws300").await.unwrap();
        let between = async |a, b| -> Vec<u64> {
            s.checkpoints(a, b)
                .await
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect()
        };
        assert_eq!(between(3, 300).await, [9, 300], "{name}: after is excluded");
        assert_eq!(between(0, 9).await, [3, 9], "{name}");
        assert!(between(9, 9).await.is_empty(), "{name}");
        let newest = s.last_checkpoint().await.unwrap();
        assert_eq!(newest, Some((300, b"jws300".to_vec())), "{name}");
    }
}

#[tokio::test]
async fn compaction_removes_the_old_trail_in_the_batch_of_its_own_record() {
    for (name, s, _dir) in backends().await {
        for seq in 1u64..=4 {
            s.append_audit(seq, format!("r{seq}").as_bytes())
                .await
                .unwrap();
        }
        s.put_checkpoint(2, b"jws2").await.unwrap();
        s.put_checkpoint(4, b"jws4").await.unwrap();
        let b = Batch {
            writes: vec![Write::CompactAudit(2)],
            audit: vec![body("audit.compacted")],
            fence: None,
        };
        let Applied::Done(records) = s.apply_now(b).await.unwrap() else {
            panic!("{name}: compaction did not apply");
        };
        // Its record hangs from the head, which compaction does not move.
        assert_eq!(records.len(), 1, "{name}");
        assert_eq!(records[0].0, 5, "{name}");
        let prev = format!("\"prev\":\"{}\"", crate::chain::sha256_hex(b"r4"));
        assert!(
            String::from_utf8_lossy(&records[0].1).contains(&prev),
            "{name}"
        );
        let left: Vec<u64> = s
            .audit_after(None, 10)
            .await
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(left, [3, 4, 5], "{name}: records up to the point are gone");
        let anchors: Vec<u64> = s
            .checkpoints(0, u64::MAX)
            .await
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(
            anchors,
            [2, 4],
            "{name}: the checkpoint at the point stays as the anchor"
        );
    }
}

#[tokio::test]
async fn retention_deletes_a_record_only_as_it_was_read() {
    for (name, s, _dir) in backends().await {
        let (gone, old_req) = ended_records(s.as_ref()).await;
        // Retention deletes what ended (a checked delete: the record as
        // read), and nothing else.
        let changed = Lease {
            renewals: 9,
            ..gone.clone()
        };
        assert_eq!(
            s.apply_now(one(Write::DeleteLease(changed))).await.unwrap(),
            Applied::Lost(Lost::Lease("l_b".into())),
            "{name}: a changed lease is not deleted"
        );
        let changed = TokenRequest {
            justification: "other".into(),
            ..old_req.clone()
        };
        assert_eq!(
            s.apply_now(one(Write::DeleteRequest(changed)))
                .await
                .unwrap(),
            Applied::Lost(Lost::Request("r_old".into())),
            "{name}: a changed request is not deleted"
        );
        let b = Batch {
            writes: vec![Write::DeleteLease(gone), Write::DeleteRequest(old_req)],
            audit: vec![body("retention.purged")],
            fence: None,
        };
        let done = s.apply_now(b).await.unwrap();
        assert!(matches!(done, Applied::Done(_)), "{name}");
        let (r, l) = (s.request("r_old").await, s.lease("l_b").await);
        assert!(r.unwrap().is_none() && l.unwrap().is_none(), "{name}");
        assert!(s.request("r_open").await.unwrap().is_some(), "{name}");
        let ids: Vec<String> = s
            .leases_of("spiffe://t/a", None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        let want = ["l_a", "l_c"];
        assert_eq!(ids, want, "{name}: gone from the subject index too");
    }
}

/// Leases `l_a` (active), `l_b` (revoked) and `l_c` (expired), requests
/// `r_old` (denied) and `r_open`: the ended lease and request to delete.
async fn ended_records(s: &dyn Store) -> (Lease, TokenRequest) {
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
    for l in [&lease("l_a", "spiffe://t/a", 10), &gone, &recent] {
        s.create_lease(l, None).await.unwrap();
    }
    let old_req = TokenRequest {
        state: RequestState::Denied,
        ..request("r_old", 1)
    };
    s.create_request(&old_req, None).await.unwrap();
    s.create_request(&request("r_open", 1), None).await.unwrap();
    (gone, old_req)
}

#[tokio::test]
async fn keys_and_meta() {
    for (name, s, _dir) in backends().await {
        assert!(s.keys().await.unwrap().is_empty(), "{name}");
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
        s.put_key(&k).await.unwrap();
        assert_eq!(s.keys().await.unwrap(), vec![k], "{name}");
        put_test_key(s.as_ref(), "k").await;
        s.create_lease(&lease("l_k", "spiffe://t/a", 9), None)
            .await
            .unwrap();
        assert_eq!(
            s.signed_by("k", None, 1000).await.unwrap(),
            ["l_k"],
            "{name}"
        );
        assert!(
            s.signed_by("other", None, 1000).await.unwrap().is_empty(),
            "{name}"
        );
        s.delete_key("k1").await.unwrap();
        assert_eq!(s.keys().await.unwrap(), vec![test_key("k")], "{name}");
        s.put_meta("x", b"y").await.unwrap();
        assert_eq!(
            s.meta("x").await.unwrap().as_deref(),
            Some(&b"y"[..]),
            "{name}"
        );
        s.sync().await.unwrap();
    }
}

#[tokio::test]
async fn console_secrets_live_until_their_end_and_are_taken_once() {
    for (name, s, _dir) in backends().await {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        s.put_ephemeral(&a, b"session", 100).await.unwrap();
        s.put_ephemeral(&b, b"link", 100).await.unwrap();
        s.put_ephemeral(&c, b"old", 10).await.unwrap();
        assert_eq!(
            s.ephemeral(&a, 99).await.unwrap().as_deref(),
            Some(&b"session"[..]),
            "{name}"
        );
        assert_eq!(
            s.ephemeral(&a, 100).await.unwrap(),
            None,
            "{name}: ended at its end"
        );
        assert_eq!(s.ephemeral(&[9; 32], 0).await.unwrap(), None, "{name}");
        // Replaced, not duplicated.
        s.put_ephemeral(&a, b"session 2", 200).await.unwrap();
        assert_eq!(
            s.ephemeral(&a, 150).await.unwrap().as_deref(),
            Some(&b"session 2"[..]),
            "{name}"
        );
        // Taken once.
        assert_eq!(
            s.take_ephemeral(&b, 50).await.unwrap().as_deref(),
            Some(&b"link"[..]),
            "{name}"
        );
        assert_eq!(
            s.take_ephemeral(&b, 50).await.unwrap(),
            None,
            "{name}: once"
        );
        // An ended one is gone when taken, and not returned.
        assert_eq!(s.take_ephemeral(&c, 50).await.unwrap(), None, "{name}");
        s.put_ephemeral(&c, b"old", 10).await.unwrap();
        assert_eq!(
            s.purge_ephemeral(50).await.unwrap(),
            1,
            "{name}: only what ended"
        );
        assert_eq!(
            s.ephemeral(&a, 150).await.unwrap().as_deref(),
            Some(&b"session 2"[..]),
            "{name}"
        );
        assert_eq!(s.purge_ephemeral(500).await.unwrap(), 1, "{name}");
    }
}

/// Eight takers at once (brokers sharing the store): one gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_secret_taken_by_eight_at_once_is_taken_once() {
    for (name, s, _dir) in backends().await {
        let d = [4u8; 32];
        s.put_ephemeral(&d, b"link", 1_000).await.unwrap();
        // Each on a task of its own, on four threads: they race.
        let s: std::sync::Arc<dyn Store> = std::sync::Arc::from(s);
        let takers = (0..8).map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.take_ephemeral(&d, 10).await })
        });
        let got: usize = futures_util::future::join_all(takers)
            .await
            .into_iter()
            .map(|t| usize::from(t.unwrap().unwrap().is_some()))
            .sum();
        assert_eq!(got, 1, "{name}: taken once");
    }
}

#[tokio::test]
async fn sled_keeps_everything_across_reopen_and_refuses_unknown_schema() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SledStore::open(dir.path()).unwrap();
        s.create_lease(&lease("l_1", "spiffe://t/a", 7), None)
            .await
            .unwrap();
        s.create_request(&request("r_1", 9), None).await.unwrap();
        s.sync().await.unwrap();
    }
    {
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.lease("l_1").await.unwrap().unwrap().expires_at, 7);
        assert_eq!(s.next_deadline(Due::Leases).await.unwrap(), Some(7));
        assert_eq!(s.next_deadline(Due::Requests).await.unwrap(), Some(9));
        s.put_meta("schema_version", b"99").await.unwrap();
        s.sync().await.unwrap();
    }
    match SledStore::open(dir.path()) {
        Err(StoreError::Schema { found: 99, .. }) => {}
        other => panic!("expected a schema error, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn sled_upgrades_a_schema_one_store_and_reads_its_json_leases() {
    let dir = tempfile::tempdir().unwrap();
    let old = lease("l_old", "spiffe://t/a", 7);
    {
        // What a schema 1 broker left: JSON leases, version "1".
        let s = SledStore::open(dir.path()).unwrap();
        s.create_lease(&old, None).await.unwrap();
        s.leases
            .insert("l_old", serde_json::to_vec(&old).unwrap())
            .unwrap();
        s.put_meta("schema_version", b"1").await.unwrap();
        s.sync().await.unwrap();
    }
    let s = SledStore::open(dir.path()).unwrap();
    // Opening and reading change nothing: a build that then fails to start
    // leaves the store to the version that wrote it.
    assert_eq!(s.lease("l_old").await.unwrap().unwrap(), old);
    assert_eq!(s.meta("schema_version").await.unwrap().unwrap(), b"1");
    let new = lease("l_new", "spiffe://t/a", 8);
    s.create_lease(&new, None).await.unwrap();
    assert_eq!(
        s.meta("schema_version").await.unwrap().unwrap(),
        SCHEMA_VERSION.to_string().as_bytes()
    );
    assert_eq!(s.leases.get("l_new").unwrap().unwrap()[0], 0x01);
    assert_eq!(s.lease("l_new").await.unwrap().unwrap(), new);
    let both: Vec<_> = s
        .leases_of("spiffe://t/a", None, 10)
        .await
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
    assert!(s.swap_lease(&old, &revoked).await.unwrap());
    assert_eq!(s.lease("l_old").await.unwrap().unwrap(), revoked);
    s.put_meta("schema_version", b"not a number").await.unwrap();
    s.sync().await.unwrap();
    drop(s);
    assert!(matches!(
        SledStore::open(dir.path()),
        Err(StoreError::Schema { found: 0, .. })
    ));
}

#[tokio::test]
async fn sled_drops_expiry_entries_a_crash_left_behind() {
    // What a crash between the index write and the lease write leaves.
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    s.create_lease(&lease("l_1", "spiffe://t/a", 7), None)
        .await
        .unwrap();
    s.lease_expiry.insert(deadline_key(5, "l_0"), &[]).unwrap();
    // What a crash inside `swap_lease` leaves: an entry at a stale time, and
    // one for a lease that is no longer active.
    s.create_lease(&lease("l_2", "spiffe://t/a", 20), None)
        .await
        .unwrap();
    s.lease_expiry.insert(deadline_key(6, "l_2"), &[]).unwrap();
    let gone = lease("l_3", "spiffe://t/a", 8);
    s.create_lease(&gone, None).await.unwrap();
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
    assert_eq!(s.due(Due::Leases, 10, 10).await.unwrap(), ["l_1"]);
    assert_eq!(
        s.due(Due::Leases, 100, 10).await.unwrap(),
        ["l_1", "l_2"],
        "stale entries removed"
    );
    assert_eq!(s.lease_expiry.len(), 2);
}

#[tokio::test]
async fn corrupt_record_is_reported_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    s.create_lease(&lease("l_1", "spiffe://t/a", 7), None)
        .await
        .unwrap();
    s.leases.insert("l_1", &b"{not json"[..]).unwrap();
    assert!(matches!(
        s.lease("l_1").await,
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
    put_test_key(store.as_ref(), "k").await;
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

/// A test decorator: a store that changes only what it says ([`Store::apply`]
/// or [`Store::sync`]) of the store it wraps. Every other method passes
/// through (the blanket [`Store`] impl below, written once and complete:
/// the contract has no default methods to inherit silently).
#[async_trait::async_trait]
pub(crate) trait Decorate: Send + Sync + 'static {
    /// The wrapped store.
    fn inner(&self) -> &dyn Store;
    /// [`Store::apply`], as the wrapped store does it unless overridden.
    fn on_apply(&self, b: Batch) -> Applying {
        self.inner().apply(b)
    }
    /// [`Store::sync`], as the wrapped store does it unless overridden.
    async fn on_sync(&self) -> Result<(), StoreError> {
        self.inner().sync().await
    }
}

#[async_trait::async_trait]
impl<D: Decorate> Store for D {
    fn apply(&self, b: Batch) -> Applying {
        self.on_apply(b)
    }
    async fn sync(&self) -> Result<(), StoreError> {
        self.on_sync().await
    }
    async fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.inner().lease(id).await
    }
    async fn leases_of(
        &self,
        s: &str,
        a: Option<&str>,
        l: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.inner().leases_of(s, a, l).await
    }
    async fn children(
        &self,
        p: &str,
        a: Option<&str>,
        l: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner().children(p, a, l).await
    }
    async fn signed_by(
        &self,
        k: &str,
        a: Option<&str>,
        l: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner().signed_by(k, a, l).await
    }
    async fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        self.inner().request(id).await
    }
    async fn open_requests(
        &self,
        a: Option<&str>,
        l: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        self.inner().open_requests(a, l).await
    }
    async fn open_requests_of(
        &self,
        w: &str,
        a: Option<&str>,
        l: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        self.inner().open_requests_of(w, a, l).await
    }
    async fn due(&self, i: Due, n: Millis, l: usize) -> Result<Vec<String>, StoreError> {
        self.inner().due(i, n, l).await
    }
    async fn next_deadline(&self, i: Due) -> Result<Option<Millis>, StoreError> {
        self.inner().next_deadline(i).await
    }
    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        self.inner().counts().await
    }
    async fn audit_after(
        &self,
        a: Option<u64>,
        l: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner().audit_after(a, l).await
    }
    async fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.inner().audit_last().await
    }
    async fn checkpoints(&self, a: u64, t: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner().checkpoints(a, t).await
    }
    async fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.inner().last_checkpoint().await
    }
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner().keys().await
    }
    async fn meta(&self, n: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().meta(n).await
    }
    async fn put_ephemeral(&self, k: &[u8; 32], v: &[u8], e: Millis) -> Result<(), StoreError> {
        self.inner().put_ephemeral(k, v, e).await
    }
    async fn ephemeral(&self, k: &[u8; 32], n: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().ephemeral(k, n).await
    }
    async fn take_ephemeral(&self, k: &[u8; 32], n: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().take_ephemeral(k, n).await
    }
    async fn purge_ephemeral(&self, n: Millis) -> Result<u64, StoreError> {
        self.inner().purge_ephemeral(n).await
    }
    async fn scan(
        &self,
        t: Table,
        a: Option<&[u8]>,
        l: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        self.inner().scan(t, a, l).await
    }
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        self.inner().changes()
    }
    async fn lead(&self, r: &str, h: &str, t: u64) -> Result<Option<u64>, StoreError> {
        self.inner().lead(r, h, t).await
    }
    async fn resign(&self, r: &str, h: &str) -> Result<(), StoreError> {
        self.inner().resign(r, h).await
    }
}

/// A store whose `sync` fails while `.1` is set: writers must get an error.
pub(crate) struct FailingSync(
    pub(crate) MemStore,
    pub(crate) std::sync::atomic::AtomicBool,
);

#[async_trait::async_trait]
impl Decorate for FailingSync {
    fn inner(&self) -> &dyn Store {
        &self.0
    }
    async fn on_sync(&self) -> Result<(), StoreError> {
        match self.1.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err(StoreError::Unavailable("disk on fire".into())),
            false => Ok(()),
        }
    }
}

/// A store that fails in the middle of applying every batch it is given
/// (halfway through its writes), as a full disk or a lost connection would.
pub(crate) struct FailMidway(pub(crate) Box<dyn Store>);

impl Decorate for FailMidway {
    fn inner(&self) -> &dyn Store {
        self.0.as_ref()
    }
    fn on_apply(&self, mut b: Batch) -> Applying {
        b.writes.insert(b.writes.len() / 2, Write::Fail);
        self.0.apply(b)
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
async fn visible(s: &dyn Store) -> Seen {
    (
        s.scan(Table::Leases, None, 100).await.unwrap(),
        s.scan(Table::Requests, None, 100).await.unwrap(),
        s.scan(Table::Idempotency, None, 100).await.unwrap(),
        s.audit_after(None, 100).await.unwrap(),
    )
}

/// One operation's worth of writes on the leases `l_1` (made here) and a
/// new `l_2`, a new request with a claimed key, and two records.
async fn operation(s: &dyn Store) -> Batch {
    put_test_key(s, "k").await;
    s.create_lease(&lease("l_1", "spiffe://t/a", 10), None)
        .await
        .unwrap();
    let l1 = s.lease("l_1").await.unwrap().unwrap();
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

#[tokio::test]
async fn a_batch_that_fails_midway_leaves_nothing_visible_and_the_chain_whole() {
    for (name, s, _dir) in backends().await {
        let batch = operation(s.as_ref()).await;
        let before = visible(s.as_ref()).await;
        let failing = FailMidway(s);
        assert!(
            matches!(
                batch::applied(failing.apply((batch).clone())).await,
                Err(StoreError::Unavailable(_))
            ),
            "{name}"
        );
        assert!(
            visible(failing.0.as_ref()).await == before,
            "{name}: a failed batch left something"
        );
        // The same batch then applies whole, its records chained right
        // after the last one (the failure moved no head).
        let s = failing.0;
        let Applied::Done(records) = s.apply_now(batch).await.unwrap() else {
            panic!("{name}: the batch did not apply");
        };
        assert_eq!(
            records.iter().map(|r| r.0).collect::<Vec<_>>(),
            [1, 2],
            "{name}"
        );
        assert_eq!(s.audit_after(None, 10).await.unwrap(), records, "{name}");
        assert_eq!(
            s.lease("l_1").await.unwrap().unwrap().state,
            LeaseState::Revoked,
            "{name}"
        );
        assert!(
            s.lease("l_2").await.unwrap().is_some() && s.request("r_1").await.unwrap().is_some(),
            "{name}"
        );
        let second = String::from_utf8(records[1].1.clone()).unwrap();
        let prev = format!("\"prev\":\"{}\"", crate::chain::sha256_hex(&records[0].1));
        assert!(second.ends_with(&format!("{prev}}}")), "{name}: {second}");
    }
}

#[tokio::test]
async fn a_lost_check_anywhere_in_a_batch_writes_none_of_it() {
    for (name, s, _dir) in backends().await {
        let batch = operation(s.as_ref()).await;
        let before = visible(s.as_ref()).await;
        // A stale compare-and-swap at the end.
        let mut stale = batch.clone();
        let Write::SwapLease { old, new } = batch.writes[0].clone() else {
            unreachable!()
        };
        // (Later writes see earlier ones: `old` is no longer what is stored.)
        stale.writes.push(Write::SwapLease { old, new });
        assert_eq!(
            s.apply_now(stale).await.unwrap(),
            Applied::Lost(Lost::Lease("l_1".into())),
            "{name}"
        );
        assert!(visible(s.as_ref()).await == before, "{name}");
        // A taken key: nothing of the batch, the entry that holds it back.
        let Write::CreateRequest { idem: Some(i), .. } = &batch.writes[2] else {
            unreachable!()
        };
        let mut holder = i.clone();
        holder.outcome = IdempotentOutcome::Lease("l_other".into());
        batch::write_one(s.as_ref(), Write::CopyRow(Row::Idempotency(holder.clone())))
            .await
            .unwrap();
        let before = visible(s.as_ref()).await;
        assert_eq!(
            s.apply_now(batch).await.unwrap(),
            Applied::Lost(Lost::Idempotency(holder)),
            "{name}"
        );
        assert!(visible(s.as_ref()).await == before, "{name}");
    }
}

#[tokio::test]
async fn a_lease_or_renewal_signed_by_a_withdrawn_key_writes_none_of_the_batch() {
    for (name, s, _dir) in backends().await {
        let batch = operation(s.as_ref()).await;
        let before = visible(s.as_ref()).await;
        // A new lease signed by a key that no longer signs.
        let mut withdrawn = test_key("k");
        withdrawn.state = KeyState::Withdrawn;
        s.put_key(&withdrawn).await.unwrap();
        let mut late = batch.clone();
        late.writes.truncate(2);
        assert_eq!(
            s.apply_now(late).await.unwrap(),
            Applied::Lost(Lost::KeyInactive("k".into())),
            "{name}"
        );
        assert!(visible(s.as_ref()).await == before, "{name}");
        // A renewal signed by it: refused too (the token would leave).
        let l1 = s.lease("l_1").await.unwrap().unwrap();
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
            batch::applied(s.apply(renewal)).await.unwrap(),
            Applied::Lost(Lost::KeyInactive("k".into())),
            "{name}"
        );
        assert_eq!(s.lease("l_1").await.unwrap().unwrap(), l1, "{name}");
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
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_on_one_record_one_wins_and_the_rest_leave_nothing() {
    for (name, s, _dir) in backends().await {
        put_test_key(s.as_ref(), "k").await;
        s.create_lease(&lease("l_0", "spiffe://t/a", 10), None)
            .await
            .unwrap();
        let l0 = s.lease("l_0").await.unwrap().unwrap();
        // Each from a task of its own, on four threads: they race.
        let s: std::sync::Arc<dyn Store> = std::sync::Arc::from(s);
        let tasks = (0..8).map(|i| {
            let (s, l0) = (s.clone(), l0.clone());
            tokio::spawn(async move { batch::applied(s.apply(renewal(i, l0))).await })
        });
        let outcomes: Vec<Applied> = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .map(|t| t.unwrap().unwrap())
            .collect();
        let won: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Applied::Done(_)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(won.len(), 1, "{name}: {outcomes:?}");
        for (i, o) in outcomes.iter().enumerate() {
            let made = s.lease(&format!("l_new{i}")).await.unwrap().is_some();
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
        let trail = s.audit_after(None, 100).await.unwrap();
        assert_eq!(trail.len(), 1, "{name}: only the winner's record");
        assert_eq!(
            s.lease("l_0").await.unwrap().unwrap().renewals as usize,
            won[0] + 1,
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_stale_leader_is_fenced_on_a_shared_store() {
    let Some(s) = postgres_store().await else {
        return;
    };
    let g1 = s.lead("upkeep", "a", 60_000).await.unwrap().unwrap();
    assert_eq!(
        s.lead("upkeep", "a", 60_000).await.unwrap(),
        Some(g1),
        "a renewal keeps the term"
    );
    assert_eq!(
        s.lead("upkeep", "b", 60_000).await.unwrap(),
        None,
        "held by a"
    );
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
        s.apply_now(fenced("a", g1)).await.unwrap(),
        Applied::Done(_)
    ));
    // a's term ends (it stalled, or gave up); b takes the role.
    s.resign("upkeep", "a").await.unwrap();
    let g2 = s.lead("upkeep", "b", 60_000).await.unwrap().unwrap();
    assert!(g2 > g1);
    let last = s.audit_last().await.unwrap();
    assert_eq!(
        s.apply_now(fenced("a", g1)).await.unwrap(),
        Applied::Lost(Lost::Fenced)
    );
    assert_eq!(s.meta("m").await.unwrap().as_deref(), Some(&b"a"[..]));
    assert_eq!(
        s.audit_last().await.unwrap(),
        last,
        "no record of the fenced batch"
    );
    assert!(matches!(
        s.apply_now(fenced("b", g2)).await.unwrap(),
        Applied::Done(_)
    ));
    // a comes back and takes the role again: a new term, not its old one.
    s.resign("upkeep", "b").await.unwrap();
    let g3 = s.lead("upkeep", "a", 60_000).await.unwrap().unwrap();
    assert!(g3 > g2);
    assert_eq!(
        s.apply_now(fenced("a", g1)).await.unwrap(),
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
        .await
        .unwrap();
    assert!(matches!(
        gc.durable().await,
        Err(StoreError::Unavailable(_))
    ));
    cancel.cancel();
}

/// PostgreSQL: a lost race is told as contention (the caller may retry), a
/// statement the server refuses as malformed as the broker's own failure,
/// not as the database being unavailable (issue 21, finding 8).
#[tokio::test]
async fn postgres_errors_are_told_as_what_they_are() {
    use super::postgres::{TEST_DATABASE_ENV, pg_err, scratch_database};
    let Ok(base) = std::env::var(TEST_DATABASE_ENV) else {
        eprintln!("SKIPPED: PostgreSQL error kinds ({TEST_DATABASE_ENV} is not set)");
        return;
    };
    let url = scratch_database(&base).await.unwrap();
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        (client, tokio::spawn(connection))
    };
    let ((mut holder, d1), (other, d2)) = (connect().await, connect().await);
    let malformed = other.batch_execute("SELECT * FROM no_such_table").await;
    assert!(matches!(
        pg_err(malformed.unwrap_err()),
        StoreError::Internal(m) if m.contains("42P01")
    ));
    other.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE t").await.unwrap();
    let raced = other.batch_execute("BEGIN; LOCK TABLE t NOWAIT").await;
    assert!(matches!(
        pg_err(raced.unwrap_err()),
        StoreError::Contended(m) if m.contains("55P03")
    ));
    drop(tx);
    drop((holder, other));
    d1.abort();
    d2.abort();
}

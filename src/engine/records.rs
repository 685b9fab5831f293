//! The one way the engine writes: an operation ([`Op`]) gathers every
//! change it makes — lease and request creates and compare-and-swaps, the
//! idempotency claim, key-ring and metadata writes — and its audit
//! records, and [`Records::apply`] hands it to the store as one atomic
//! batch, keeping the gauges in step. [`Records::edit_lease`] and
//! [`Records::edit_request`] are the read → edit steps of the one
//! compare-and-swap loop; the loop itself is `Engine::commit`, which builds
//! the whole operation again from fresh reads when any of its swaps lost a
//! race. The reads are async (the store's); the edits themselves are
//! synchronous closures over the record read.

use std::collections::HashMap;
use std::sync::Arc;

use crate::audit::{AuditError, AuditLog, Entry as AuditEntry};
use crate::metrics::Metrics;
use crate::model::{Idempotency, Lease, LeaseLogin, LeaseState, TokenRequest};
use crate::store::batch::gauge_delta;
use crate::store::{Applied, Applying, Batch, Fence, Millis, Store, StoreError, Write};

/// What an edit did to the operation.
#[derive(Debug)]
pub(crate) enum Cas<T> {
    /// `old` is to be replaced by `new` when the operation applies.
    Swapped {
        /// The record before.
        old: T,
        /// The record after.
        new: T,
    },
    /// The edit declined to change this (current) record.
    Kept(T),
    /// No such record.
    Missing,
}

/// One operation's changes and records, applied together or not at all.
/// Reads through it ([`Records::edit_lease`], [`Op::lease`]) see its own
/// earlier edits.
#[derive(Debug)]
pub(crate) struct Op {
    batch: Batch,
    now: Millis,
    /// Where in `batch.writes` each lease and request changed last: the
    /// write holds the record as the operation leaves it (an index, not a
    /// copy: a bulk operation changes a hundred thousand).
    leases: HashMap<String, usize>,
    requests: HashMap<String, usize>,
}

impl Op {
    /// An empty operation at `now` (the time its records carry).
    pub(crate) fn new(now: Millis) -> Self {
        Self {
            batch: Batch::default(),
            now,
            leases: HashMap::new(),
            requests: HashMap::new(),
        }
    }

    /// Insert `lease`, claiming `idem` with it.
    pub(crate) fn create_lease(&mut self, lease: Lease, idem: Option<Idempotency>) {
        self.leases
            .insert(lease.id.clone(), self.batch.writes.len());
        self.batch.writes.push(Write::CreateLease { lease, idem });
    }

    /// Insert `req`, claiming `idem` with it.
    pub(crate) fn create_request(&mut self, req: TokenRequest, idem: Option<Idempotency>) {
        self.requests
            .insert(req.id.clone(), self.batch.writes.len());
        self.batch.writes.push(Write::CreateRequest { req, idem });
    }

    /// Apply only if `lease` is still stored exactly so (a compare-and-swap
    /// that changes nothing): what the operation decided depends on it.
    pub(crate) fn expect_lease(&mut self, lease: Lease) {
        self.swap_lease(lease.clone(), lease);
    }

    /// Any other write (keys, metadata, checkpoints).
    pub(crate) fn write(&mut self, w: Write) {
        self.batch.writes.push(w);
    }

    /// Record `entries` with this operation.
    pub(crate) fn record(&mut self, entries: Vec<AuditEntry>) -> Result<(), AuditError> {
        let bodies = AuditLog::bodies(self.now, entries)?;
        self.batch.audit.extend(bodies);
        Ok(())
    }

    /// Leader-only work: refused by a shared store once the term is over.
    pub(crate) fn fence(&mut self, fence: Option<Fence>) {
        self.batch.fence = fence;
    }

    /// Lease `id` as this operation sees it.
    pub(crate) async fn lease(
        &self,
        store: &dyn Store,
        id: &str,
    ) -> Result<Option<Lease>, StoreError> {
        match self.changed_lease(id) {
            Some(l) => Ok(Some(l)),
            None => store.lease(id).await,
        }
    }

    /// Lease `id` if this operation has changed it already.
    pub(crate) fn changed_lease(&self, id: &str) -> Option<Lease> {
        match self.batch.writes.get(*self.leases.get(id)?)? {
            Write::CreateLease { lease, .. } | Write::SwapLease { new: lease, .. } => {
                Some(lease.clone())
            }
            _ => None,
        }
    }

    /// Request `id` if this operation has changed it already.
    fn changed_request(&self, id: &str) -> Option<TokenRequest> {
        match self.batch.writes.get(*self.requests.get(id)?)? {
            Write::CreateRequest { req, .. } | Write::SwapRequest { new: req, .. } => {
                Some(req.clone())
            }
            _ => None,
        }
    }

    /// Revoke `lease`, as read, by `by` at `now` if it is active; whether
    /// it was. The edit of [`revoke_if_active`] without the copies that
    /// [`Records::edit_lease_from`] makes for its answer: the bulk paths
    /// revoke a hundred thousand at once.
    pub(crate) fn revoke(&mut self, lease: Lease, by: &str, reason: &str, now: Millis) -> bool {
        if lease.state != LeaseState::Active {
            return false;
        }
        let new = revoked(&lease, by, reason, now);
        self.swap_lease(lease, new);
        true
    }

    /// Room for `n` more writes, made at once (a bulk operation that knows
    /// its size grows its batch once, not by doubling).
    pub(crate) fn reserve(&mut self, n: usize) {
        self.batch.writes.reserve_exact(n);
        self.leases.reserve(n);
    }

    /// Nothing to apply.
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    fn swap_lease(&mut self, old: Lease, new: Lease) {
        self.leases.insert(new.id.clone(), self.batch.writes.len());
        self.batch.writes.push(Write::SwapLease { old, new });
    }

    fn swap_request(&mut self, old: TokenRequest, new: TokenRequest) {
        self.requests
            .insert(new.id.clone(), self.batch.writes.len());
        self.batch.writes.push(Write::SwapRequest { old, new });
    }
}

/// What an operation's plan gives back: the operation built, and its
/// result (see [`Engine::commit`](super::Engine::commit)).
pub(crate) type Planned<T> = Result<(Op, T), super::EngineError>;

/// What a batch does to the gauges once applied, and the database logins
/// whose leases it ends.
#[derive(Clone, Debug, Default)]
pub(crate) struct Gauges {
    leases: i64,
    requests: i64,
    revocations: u64,
    ended_logins: Vec<EndedLogin>,
}

/// The database login of a lease that ended: (lease id, login).
pub(crate) type EndedLogin = (String, LeaseLogin);

/// The store, with the gauges that follow its lease and request writes.
#[derive(Clone)]
pub(crate) struct Records {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Where the logins of leases an applied batch ended are sent, to be
    /// ended on their databases (`Engine::end_logins`).
    ended_logins: Option<tokio::sync::mpsc::UnboundedSender<EndedLogin>>,
}

/// `current` edited by `edit`, the swap queued in `op`.
fn edit<T: Clone, E>(
    current: Option<T>,
    edit: impl FnOnce(&T) -> Result<Option<T>, E>,
    queue: impl FnOnce(T, T),
) -> Result<Cas<T>, E> {
    let Some(cur) = current else {
        return Ok(Cas::Missing);
    };
    let Some(new) = edit(&cur)? else {
        return Ok(Cas::Kept(cur));
    };
    queue(cur.clone(), new.clone());
    Ok(Cas::Swapped { old: cur, new })
}

impl Records {
    pub(crate) fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            ended_logins: None,
        }
    }

    /// Send the logins of the leases each applied batch ends to `tx`.
    pub(crate) fn ending_logins_to(
        mut self,
        tx: tokio::sync::mpsc::UnboundedSender<EndedLogin>,
    ) -> Self {
        self.ended_logins = Some(tx);
        self
    }

    /// The store, for reads.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Hand `op` to the store as one batch; what the gauges will do if it
    /// applies.
    pub(crate) fn submit(&self, op: Op) -> (Applying, Gauges) {
        let mut g = Gauges::default();
        for w in &op.batch.writes {
            let (leases, requests) = gauge_delta(w);
            g.leases += leases;
            g.requests += requests;
            if let Write::SwapLease { old, new } = w
                && old.state == LeaseState::Active
                && new.state != LeaseState::Active
            {
                if new.state == LeaseState::Revoked {
                    g.revocations += 1;
                }
                if let Some(login) = &new.login {
                    g.ended_logins.push((new.id.clone(), (**login).clone()));
                }
            }
        }
        (self.store.apply(op.batch), g)
    }

    /// Apply `op` as one batch and wait for the outcome; on success the
    /// gauges follow its writes.
    pub(crate) async fn apply(&self, op: Op) -> Result<Applied, StoreError> {
        let (pending, gauges) = self.submit(op);
        let applied = crate::store::batch::applied(pending).await?;
        if let Applied::Done(_) = applied {
            self.count(gauges);
        }
        Ok(applied)
    }

    /// Move the gauges by what an applied batch did; send the logins it
    /// ended on.
    pub(crate) fn count(&self, g: Gauges) {
        if let Some(tx) = &self.ended_logins {
            for ended in g.ended_logins {
                // Closed only when the engine is gone; the reconciler of
                // the next start finds what was not ended.
                let _ = tx.send(ended);
            }
        }
        self.metrics.active_leases.inc_by(g.leases);
        self.metrics.open_requests.inc_by(g.requests);
        self.metrics.revocations.inc_by(g.revocations);
    }

    /// Read lease `id` (as `op` sees it), ask `edit` for its replacement,
    /// and queue the swap in `op`. `edit` returning `None` keeps it.
    pub(crate) async fn edit_lease<E: From<StoreError>>(
        &self,
        op: &mut Op,
        id: &str,
        change: impl FnOnce(&Lease) -> Result<Option<Lease>, E>,
    ) -> Result<Cas<Lease>, E> {
        let current = op.lease(self.store.as_ref(), id).await?;
        self.edit_lease_from(op, current, change)
    }

    /// [`Records::edit_lease`] starting from a copy already read.
    pub(crate) fn edit_lease_from<E>(
        &self,
        op: &mut Op,
        current: Option<Lease>,
        change: impl FnOnce(&Lease) -> Result<Option<Lease>, E>,
    ) -> Result<Cas<Lease>, E> {
        edit(current, change, |old, new| op.swap_lease(old, new))
    }

    /// Read request `id` (as `op` sees it), ask `edit`, queue the swap.
    pub(crate) async fn edit_request<E: From<StoreError>>(
        &self,
        op: &mut Op,
        id: &str,
        change: impl FnOnce(&TokenRequest) -> Result<Option<TokenRequest>, E>,
    ) -> Result<Cas<TokenRequest>, E> {
        let current = match op.changed_request(id) {
            Some(r) => Some(r),
            None => self.store.request(id).await?,
        };
        self.edit_request_from(op, current, change)
    }

    /// [`Records::edit_request`] starting from a copy already read (by a
    /// plan that checks something in the store before it edits).
    pub(crate) fn edit_request_from<E>(
        &self,
        op: &mut Op,
        current: Option<TokenRequest>,
        change: impl FnOnce(&TokenRequest) -> Result<Option<TokenRequest>, E>,
    ) -> Result<Cas<TokenRequest>, E> {
        edit(current, change, |old, new| op.swap_request(old, new))
    }
}

/// `lease` revoked by `by` at `now`.
pub(crate) fn revoked(lease: &Lease, by: &str, reason: &str, now: u64) -> Lease {
    Lease {
        state: LeaseState::Revoked,
        revoked_at: Some(now),
        revoked_by: Some(by.to_owned()),
        revoke_reason: (!reason.is_empty()).then(|| reason.to_owned()),
        ..lease.clone()
    }
}

/// The edit that revokes an active lease and keeps any other.
pub(crate) fn revoke_if_active(
    by: &str,
    reason: &str,
    now: u64,
) -> impl FnMut(&Lease) -> Result<Option<Lease>, StoreError> {
    move |l| Ok((l.state == LeaseState::Active).then(|| revoked(l, by, reason, now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;

    fn lease(id: &str) -> Lease {
        crate::store::conformance::lease(id, "spiffe://t/w", 100)
    }

    async fn records() -> (Records, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(MemStore::new());
        crate::store::conformance::put_test_key(store.as_ref(), "k").await;
        (Records::new(store, metrics.clone()), metrics)
    }

    #[tokio::test]
    async fn edits_swap_keep_or_miss_and_the_gauges_follow_the_applied_batch() {
        let (records, metrics) = records().await;
        let mut op = Op::new(1);
        op.create_lease(lease("l_1"), None);
        assert!(matches!(records.apply(op).await.unwrap(), Applied::Done(_)));
        assert_eq!(metrics.active_leases.get(), 1);

        let mut op = Op::new(5);
        let out = records
            .edit_lease(&mut op, "l_1", revoke_if_active("admin", "why", 5))
            .await
            .unwrap();
        let Cas::Swapped { old, new } = out else {
            panic!("expected a swap, got {out:?}")
        };
        assert_eq!(old.state, LeaseState::Active);
        assert_eq!(new.state, LeaseState::Revoked);
        assert_eq!(
            metrics.active_leases.get(),
            1,
            "nothing changes before apply"
        );
        assert!(matches!(records.apply(op).await.unwrap(), Applied::Done(_)));
        assert_eq!(metrics.active_leases.get(), 0);
        assert_eq!(metrics.revocations.get(), 1);

        // Already revoked: kept, nothing queued.
        let mut op = Op::new(6);
        let out = records
            .edit_lease(&mut op, "l_1", revoke_if_active("admin", "again", 6))
            .await
            .unwrap();
        assert!(matches!(out, Cas::Kept(l) if l.revoke_reason.as_deref() == Some("why")));
        assert!(op.is_empty());
        assert!(matches!(
            records
                .edit_lease(&mut op, "l_none", revoke_if_active("a", "", 1))
                .await
                .unwrap(),
            Cas::Missing
        ));
    }

    #[tokio::test]
    async fn a_lost_race_applies_nothing_and_counts_nothing() {
        let (records, metrics) = records().await;
        let mut op = Op::new(1);
        op.create_lease(lease("l_1"), None);
        records.apply(op).await.unwrap();
        // Two operations read the same lease; the second to apply loses.
        let mut first = Op::new(2);
        let mut second = Op::new(2);
        records
            .edit_lease(&mut first, "l_1", revoke_if_active("a", "one", 2))
            .await
            .unwrap();
        records
            .edit_lease(&mut second, "l_1", revoke_if_active("b", "two", 2))
            .await
            .unwrap();
        second
            .record(vec![AuditEntry::ok(
                "b",
                crate::vocab::Action::LeaseRevoked,
                "l_1",
                &[],
                "two",
            )])
            .unwrap();
        assert!(matches!(
            records.apply(first).await.unwrap(),
            Applied::Done(_)
        ));
        let before = records.store().audit_last().await.unwrap();
        assert_eq!(
            records.apply(second).await.unwrap(),
            Applied::Lost(crate::store::Lost::Lease("l_1".into()))
        );
        assert_eq!(
            records.store().audit_last().await.unwrap(),
            before,
            "no record"
        );
        assert_eq!(metrics.revocations.get(), 1);
        let stored = records.store().lease("l_1").await.unwrap().unwrap();
        assert_eq!(stored.revoke_reason.as_deref(), Some("one"));
    }

    #[tokio::test]
    async fn reads_through_an_operation_see_its_own_edits() {
        let (records, _) = records().await;
        let mut op = Op::new(1);
        op.create_lease(lease("l_1"), None);
        records.apply(op).await.unwrap();
        let mut op = Op::new(2);
        records
            .edit_lease(&mut op, "l_1", |l| {
                Ok::<_, StoreError>(Some(Lease {
                    renewals: 1,
                    ..l.clone()
                }))
            })
            .await
            .unwrap();
        let mut seen = None;
        records
            .edit_lease(&mut op, "l_1", |l| {
                seen = Some(l.renewals);
                Ok::<_, StoreError>(Some(revoked(l, "a", "", 2)))
            })
            .await
            .unwrap();
        assert_eq!(seen, Some(1));
        assert!(matches!(records.apply(op).await.unwrap(), Applied::Done(_)));
        let stored = records.store().lease("l_1").await.unwrap().unwrap();
        assert_eq!((stored.renewals, stored.state), (1, LeaseState::Revoked));
    }
}

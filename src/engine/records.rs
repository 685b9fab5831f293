//! The one way the engine writes leases and requests: through [`Records`],
//! which keeps the gauges in step with the state, and whose compare-and-swap
//! helpers ([`Records::edit_lease`], [`Records::edit_request`]) are the only
//! retry loops. Synchronous, so bulk work can run it off the runtime.

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::store::{Idempotency, Lease, LeaseState, Store, StoreError, TokenRequest};

/// What a compare-and-swap did.
#[derive(Debug)]
pub(crate) enum Cas<T> {
    /// `old` was replaced by `new`.
    Swapped {
        /// The record before.
        old: T,
        /// The record now stored.
        new: T,
    },
    /// The edit declined to change this (current) record.
    Kept(T),
    /// No such record.
    Missing,
}

/// The store, with the gauges that follow its lease and request writes.
#[derive(Clone)]
pub(crate) struct Records {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

/// Lost races on one record after which the swap is given up: far beyond
/// any real contention, so hitting it means the stored form never equals
/// what was read back (e.g. a record the backend cannot compare), and the
/// caller gets an error instead of a loop that never ends.
const MAX_RACES: usize = 10_000;

/// Read `current`, ask `edit` for its replacement, swap; on a lost race read
/// again and ask again. `edit` returning `None` keeps the record as is.
fn cas<T, E: From<StoreError>>(
    mut current: Option<T>,
    load: impl Fn() -> Result<Option<T>, StoreError>,
    swap: impl Fn(&T, &T) -> Result<bool, StoreError>,
    mut edit: impl FnMut(&T) -> Result<Option<T>, E>,
) -> Result<Cas<T>, E> {
    for _ in 0..MAX_RACES {
        let Some(cur) = current.take() else {
            return Ok(Cas::Missing);
        };
        let Some(new) = edit(&cur)? else {
            return Ok(Cas::Kept(cur));
        };
        if swap(&cur, &new)? {
            return Ok(Cas::Swapped { old: cur, new });
        }
        current = load()?;
    }
    Err(StoreError::Unavailable(format!(
        "a compare-and-swap lost {MAX_RACES} races in a row; nothing was changed"
    ))
    .into())
}

impl Records {
    pub(crate) fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics }
    }

    /// The store, for reads.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// [`Store::create_lease`], counted.
    pub(crate) fn create_lease(
        &self,
        lease: &Lease,
        idem: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let existing = self.store.create_lease(lease, idem)?;
        if existing.is_none() && lease.state == LeaseState::Active {
            self.metrics.active_leases.inc();
        }
        Ok(existing)
    }

    /// [`Store::create_request`], counted.
    pub(crate) fn create_request(
        &self,
        req: &TokenRequest,
        idem: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let existing = self.store.create_request(req, idem)?;
        if existing.is_none() && req.is_open() {
            self.metrics.open_requests.inc();
        }
        Ok(existing)
    }

    /// Compare-and-swap lease `id` (see [`cas`]).
    pub(crate) fn edit_lease<E: From<StoreError>>(
        &self,
        id: &str,
        edit: impl FnMut(&Lease) -> Result<Option<Lease>, E>,
    ) -> Result<Cas<Lease>, E> {
        let current = self.store.lease(id)?;
        self.edit_lease_from(current, edit)
    }

    /// [`Records::edit_lease`] starting from a copy already read.
    pub(crate) fn edit_lease_from<E: From<StoreError>>(
        &self,
        current: Option<Lease>,
        edit: impl FnMut(&Lease) -> Result<Option<Lease>, E>,
    ) -> Result<Cas<Lease>, E> {
        let id = current.as_ref().map(|l| l.id.clone()).unwrap_or_default();
        cas(
            current,
            || self.store.lease(&id),
            |old, new| self.swap_lease(old, new),
            edit,
        )
    }

    /// Compare-and-swap request `id` (see [`cas`]).
    pub(crate) fn edit_request<E: From<StoreError>>(
        &self,
        id: &str,
        edit: impl FnMut(&TokenRequest) -> Result<Option<TokenRequest>, E>,
    ) -> Result<Cas<TokenRequest>, E> {
        cas(
            self.store.request(id)?,
            || self.store.request(id),
            |old, new| self.swap_request(old, new),
            edit,
        )
    }

    fn swap_lease(&self, current: &Lease, new: &Lease) -> Result<bool, StoreError> {
        let swapped = self.store.swap_lease(current, new)?;
        if swapped && current.state == LeaseState::Active && new.state != LeaseState::Active {
            self.metrics.active_leases.dec();
            if new.state == LeaseState::Revoked {
                self.metrics.revocations.inc();
            }
        }
        Ok(swapped)
    }

    fn swap_request(&self, current: &TokenRequest, new: &TokenRequest) -> Result<bool, StoreError> {
        let swapped = self.store.swap_request(current, new)?;
        if swapped && current.is_open() != new.is_open() {
            if new.is_open() {
                self.metrics.open_requests.inc();
            } else {
                self.metrics.open_requests.dec();
            }
        }
        Ok(swapped)
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

    #[test]
    fn edits_swap_keep_or_miss_and_the_gauges_follow() {
        let metrics = Arc::new(Metrics::new());
        let records = Records::new(Arc::new(MemStore::new()), metrics.clone());
        records.create_lease(&lease("l_1"), None).unwrap();
        assert_eq!(metrics.active_leases.get(), 1);

        let out = records
            .edit_lease("l_1", revoke_if_active("admin", "why", 5))
            .unwrap();
        let Cas::Swapped { old, new } = out else {
            panic!("expected a swap, got {out:?}")
        };
        assert_eq!(old.state, LeaseState::Active);
        assert_eq!(new.state, LeaseState::Revoked);
        assert_eq!(metrics.active_leases.get(), 0);
        assert_eq!(metrics.revocations.get(), 1);

        // Already revoked: kept, gauges unchanged.
        let out = records
            .edit_lease("l_1", revoke_if_active("admin", "again", 6))
            .unwrap();
        assert!(matches!(out, Cas::Kept(l) if l.revoke_reason.as_deref() == Some("why")));
        assert_eq!(metrics.revocations.get(), 1);
        assert!(matches!(
            records
                .edit_lease("l_none", revoke_if_active("a", "", 1))
                .unwrap(),
            Cas::Missing
        ));
    }

    #[test]
    fn a_swap_that_never_settles_gives_up_with_an_error() {
        let out = cas(
            Some(1u32),
            || Ok(Some(1)),
            |_, _| Ok(false),
            |v| Ok::<_, StoreError>(Some(v + 1)),
        );
        assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
    }

    #[test]
    fn a_lost_race_reads_again_and_edits_the_newer_record() {
        let records = Records::new(Arc::new(MemStore::new()), Arc::new(Metrics::new()));
        records.create_lease(&lease("l_1"), None).unwrap();
        let stale = records.store().lease("l_1").unwrap();
        // Someone renews in between: the stale copy loses its swap.
        let mut renewed = stale.clone().unwrap();
        renewed.renewals = 1;
        assert!(
            records
                .store()
                .swap_lease(stale.as_ref().unwrap(), &renewed)
                .unwrap()
        );
        let mut seen = Vec::new();
        let out = records
            .edit_lease_from(stale, |l| {
                seen.push(l.renewals);
                Ok::<_, StoreError>(Some(revoked(l, "a", "", 2)))
            })
            .unwrap();
        assert_eq!(seen, [0, 1], "the edit ran again on the newer record");
        assert!(matches!(out, Cas::Swapped { new, .. } if new.renewals == 1));
    }
}

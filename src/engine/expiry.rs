//! Time-driven work: the deadline state and the task that acts on it. The
//! task sleeps until the next lease or request deadline, wakes early when an
//! earlier one is stored, and survives a restart by reading its next
//! deadline from the store's indexes (it never loads every lease).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{Cas, Engine, EngineError, SYSTEM_ACTOR};
use crate::audit::{Action, Entry as AuditEntry};
use crate::model::{Lease, LeaseState, RequestState, TokenRequest};
use crate::notify::EventKind;
use crate::store::Millis;

/// How long to back off after a store error before trying again.
const RETRY: Duration = Duration::from_secs(1);
/// Ids read per index scan.
const BATCH: usize = 1024;
/// On a shared store, the longest the leader goes without looking for due
/// deadlines (other brokers' grants do not wake it).
const SHARED_LOOK: Duration = Duration::from_secs(1);

/// What the expiry task sleeps towards, and how far it has got.
pub(super) struct Deadlines {
    /// Deadline the task sleeps until (`u64::MAX`: none known).
    scheduled: AtomicU64,
    wake: Notify,
    progress: watch::Sender<Millis>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            scheduled: AtomicU64::new(0),
            wake: Notify::new(),
            progress: watch::channel(0).0,
        }
    }
}

impl Deadlines {
    /// A new deadline was stored. If it is earlier than what the task sleeps
    /// towards, pull the published progress back below it and wake the task.
    pub(super) fn note(&self, at: Millis) {
        if at < self.scheduled.fetch_min(at, Ordering::AcqRel) {
            self.progress.send_if_modified(|p| {
                let lowered = *p >= at;
                if lowered {
                    *p = at.saturating_sub(1);
                }
                lowered
            });
            self.wake.notify_one();
        }
    }

    /// After a sweep at `now`: every deadline before the next scheduled one
    /// has been handled. Reading `scheduled` under the channel's lock orders
    /// this against [`Deadlines::note`] lowering it.
    fn publish(&self, now: Millis) {
        self.progress.send_modify(|p| {
            let next = self.scheduled.load(Ordering::Acquire);
            *p = now.max(next.saturating_sub(1));
        });
    }
}

impl Engine {
    /// Time up to which every deadline has been handled by the expiry task.
    pub fn expiry_progress(&self) -> watch::Receiver<Millis> {
        self.deadlines.progress.subscribe()
    }

    /// Run the expiry task until `cancel` fires.
    pub async fn run_expiry(self: Arc<Self>, cancel: CancellationToken) {
        // Where other brokers may store deadlines this one is not told of
        // (a store with news of others), look at least this often.
        let shared = self.store().changes().is_some();
        while self.until_leading(&cancel).await {
            let now = self.clock.now();
            let next = match self.sweep(now).await {
                Ok(next) => {
                    self.deadlines.publish(now);
                    next
                }
                Err(e) => {
                    tracing::error!(error = %e, "expiry sweep failed; retrying");
                    Some(now + RETRY.as_millis() as u64)
                }
            };
            let clock = self.clock.clone();
            let sleep = async {
                match next {
                    Some(at) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let poll = async {
                if shared {
                    tokio::time::sleep(SHARED_LOOK).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.deadlines.wake.notified() => {}
                () = sleep => {}
                () = poll => {}
            }
        }
    }

    /// Expire what is due at `now`, then find the next deadline.
    async fn sweep(&self, now: Millis) -> Result<Option<Millis>, EngineError> {
        self.expire_due(now).await?;
        self.next_deadline().await
    }

    /// Expire every lease and request due at `now`. Returns how many changed.
    /// One operation per page of what is due, fenced by this broker's term
    /// on a shared store.
    pub async fn expire_due(&self, now: Millis) -> Result<usize, EngineError> {
        let mut changed = 0;
        loop {
            let page = self
                .commit(|mut op| async move {
                    op.fence(self.upkeep_fence());
                    let page = self.plan_expiry(&mut op, now).await?;
                    Ok((op, page))
                })
                .await?;
            for (id, subject) in &page.leases {
                self.metrics.expiry("lease");
                tracing::info!(jti = %id, sub = %subject, "expired");
            }
            for req in &page.requests {
                self.metrics.expiry("request");
                tracing::info!(request_id = %req.id, "request expired");
                self.announce(EventKind::Expired, req, SYSTEM_ACTOR, expiry_reason(req));
            }
            let n = page.leases.len() + page.requests.len();
            changed += n;
            if !page.more || n == 0 {
                return Ok(changed);
            }
        }
    }

    /// One page of expiry: every lease and request due at `now` (up to a
    /// page of each) marked expired in `op`, with their records.
    async fn plan_expiry(&self, op: &mut super::Op, now: Millis) -> Result<Expired, EngineError> {
        let mut entries = Vec::new();
        let mut page = Expired::default();
        self.plan_lease_expiry(op, now, &mut page, &mut entries)
            .await?;
        self.plan_request_expiry(op, now, &mut page, &mut entries)
            .await?;
        op.record(entries)?;
        Ok(page)
    }

    /// The leases of [`Engine::plan_expiry`]'s page.
    async fn plan_lease_expiry(
        &self,
        op: &mut super::Op,
        now: Millis,
        page: &mut Expired,
        entries: &mut Vec<AuditEntry>,
    ) -> Result<(), EngineError> {
        let due = self
            .store()
            .due(crate::store::Due::Leases, now, BATCH)
            .await?;
        page.more |= due.len() == BATCH;
        for id in due {
            let out = self
                .records
                .edit_lease(op, &id, |l| {
                    let due = l.state == LeaseState::Active && l.expires_at <= now;
                    Ok::<_, EngineError>(due.then(|| Lease {
                        state: LeaseState::Expired,
                        expired_at: Some(now),
                        ..l.clone()
                    }))
                })
                .await?;
            let Cas::Swapped { new, .. } = out else {
                continue;
            };
            entries.push(AuditEntry::ok(
                SYSTEM_ACTOR,
                Action::LeaseExpired,
                &id,
                &new.scopes,
                "",
            ));
            // A parent can end before its children's deadlines only if a
            // renewal shortened it (children are capped at the parent's end
            // when made and when renewed): then they end with it. Other
            // parents cost no index walk here.
            if new.renewals > 0 {
                entries.extend(
                    super::cascade::end_descendants(
                        &self.records,
                        op,
                        &id,
                        SYSTEM_ACTOR,
                        "expired",
                        now,
                    )
                    .await?
                    .0,
                );
            }
            page.leases.push((id, new.subject));
        }
        Ok(())
    }

    /// The requests of [`Engine::plan_expiry`]'s page.
    async fn plan_request_expiry(
        &self,
        op: &mut super::Op,
        now: Millis,
        page: &mut Expired,
        entries: &mut Vec<AuditEntry>,
    ) -> Result<(), EngineError> {
        let due = self
            .store()
            .due(crate::store::Due::Requests, now, BATCH)
            .await?;
        page.more |= due.len() == BATCH;
        for id in due {
            let out = self
                .records
                .edit_request(op, &id, |r| {
                    let due = !r.state.is_terminal() && r.deadline <= now;
                    Ok::<_, EngineError>(due.then(|| {
                        r.moved(RequestState::Expired, SYSTEM_ACTOR, now, expiry_reason(r))
                    }))
                })
                .await?;
            if let Cas::Swapped { new, .. } = out {
                entries.push(AuditEntry::ok(
                    SYSTEM_ACTOR,
                    Action::RequestExpired,
                    &new.id,
                    &new.scopes,
                    expiry_reason(&new),
                ));
                page.requests.push(new);
            }
        }
        Ok(())
    }

    /// Earliest pending deadline, recorded as what the expiry task sleeps to.
    async fn next_deadline(&self) -> Result<Option<Millis>, EngineError> {
        let next = match (
            self.store()
                .next_deadline(crate::store::Due::Leases)
                .await?,
            self.store()
                .next_deadline(crate::store::Due::Requests)
                .await?,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.deadlines
            .scheduled
            .store(next.unwrap_or(u64::MAX), Ordering::Release);
        Ok(next)
    }
}

/// What one page of expiry changed.
#[derive(Default)]
struct Expired {
    /// Leases expired: (id, subject).
    leases: Vec<(String, String)>,
    /// Requests expired, as they now are.
    requests: Vec<TokenRequest>,
    /// A page was full: there may be more due.
    more: bool,
}

/// Why a request expires (or expired), from the state it expires from. On
/// an expired request, the reason recorded with the transition.
fn expiry_reason(r: &TokenRequest) -> &str {
    match r.state {
        RequestState::Approved => "claim window passed",
        RequestState::Expired => r.history.last().map_or("", |t| t.reason.as_str()),
        _ => "pending_ttl passed without enough approvals",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{POLICY, T0, actions, granted, parked, rig};

    #[tokio::test]
    async fn leases_and_requests_expire_at_their_deadlines_and_not_before() {
        let r = rig(POLICY).await;
        let lease = granted(&r, &["read"]).await;
        let req = parked(&r, &["admin"]).await;
        assert_eq!(r.engine.expire_due(lease.expires_at - 1).await.unwrap(), 0);
        assert_eq!(
            r.engine.next_deadline().await.unwrap(),
            Some(lease.expires_at)
        );
        assert_eq!(r.engine.expire_due(lease.expires_at).await.unwrap(), 1);
        assert_eq!(
            r.store.lease(&lease.id).await.unwrap().unwrap().state,
            LeaseState::Expired
        );
        assert_eq!(r.engine.next_deadline().await.unwrap(), Some(req.deadline));
        assert_eq!(r.engine.expire_due(req.deadline).await.unwrap(), 1);
        let expired = r.store.request(&req.id).await.unwrap().unwrap();
        assert_eq!(expired.state, RequestState::Expired);
        assert_eq!(
            expiry_reason(&expired),
            "pending_ttl passed without enough approvals"
        );
        assert_eq!(r.engine.next_deadline().await.unwrap(), None);
        assert_eq!(r.engine.metrics().active_leases.get(), 0);
        assert_eq!(
            actions(r.store.as_ref()).await,
            [
                "token.granted",
                "request.parked",
                "lease.expired",
                "request.expired"
            ]
        );
    }

    /// A leader whose term another broker took (it stalled, its renewals
    /// hung) acts no more: its batches are refused by the shared store and
    /// nothing of them, records included, is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_leader_expires_nothing_on_a_shared_store() {
        let Some(store) = crate::store::conformance::postgres_store().await else {
            return;
        };
        let store: Arc<dyn crate::store::Store> = Arc::new(store);
        let r = crate::engine::testing::rig_on(store.clone(), POLICY).await;
        let lease = granted(&r, &["read"]).await;
        let g1 = store.lead("upkeep", "a", 60_000).await.unwrap().unwrap();
        let fence = |generation| crate::store::Fence {
            role: "upkeep".into(),
            holder: "a".into(),
            generation,
        };
        // Leading as far as this engine knows, with no deadline of its own.
        r.engine.set_leading(true, None, Some(fence(g1)));
        // Meanwhile the term ends and broker b takes the role.
        store.resign("upkeep", "a").await.unwrap();
        store.lead("upkeep", "b", 60_000).await.unwrap().unwrap();
        let before = actions(store.as_ref()).await;
        let out = r.engine.expire_due(lease.expires_at).await;
        assert!(matches!(out, Err(EngineError::Fenced)), "{out:?}");
        assert_eq!(
            store.lease(&lease.id).await.unwrap().unwrap().state,
            LeaseState::Active
        );
        assert_eq!(actions(store.as_ref()).await, before, "no record either");
        assert!(
            r.engine.sign_checkpoint().await.is_err(),
            "nor a checkpoint"
        );
        // Leading again (a new term): it acts.
        store.resign("upkeep", "b").await.unwrap();
        let g3 = store.lead("upkeep", "a", 60_000).await.unwrap().unwrap();
        r.engine.set_leading(true, None, Some(fence(g3)));
        assert_eq!(r.engine.expire_due(lease.expires_at).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_earlier_deadline_lowers_the_published_progress() {
        let r = rig(POLICY).await;
        let d = &r.engine.deadlines;
        d.scheduled.store(T0 + 10_000, Ordering::Release);
        d.publish(T0);
        assert_eq!(*r.engine.expiry_progress().borrow(), T0 + 9_999);
        d.note(T0 + 5_000);
        assert_eq!(*r.engine.expiry_progress().borrow(), T0 + 4_999);
        d.note(T0 + 8_000);
        assert_eq!(
            *r.engine.expiry_progress().borrow(),
            T0 + 4_999,
            "later: unchanged"
        );
    }
}

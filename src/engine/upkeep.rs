//! Upkeep: retention of ended records and of old audit records, signed
//! checkpoints of the trail, and policy hot-swaps.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Engine, EngineError, SYSTEM_ACTOR};
use crate::audit::{Action, Entry as AuditEntry};
use crate::policy::Policy;
use crate::store::{Millis, Row, Table, Write};

/// Rows read per page of retention.
const RETENTION_PAGE: usize = 1000;

/// Did a record that ended at `ended` (if it did) end before `before`?
fn ended_before(ended: Option<Millis>, before: Millis) -> bool {
    ended.is_some_and(|t| t < before)
}

/// Ids of ended records of one retention operation.
#[derive(Default)]
struct Purge {
    leases: Vec<String>,
    requests: Vec<String>,
}

impl Purge {
    /// `row` too, if it ended before `before`.
    fn add(&mut self, row: Row, before: Millis) {
        match row {
            Row::Lease(l) if ended_before(l.ended_at(), before) => self.leases.push(l.id),
            Row::Request(r) if ended_before(r.ended_at(), before) => self.requests.push(r.id),
            _ => {}
        }
    }

    fn len(&self) -> usize {
        self.leases.len() + self.requests.len()
    }
}

/// Policy reloads since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyReloads {
    /// New policies swapped in.
    pub loaded: u64,
    /// New policy files rejected.
    pub rejected: u64,
}

/// One policy swap: the policy that was in force and the one that is now.
#[derive(Clone, Debug)]
pub struct PolicySwap {
    /// In force before.
    pub old: Arc<Policy>,
    /// In force now.
    pub new: Arc<Policy>,
}

impl Engine {
    /// Sign a checkpoint over the newest audit record now, every record
    /// this broker noted before the call included (scheduled by the server;
    /// tests call it directly).
    pub async fn checkpoint_audit(&self) -> Result<Option<u64>, EngineError> {
        self.settled().await?;
        Ok(self.sign_checkpoint().await?.map(|(seq, _)| seq))
    }

    /// [`Engine::checkpoint_audit`], returning the durable checkpoint's JWS
    /// too, for an external witness.
    pub async fn sign_checkpoint(&self) -> Result<Option<(u64, String)>, EngineError> {
        let signed = crate::audit::AuditLog::checkpoint(
            self.store().as_ref(),
            &self.keys.current(),
            &self.issuer,
            self.clock.now(),
        )
        .await?;
        if let Some((seq, jws)) = &signed {
            self.commit(|mut op| async move {
                op.fence(self.upkeep_fence());
                op.write(crate::store::Write::PutCheckpoint(
                    *seq,
                    jws.as_bytes().to_vec(),
                ));
                Ok((op, ()))
            })
            .await?;
        }
        Ok(signed)
    }

    /// Retention: delete leases and requests that ended before `before`.
    /// Read a page at a time; up to a page of deletions and their record
    /// (with the counts) are one operation, so nothing goes unrecorded.
    pub async fn purge_ended(&self, before: Millis) -> Result<(u64, u64), EngineError> {
        let mut total = (0, 0);
        let mut due = Purge::default();
        for table in [Table::Leases, Table::Requests] {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self
                    .store()
                    .scan(table, after.as_deref(), RETENTION_PAGE)
                    .await?;
                let done = page.len() < RETENTION_PAGE;
                after = page.last().map(|(k, _)| k.clone());
                for (_, row) in page {
                    due.add(row, before);
                    if due.len() >= RETENTION_PAGE {
                        let (l, r) = self.purge(std::mem::take(&mut due), before).await?;
                        total = (total.0 + l, total.1 + r);
                    }
                }
                if done {
                    break;
                }
                // A whole table is many pages: let other tasks run between.
                tokio::task::yield_now().await;
            }
        }
        let (l, r) = self.purge(due, before).await?;
        total = (total.0 + l, total.1 + r);
        if total != (0, 0) {
            tracing::info!(
                leases = total.0,
                requests = total.1,
                "retention: ended records purged"
            );
        }
        Ok(total)
    }

    /// One operation of retention, fenced: each record of `due` read again
    /// (a plan that lost a race runs again from fresh reads) and deleted if
    /// it still ended before `before`, and the record that counts them.
    async fn purge(&self, due: Purge, before: Millis) -> Result<(u64, u64), EngineError> {
        if due.len() == 0 {
            return Ok((0, 0));
        }
        let due = &due;
        self.commit(|mut op| async move {
            op.fence(self.upkeep_fence());
            let mut gone = Purge::default();
            for id in &due.leases {
                if let Some(l) = self.store().lease(id).await?
                    && ended_before(l.ended_at(), before)
                {
                    op.write(Write::DeleteLease(l));
                    gone.leases.push(id.clone());
                }
            }
            for id in &due.requests {
                if let Some(r) = self.store().request(id).await?
                    && ended_before(r.ended_at(), before)
                {
                    op.write(Write::DeleteRequest(r));
                    gone.requests.push(id.clone());
                }
            }
            let counts = (gone.leases.len() as u64, gone.requests.len() as u64);
            if gone.len() > 0 {
                let summary = format!(
                    "{} leases and {} requests that ended before {before}",
                    counts.0, counts.1
                );
                let entry =
                    AuditEntry::ok(SYSTEM_ACTOR, Action::RetentionPurged, "", &[], &summary);
                op.record(vec![entry])?;
            }
            Ok((op, counts))
        })
        .await
    }

    /// Retention: remove audit records older than `before`, up to the newest
    /// signed checkpoint before it, so what remains still verifies. The
    /// removal and its record are one operation.
    pub async fn compact_audit(&self, before: Millis) -> Result<Option<u64>, EngineError> {
        let point = crate::audit::AuditLog::compaction_point(
            self.store().as_ref(),
            &self.keys.current(),
            before,
        )
        .await?;
        let Some((seq, anchor)) = point else {
            return Ok(None);
        };
        // Signed: a compaction record someone appends without the key is
        // found by `audit verify`.
        let proof = crate::audit::sign_compaction(
            &self.keys.current(),
            &self.issuer,
            seq,
            &anchor,
            self.clock.now(),
        )?;
        let proof = &proof;
        self.commit(|mut op| async move {
            op.fence(self.upkeep_fence());
            op.write(Write::CompactAudit(seq));
            op.record(vec![
                AuditEntry::ok(
                    SYSTEM_ACTOR,
                    Action::AuditCompacted,
                    &seq.to_string(),
                    &[],
                    "retention",
                )
                .rule(proof.clone()),
            ])?;
            Ok((op, ()))
        })
        .await?;
        tracing::info!(through = seq, "audit trail compacted");
        Ok(Some(seq))
    }

    /// Swap in a new (already validated) policy; requests in flight finish
    /// under the one they started with.
    pub fn set_policy(&self, p: Policy) {
        let new = Arc::new(p);
        let old = match self.policy.write() {
            Ok(mut g) => std::mem::replace(&mut *g, new.clone()),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new.clone()),
        };
        // No one listening is fine (no console).
        let _ = self.policy_swaps.send(PolicySwap { old, new });
        self.policy_reloads.send_modify(|r| r.loaded += 1);
    }

    /// Every policy swap from now on. A receiver that falls behind is told
    /// it lagged, and must then assume anything changed.
    pub fn policy_swaps(&self) -> tokio::sync::broadcast::Receiver<PolicySwap> {
        self.policy_swaps.subscribe()
    }

    /// Record that a new policy file was rejected (the old one stays).
    pub fn policy_rejected(&self) {
        self.policy_reloads.send_modify(|r| r.rejected += 1);
    }

    /// Reload counters since start (tests and metrics wait on them).
    pub fn policy_reloads(&self) -> watch::Receiver<PolicyReloads> {
        self.policy_reloads.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::engine::testing::{POLICY, actions, ask, granted, rig, workload};
    use crate::policy::Policy;

    #[tokio::test]
    async fn retention_purges_only_what_ended_before_the_cutoff() {
        let r = rig(POLICY).await;
        let lease = granted(&r, &["read"]).await;
        r.engine.revoke(&workload(), &lease.id, "").await.unwrap();
        assert_eq!(r.engine.purge_ended(lease.issued_at).await.unwrap(), (0, 0));
        r.clock.advance(Duration::from_secs(10));
        assert_eq!(
            r.engine
                .purge_ended(crate::clock::Clock::now(r.clock.as_ref()))
                .await
                .unwrap(),
            (1, 0)
        );
        assert!(r.store.lease(&lease.id).await.unwrap().is_none());
        assert_eq!(
            actions(r.store.as_ref()).await.last().unwrap(),
            "retention.purged"
        );
    }

    #[tokio::test]
    async fn checkpoints_cover_new_records_only_and_policy_swaps_are_counted() {
        let r = rig(POLICY).await;
        assert_eq!(
            r.engine.checkpoint_audit().await.unwrap(),
            None,
            "empty trail"
        );
        r.engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap();
        assert_eq!(r.engine.checkpoint_audit().await.unwrap(), Some(1));
        assert_eq!(r.engine.checkpoint_audit().await.unwrap(), None);
        r.engine.set_policy(Policy::parse(POLICY).unwrap());
        r.engine.policy_rejected();
        let reloads = *r.engine.policy_reloads().borrow();
        assert_eq!((reloads.loaded, reloads.rejected), (1, 1));
    }
}

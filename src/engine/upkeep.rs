//! Upkeep: retention of ended records and of old audit records, signed
//! checkpoints of the trail, and policy hot-swaps.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Engine, EngineError, SYSTEM_ACTOR};
use crate::audit::{Action, Entry as AuditEntry};
use crate::policy::Policy;
use crate::store::Millis;

/// Policy reloads since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyReloads {
    /// New policies swapped in.
    pub loaded: u64,
    /// New policy files rejected.
    pub rejected: u64,
}

impl Engine {
    /// Sign a checkpoint over the newest audit record now (scheduled by the
    /// server; tests call it directly).
    pub async fn checkpoint_audit(&self) -> Result<Option<u64>, EngineError> {
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
        )?;
        if let Some((seq, jws)) = &signed {
            self.commit(|op| {
                op.fence(self.upkeep_fence());
                op.write(crate::store::Write::PutCheckpoint(
                    *seq,
                    jws.as_bytes().to_vec(),
                ));
                Ok(())
            })
            .await?;
        }
        Ok(signed)
    }

    /// Retention: delete leases and requests that ended before `before`
    /// (recorded in the trail with the counts).
    pub async fn purge_ended(&self, before: Millis) -> Result<(u64, u64), EngineError> {
        let store = self.store().clone();
        let counts = tokio::task::spawn_blocking(move || store.purge_ended(before)).await??;
        if counts != (0, 0) {
            let summary = format!(
                "{} leases and {} requests that ended before {before}",
                counts.0, counts.1
            );
            let entry = AuditEntry::ok(SYSTEM_ACTOR, Action::RetentionPurged, "", &[], &summary);
            self.record_fenced(vec![entry]).await?;
            tracing::info!(
                leases = counts.0,
                requests = counts.1,
                "retention: ended records purged"
            );
        }
        Ok(counts)
    }

    /// Retention: remove audit records older than `before`, up to the newest
    /// signed checkpoint before it, so what remains still verifies.
    pub async fn compact_audit(&self, before: Millis) -> Result<Option<u64>, EngineError> {
        let point = self
            .audit
            .compact(self.store().as_ref(), &self.keys.current(), before)?;
        if let Some(seq) = point {
            let entry = AuditEntry::ok(
                SYSTEM_ACTOR,
                Action::AuditCompacted,
                &seq.to_string(),
                &[],
                "retention",
            );
            self.record_fenced(vec![entry]).await?;
            tracing::info!(through = seq, "audit trail compacted");
        }
        Ok(point)
    }

    /// Record leader-only work that is already done.
    async fn record_fenced(&self, entries: Vec<AuditEntry>) -> Result<(), EngineError> {
        self.commit(|op| {
            op.fence(self.upkeep_fence());
            Ok(op.record(entries.clone())?)
        })
        .await
    }

    /// Swap in a new (already validated) policy; requests in flight finish
    /// under the one they started with.
    pub fn set_policy(&self, p: Policy) {
        match self.policy.write() {
            Ok(mut g) => *g = Arc::new(p),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(p),
        }
        self.policy_reloads.send_modify(|r| r.loaded += 1);
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
        let r = rig(POLICY);
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
        assert!(r.store.lease(&lease.id).unwrap().is_none());
        assert_eq!(
            actions(r.store.as_ref()).last().unwrap(),
            "retention.purged"
        );
    }

    #[tokio::test]
    async fn checkpoints_cover_new_records_only_and_policy_swaps_are_counted() {
        let r = rig(POLICY);
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

//! Carrying out signing-key rotation: the steps [`crate::rotation::plan`]
//! finds due, an operator's request to rotate sooner, and emergency
//! rotation (withdraw the active key at once and revoke what it signed).

use std::sync::Arc;

use super::records::revoke_if_active;
use super::{Cas, Engine, EngineError, SYSTEM_ACTOR};
use crate::audit::{Action, Entry as AuditEntry};
use crate::clock::millis;
use crate::identity::Identity;
use crate::rotation::{Schedule, Step, plan};
use crate::store::{KeyRecord, KeyState, Millis};
use crate::text::check_reason;

/// An operator's `Keys.Rotate`.
#[derive(Clone, Debug, Default)]
pub struct Rotation {
    /// Withdraw keys now rather than bring the next hand-over forward.
    pub emergency: bool,
    /// Emergency only: the key to withdraw; empty for every key whose
    /// private part exists.
    pub kid: String,
    /// Why (recorded).
    pub reason: String,
}

/// Meta key: when an operator asked for the next rotation.
const FORCED: &str = "rotation_forced_at";

impl Engine {
    fn forced_rotation(&self) -> Result<Option<Millis>, EngineError> {
        Ok(self
            .store()
            .meta(FORCED)?
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok())))
    }

    /// Carry out every rotation step due at `now`; returns when to look again.
    pub async fn rotate_due(
        &self,
        schedule: &Schedule,
        now: Millis,
    ) -> Result<Option<Millis>, EngineError> {
        self.alone_on_keys(self.rotate_due_here(schedule, now))
            .await
    }

    async fn rotate_due_here(
        &self,
        schedule: &Schedule,
        now: Millis,
    ) -> Result<Option<Millis>, EngineError> {
        let (steps, wake) = plan(
            now,
            &self.store().keys()?,
            schedule,
            self.forced_rotation()?,
        );
        if steps.is_empty() {
            return Ok(wake);
        }
        // Retired keys stay published for the longest token they could
        // have signed (the policy's hard TTL cap) plus leeway.
        let retire_after = millis(self.policy().hard_max_ttl) + millis(schedule.leeway);
        let mut entries = Vec::new();
        for step in steps {
            match step {
                Step::CreateNext => entries.push(self.create_next(now)?),
                Step::Promote { next, old } => {
                    entries.extend(self.promote(&next, old.as_deref(), now, retire_after)?);
                }
                Step::Remove(kid) => {
                    self.unpublish(&kid, KeyState::Removed)?;
                    tracing::info!(%kid, "retired key unpublished");
                    entries.push(key_entry(Action::KeyRemoved, &kid, "last token expired"));
                }
            }
        }
        self.record(entries).await?;
        self.keys.reload(self.store().as_ref())?;
        let (_, wake) = plan(
            now,
            &self.store().keys()?,
            schedule,
            self.forced_rotation()?,
        );
        Ok(wake)
    }

    /// Create and publish the next key.
    fn create_next(&self, now: Millis) -> Result<AuditEntry, EngineError> {
        let rec = self.keys.generate(KeyState::Next, now)?;
        self.store().put_key(&rec)?;
        tracing::info!(kid = %rec.kid, "next signing key published");
        Ok(key_entry(Action::KeyCreated, &rec.kid, "published as next"))
    }

    /// NEXT `next` starts signing; ACTIVE `old` retires.
    fn promote(
        &self,
        next: &str,
        old: Option<&str>,
        now: Millis,
        retire_after: Millis,
    ) -> Result<Vec<AuditEntry>, EngineError> {
        let mut entries = Vec::new();
        for mut k in self.store().keys()? {
            if k.kid == next {
                k.state = KeyState::Active;
                k.activated_at = Some(now);
                self.store().put_key(&k)?;
            } else if Some(k.kid.as_str()) == old {
                k.state = KeyState::Retired;
                k.retire_at = Some(now.saturating_add(retire_after));
                self.store().put_key(&k)?;
                entries.push(key_entry(Action::KeyRetired, &k.kid, ""));
            }
        }
        self.store().put_meta(FORCED, b"")?;
        tracing::info!(kid = %next, retired = ?old, "signing key rotated");
        entries.push(key_entry(Action::KeyActivated, next, ""));
        Ok(entries)
    }

    /// `Keys.Rotate`: admin only. Scheduled: bring the hand-over forward to
    /// as soon as a published NEXT key may sign (pre-publication is never
    /// skipped). Emergency: remove the active key now, revoke the leases it
    /// signed, and sign with a fresh key at once. Runs to completion on its
    /// own task even if the caller goes away, so a rotation is never left
    /// half done.
    pub async fn rotate_now(
        self: &Arc<Self>,
        who: &Identity,
        ask: Rotation,
        schedule: &Schedule,
    ) -> Result<(), EngineError> {
        check_reason("reason", &ask.reason, false)?;
        if !ask.emergency && !ask.kid.is_empty() {
            return Err(crate::text::FieldError::new(
                "kid",
                "only an emergency rotation withdraws a named key",
            )
            .into());
        }
        let (me, who, schedule) = (self.clone(), who.clone(), *schedule);
        tokio::spawn(async move {
            me.alone_on_keys(me.rotate_now_here(&who, &ask, &schedule))
                .await
        })
        .await?
    }

    async fn rotate_now_here(
        &self,
        who: &Identity,
        ask: &Rotation,
        schedule: &Schedule,
    ) -> Result<(), EngineError> {
        self.require_admin(who, "key rotation")?;
        let (now, reason) = (self.clock.now(), ask.reason.as_str());
        if ask.emergency {
            return self.rotate_emergency(who, &ask.kid, reason, now).await;
        }
        self.store().put_meta(FORCED, now.to_string().as_bytes())?;
        let entry = AuditEntry::ok(who.as_str(), Action::KeyRotationRequested, "", &[], reason);
        self.record(vec![entry]).await?;
        self.rotate_due_here(schedule, now).await?;
        Ok(())
    }

    /// Withdraw `kid` (or every key with a private part) now: if the active
    /// key goes, a published NEXT key (or a fresh one) signs at once; every
    /// active lease a withdrawn key signed is revoked; the withdrawn keys
    /// leave the JWKS and their private parts are destroyed.
    async fn rotate_emergency(
        &self,
        who: &Identity,
        kid: &str,
        reason: &str,
        now: Millis,
    ) -> Result<(), EngineError> {
        let keys = self.store().keys()?;
        let targets = emergency_targets(&keys, kid)?;
        // Something must sign afterwards: a published NEXT key that is not
        // withdrawn, else a fresh one.
        let fresh = if targets.iter().any(|k| k.state == KeyState::Active) {
            let mut fresh = match keys
                .iter()
                .find(|k| k.state == KeyState::Next && !targets.iter().any(|t| t.kid == k.kid))
            {
                Some(n) => n.clone(),
                None => self.keys.generate(KeyState::Next, now)?,
            };
            fresh.state = KeyState::Active;
            fresh.activated_at = Some(now);
            self.store().put_key(&fresh)?;
            Some(fresh)
        } else {
            None
        };
        let mut entries = Vec::new();
        for old in &targets {
            self.unpublish(&old.kid, KeyState::Withdrawn)?;
            let count = self
                .revoke_signed_by(&old.kid, who, "emergency key rotation", now)
                .await?;
            let summary = format!("{reason}; {count} leases revoked");
            entries.push(AuditEntry::ok(
                who.as_str(),
                Action::KeyEmergencyRotated,
                &old.kid,
                &[],
                &summary,
            ));
            tracing::warn!(withdrawn = %old.kid, revoked = count, "emergency key rotation");
        }
        if let Some(f) = &fresh {
            entries.push(AuditEntry::ok(
                who.as_str(),
                Action::KeyActivated,
                &f.kid,
                &[],
                "emergency",
            ));
        }
        self.record(entries).await?;
        self.keys.reload(self.store().as_ref())?;
        Ok(())
    }

    /// Stop publishing key `kid` and destroy its private part, keeping the
    /// public key (in state `to`) so the trail's checkpoints it signed can
    /// still be checked.
    fn unpublish(&self, kid: &str, to: KeyState) -> Result<(), EngineError> {
        if let Some(mut k) = self.store().keys()?.into_iter().find(|k| k.kid == kid) {
            k.state = to;
            k.sealed_private = Vec::new();
            self.store().put_key(&k)?;
        }
        Ok(())
    }

    /// Revoke every active lease whose latest token `kid` signed.
    async fn revoke_signed_by(
        &self,
        kid: &str,
        who: &Identity,
        reason: &str,
        now: Millis,
    ) -> Result<u64, EngineError> {
        let store = self.store().clone();
        let k = kid.to_owned();
        let ids = tokio::task::spawn_blocking(move || store.active_leases_signed_by(&k)).await??;
        let mut count = 0u64;
        for id in ids {
            let edit = revoke_if_active(who.as_str(), reason, now);
            if let Cas::Swapped { .. } = self.records.edit_lease(&id, edit)? {
                count += 1;
                // A token delegated from one signed by the withdrawn key
                // ends too (the summary the caller records counts it).
                let delegated =
                    super::cascade::end_descendants(&self.records, &id, who.as_str(), reason, now)?;
                count += delegated.len() as u64;
            }
        }
        Ok(count)
    }
}

/// The keys an emergency rotation withdraws: `kid` (which must be
/// published), or — when empty — every key whose private part exists, since
/// any of them may be the one that leaked.
fn emergency_targets(keys: &[KeyRecord], kid: &str) -> Result<Vec<KeyRecord>, EngineError> {
    let published = keys.iter().filter(|k| k.state.is_published());
    if kid.is_empty() {
        return Ok(published.cloned().collect());
    }
    crate::text::require_id("kid", kid)?;
    match published.clone().find(|k| k.kid == kid) {
        Some(k) => Ok(vec![k.clone()]),
        None => Err(EngineError::not_found("published key", kid)),
    }
}

fn key_entry(action: Action, kid: &str, reason: &str) -> AuditEntry {
    AuditEntry::ok(SYSTEM_ACTOR, action, kid, &[], reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{POLICY, granted, id, rig, workload};
    use crate::store::LeaseState;

    fn emergency(kid: &str) -> Rotation {
        Rotation {
            emergency: true,
            kid: kid.into(),
            reason: "leaked".into(),
        }
    }

    #[tokio::test]
    async fn emergency_rotation_withdraws_the_key_and_revokes_what_it_signed() {
        let r = rig(POLICY);
        let lease = granted(&r, &["read"]).await;
        let schedule = Schedule::default();
        let err = r
            .engine
            .rotate_now(&workload(), emergency(""), &schedule)
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::NotAllowed(_)));
        let root = id("spiffe://t/human/root");
        r.engine
            .rotate_now(&root, emergency(""), &schedule)
            .await
            .unwrap();
        let keys = r.store.keys().unwrap();
        let old = keys.iter().find(|k| k.kid == lease.kid).unwrap();
        assert_eq!(old.state, KeyState::Withdrawn);
        assert!(old.sealed_private.is_empty(), "private part destroyed");
        let set = r.engine.keys().current();
        assert_ne!(set.active.kid, lease.kid);
        assert!(!set.verify.contains_key(&lease.kid), "no longer trusted");
        assert!(!set.jwks_json.contains(&lease.kid), "no longer published");
        assert!(set.withdrawn.contains(&lease.kid));
        assert_eq!(
            r.store.lease(&lease.id).unwrap().unwrap().state,
            LeaseState::Revoked
        );
        let err = r
            .engine
            .rotate_now(&root, emergency("nope"), &schedule)
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn scheduled_steps_publish_then_promote() {
        let r = rig(POLICY);
        let schedule = Schedule::default();
        let first = r.engine.keys().current().active.kid.clone();
        let period = millis(schedule.period);
        let wake = r
            .engine
            .rotate_due(&schedule, crate::engine::testing::T0)
            .await
            .unwrap();
        let publish_at = wake.unwrap();
        r.engine.rotate_due(&schedule, publish_at).await.unwrap();
        assert_eq!(r.store.keys().unwrap().len(), 2, "next key published");
        r.engine
            .rotate_due(&schedule, crate::engine::testing::T0 + period)
            .await
            .unwrap();
        assert_ne!(r.engine.keys().current().active.kid, first, "promoted");
    }
}

//! Carrying out signing-key rotation: the steps [`crate::rotation::plan`]
//! finds due, an operator's request to rotate sooner, and emergency
//! rotation (withdraw the active key at once and revoke what it signed).

use std::sync::Arc;

use super::records::revoke_if_active;
use super::{Cas, Engine, EngineError, Op, SYSTEM_ACTOR};
use crate::audit::{Action, Entry as AuditEntry};
use crate::clock::millis;
use crate::identity::Identity;
use crate::model::{KeyRecord, KeyState};
use crate::rotation::{Schedule, Step, plan};
use crate::store::{Millis, Write};
use crate::text::check_reason;

/// Ids of leases signed by a withdrawn key read per page.
const SIGNED_BY_PAGE: usize = 1000;

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

/// What an emergency rotation did (nothing, for a scheduled one): for the
/// operator who asked, who must not have to read the trail to learn it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Withdrawal {
    /// The keys withdrawn.
    pub withdrawn: Vec<String>,
    /// Active leases they signed, revoked.
    pub leases: u64,
    /// Leases delegated from those, ended with them.
    pub descendants: u64,
}

/// Meta key: when an operator asked for the next rotation.
const FORCED: &str = "rotation_forced_at";

/// Meta key: keys withdrawn in an emergency whose leases are not all
/// revoked yet (space-separated kids; empty when none). Written with the
/// withdrawal, cleared once the revocations are done, so a broker that
/// dies in between finishes them when it leads again.
const WITHDRAWING: &str = "keys_withdrawing";

impl Engine {
    async fn forced_rotation(&self) -> Result<Option<Millis>, EngineError> {
        Ok(self
            .store()
            .meta(FORCED)
            .await?
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
            &self.store().keys().await?,
            schedule,
            self.forced_rotation().await?,
        );
        if steps.is_empty() {
            return Ok(wake);
        }
        // Retired keys stay published for the longest token they could
        // have signed (the policy's hard TTL cap) plus leeway.
        let retire_after = millis(self.policy().hard_max_ttl) + millis(schedule.leeway);
        // Generated once, outside the plan: a retry must not mint another.
        let fresh = steps
            .iter()
            .any(|s| matches!(s, Step::CreateNext))
            .then(|| self.keys.generate(KeyState::Next, now))
            .transpose()?;
        let (steps_ref, fresh_ref) = (&steps, &fresh);
        self.commit(|mut op| async move {
            self.plan_steps(&mut op, steps_ref, fresh_ref.as_ref(), now, retire_after)
                .await?;
            Ok((op, ()))
        })
        .await?;
        for step in &steps {
            match step {
                Step::CreateNext => tracing::info!("next signing key published"),
                Step::Promote { next, old } => {
                    tracing::info!(kid = %next, retired = ?old, "signing key rotated");
                }
                Step::Remove(kid) => tracing::info!(%kid, "retired key unpublished"),
            }
        }
        self.keys.reload(self.store().as_ref()).await?;
        let (_, wake) = plan(
            now,
            &self.store().keys().await?,
            schedule,
            self.forced_rotation().await?,
        );
        Ok(wake)
    }

    /// The rotation steps due as one operation: the key changes and
    /// their records.
    async fn plan_steps(
        &self,
        op: &mut Op,
        steps: &[Step],
        fresh: Option<&KeyRecord>,
        now: Millis,
        retire_after: Millis,
    ) -> Result<(), EngineError> {
        op.fence(self.keys_fence());
        let keys = self.store().keys().await?;
        let mut entries = Vec::new();
        for step in steps {
            match step {
                Step::CreateNext => {
                    if let Some(rec) = fresh {
                        op.write(Write::PutKey(rec.clone()));
                        entries.push(key_entry(Action::KeyCreated, &rec.kid, "published as next"));
                    }
                }
                Step::Promote { next, old } => {
                    entries.extend(promote(op, &keys, next, old.as_deref(), now, retire_after));
                }
                Step::Remove(kid) => {
                    unpublish(op, &keys, kid, KeyState::Removed);
                    entries.push(key_entry(Action::KeyRemoved, kid, "last token expired"));
                }
            }
        }
        op.record(entries)?;
        Ok(())
    }

    /// `Keys.Rotate`: admin only. Scheduled: bring the hand-over forward to
    /// as soon as a published NEXT key may sign (pre-publication is never
    /// skipped). Emergency: remove the active key now, revoke the leases it
    /// signed, and sign with a fresh key at once. Runs to completion on its
    /// own task even if the caller goes away, so a rotation is never left
    /// half done. An emergency needs a reason.
    pub async fn rotate_now(
        self: &Arc<Self>,
        who: &Identity,
        ask: Rotation,
        schedule: &Schedule,
    ) -> Result<Withdrawal, EngineError> {
        check_reason("reason", &ask.reason, ask.emergency)?;
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
    ) -> Result<Withdrawal, EngineError> {
        self.require_admin(who, "key rotation")?;
        let (now, reason) = (self.clock.now(), ask.reason.as_str());
        if ask.emergency {
            return self.rotate_emergency(who, &ask.kid, reason, now).await;
        }
        self.commit(|mut op| async move {
            op.fence(self.keys_fence());
            op.write(Write::PutMeta(FORCED.into(), now.to_string().into_bytes()));
            op.record(vec![AuditEntry::ok(
                who.as_str(),
                Action::KeyRotationRequested,
                "",
                &[],
                reason,
            )])?;
            Ok((op, ()))
        })
        .await?;
        self.rotate_due_here(schedule, now).await?;
        Ok(Withdrawal::default())
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
    ) -> Result<Withdrawal, EngineError> {
        let keys = self.store().keys().await?;
        let targets = emergency_targets(&keys, kid)?;
        let fresh = self.signer_after(&keys, &targets, now)?;
        // First the keys: once this commits, the store refuses every new
        // lease signed by a withdrawn key (on every broker), so the scan
        // below misses none.
        self.withdraw(who, &targets, fresh.as_ref(), reason).await?;
        self.keys.reload(self.store().as_ref()).await?;
        let mut done = Withdrawal::default();
        for old in targets {
            let (leases, descendants) = self
                .revoke_signed_by(&old.kid, who.as_str(), "emergency key rotation", now)
                .await?;
            tracing::warn!(withdrawn = %old.kid, revoked = leases, descendants, "emergency key rotation");
            done.withdrawn.push(old.kid.clone());
            done.leases += leases;
            done.descendants += descendants;
        }
        self.withdrawals_done().await?;
        Ok(done)
    }

    /// Withdraw `targets` in one commit with their records: unpublished,
    /// private parts destroyed, `fresh` (if any) signing instead, and the
    /// pending revocations noted for a broker that dies before they run.
    async fn withdraw(
        &self,
        who: &Identity,
        targets: &[KeyRecord],
        fresh: Option<&KeyRecord>,
        reason: &str,
    ) -> Result<(), EngineError> {
        self.commit(|mut op| async move {
            op.fence(self.keys_fence());
            let keys = self.store().keys().await?;
            let mut entries = Vec::new();
            if let Some(f) = fresh {
                op.write(Write::PutKey(f.clone()));
                entries.push(AuditEntry::ok(
                    who.as_str(),
                    Action::KeyActivated,
                    &f.kid,
                    &[],
                    "emergency",
                ));
            }
            let kids: Vec<&str> = targets.iter().map(|k| k.kid.as_str()).collect();
            op.write(Write::PutMeta(
                WITHDRAWING.into(),
                kids.join(" ").into_bytes(),
            ));
            for old in targets {
                unpublish(&mut op, &keys, &old.kid, KeyState::Withdrawn);
                entries.push(AuditEntry::ok(
                    who.as_str(),
                    Action::KeyEmergencyRotated,
                    &old.kid,
                    &[],
                    &format!("{reason}; withdrawn, the leases it signed are revoked next"),
                ));
            }
            op.record(entries)?;
            Ok((op, ()))
        })
        .await
    }

    /// Finish the revocations of an emergency rotation that a broker did
    /// not live to complete (the keys are withdrawn already; the leases
    /// they signed may still be active). Returns how many it revoked.
    pub async fn finish_withdrawals(&self) -> Result<u64, EngineError> {
        // Looked at on every step of the rotation task: one read when
        // nothing is pending, the keys role only when something is.
        if self
            .store()
            .meta(WITHDRAWING)
            .await?
            .is_none_or(|v| v.is_empty())
        {
            return Ok(0);
        }
        self.alone_on_keys(self.finish_withdrawals_here()).await
    }

    async fn finish_withdrawals_here(&self) -> Result<u64, EngineError> {
        let pending = self.store().meta(WITHDRAWING).await?.unwrap_or_default();
        let pending = String::from_utf8_lossy(&pending).into_owned();
        let mut count = 0;
        for kid in pending.split_whitespace() {
            let (leases, descendants) = self
                .revoke_signed_by(
                    kid,
                    SYSTEM_ACTOR,
                    "emergency key rotation, completed after a restart",
                    self.clock.now(),
                )
                .await?;
            tracing::warn!(withdrawn = %kid, revoked = leases, descendants, "emergency key rotation completed");
            count += leases + descendants;
        }
        if !pending.is_empty() {
            self.withdrawals_done().await?;
        }
        Ok(count)
    }

    /// Every withdrawn key's leases are revoked.
    async fn withdrawals_done(&self) -> Result<(), EngineError> {
        self.commit(|mut op| async move {
            op.fence(self.keys_fence());
            op.write(Write::PutMeta(WITHDRAWING.into(), Vec::new()));
            Ok((op, ()))
        })
        .await
    }

    /// What signs once `targets` are withdrawn: when the active key is
    /// among them, a published NEXT key that is not, else a fresh one;
    /// `None` when the active key stays.
    fn signer_after(
        &self,
        keys: &[KeyRecord],
        targets: &[KeyRecord],
        now: Millis,
    ) -> Result<Option<KeyRecord>, EngineError> {
        if !targets.iter().any(|k| k.state == KeyState::Active) {
            return Ok(None);
        }
        let mut fresh = match keys
            .iter()
            .find(|k| k.state == KeyState::Next && !targets.iter().any(|t| t.kid == k.kid))
        {
            Some(n) => n.clone(),
            None => self.keys.generate(KeyState::Next, now)?,
        };
        fresh.state = KeyState::Active;
        fresh.activated_at = Some(now);
        Ok(Some(fresh))
    }

    /// Revoke every active lease whose latest token `kid` signed, and what
    /// was delegated from them, in one operation with its record: how many
    /// it signed, and how many delegated from those ended with them.
    async fn revoke_signed_by(
        &self,
        kid: &str,
        who: &str,
        reason: &str,
        now: Millis,
    ) -> Result<(u64, u64), EngineError> {
        self.commit(|mut op| async move {
            let (mut count, mut descendants) = (0u64, 0u64);
            let mut entries = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = self
                    .store()
                    .signed_by(kid, after.as_deref(), SIGNED_BY_PAGE)
                    .await?;
                let done = page.len() < SIGNED_BY_PAGE;
                for id in page {
                    let edit = revoke_if_active(who, reason, now);
                    if let Cas::Swapped { .. } = self.records.edit_lease(&mut op, &id, edit).await?
                    {
                        count += 1;
                        // A token delegated from one signed by the withdrawn
                        // key ends too.
                        let delegated = super::cascade::end_descendants(
                            &self.records,
                            &mut op,
                            &id,
                            who,
                            reason,
                            now,
                        )
                        .await?
                        .0;
                        descendants += delegated.len() as u64;
                        entries.extend(delegated);
                    }
                    after = Some(id);
                }
                if done {
                    break;
                }
            }
            entries.insert(
                0,
                AuditEntry::ok(
                    who,
                    Action::LeaseBulkRevoked,
                    kid,
                    &[],
                    &format!(
                        "{count} leases signed by withdrawn key `{kid}` revoked, {descendants} delegated from them ended: {reason}"
                    ),
                ),
            );
            op.record(entries)?;
            Ok((op, (count, descendants)))
        })
        .await
    }
}

/// NEXT `next` starts signing; ACTIVE `old` retires (in `op`).
fn promote(
    op: &mut Op,
    keys: &[KeyRecord],
    next: &str,
    old: Option<&str>,
    now: Millis,
    retire_after: Millis,
) -> Vec<AuditEntry> {
    let mut entries = Vec::new();
    for k in keys {
        if k.kid == next {
            let mut k = k.clone();
            k.state = KeyState::Active;
            k.activated_at = Some(now);
            op.write(Write::PutKey(k));
        } else if Some(k.kid.as_str()) == old {
            let mut k = k.clone();
            k.state = KeyState::Retired;
            k.retire_at = Some(now.saturating_add(retire_after));
            entries.push(key_entry(Action::KeyRetired, &k.kid, ""));
            op.write(Write::PutKey(k));
        }
    }
    op.write(Write::PutMeta(FORCED.into(), Vec::new()));
    entries.push(key_entry(Action::KeyActivated, next, ""));
    entries
}

/// Stop publishing key `kid` and destroy its private part, keeping the
/// public key (in state `to`) so the trail's checkpoints it signed can
/// still be checked (in `op`).
fn unpublish(op: &mut Op, keys: &[KeyRecord], kid: &str, to: KeyState) {
    if let Some(k) = keys.iter().find(|k| k.kid == kid) {
        let mut k = k.clone();
        k.state = to;
        k.sealed_private = Vec::new();
        op.write(Write::PutKey(k));
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
    use crate::model::LeaseState;

    fn emergency(kid: &str) -> Rotation {
        Rotation {
            emergency: true,
            kid: kid.into(),
            reason: "leaked".into(),
        }
    }

    #[tokio::test]
    async fn emergency_rotation_withdraws_the_key_and_revokes_what_it_signed() {
        let r = rig(POLICY).await;
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
        let keys = r.store.keys().await.unwrap();
        let old = keys.iter().find(|k| k.kid == lease.kid).unwrap();
        assert_eq!(old.state, KeyState::Withdrawn);
        assert!(old.sealed_private.is_empty(), "private part destroyed");
        let set = r.engine.keys().current();
        assert_ne!(set.active.kid, lease.kid);
        assert!(!set.verify.contains_key(&lease.kid), "no longer trusted");
        assert!(!set.jwks_json.contains(&lease.kid), "no longer published");
        assert!(set.withdrawn.contains(&lease.kid));
        assert_eq!(
            r.store.lease(&lease.id).await.unwrap().unwrap().state,
            LeaseState::Revoked
        );
        assert_eq!(
            r.store.meta(WITHDRAWING).await.unwrap().as_deref(),
            Some(&b""[..]),
            "nothing left pending"
        );
        let err = r
            .engine
            .rotate_now(&root, emergency("nope"), &schedule)
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::NotFound { .. }), "{err}");
    }

    /// What a broker that died between the withdrawal and the revocations
    /// leaves (the key withdrawn, its lease still active, the withdrawal
    /// pending) is finished when a broker leads again; then nothing is.
    #[tokio::test]
    async fn an_emergency_rotation_cut_short_is_finished_later() {
        let r = rig(POLICY).await;
        let lease = granted(&r, &["read"]).await;
        let fresh = r.engine.keys.generate(KeyState::Active, 1).unwrap();
        let mut withdrawn = r
            .store
            .keys()
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.kid == lease.kid)
            .unwrap();
        withdrawn.state = KeyState::Withdrawn;
        withdrawn.sealed_private = Vec::new();
        for w in [
            Write::PutKey(fresh),
            Write::PutKey(withdrawn),
            Write::PutMeta(WITHDRAWING.into(), lease.kid.clone().into_bytes()),
        ] {
            crate::store::batch::write_one(r.store.as_ref(), w)
                .await
                .unwrap();
        }
        r.engine.keys.reload(r.store.as_ref()).await.unwrap();
        assert_eq!(
            r.store.lease(&lease.id).await.unwrap().unwrap().state,
            LeaseState::Active
        );
        assert_eq!(r.engine.finish_withdrawals().await.unwrap(), 1);
        assert_eq!(
            r.store.lease(&lease.id).await.unwrap().unwrap().state,
            LeaseState::Revoked
        );
        assert_eq!(
            r.store.meta(WITHDRAWING).await.unwrap().as_deref(),
            Some(&b""[..])
        );
        assert!(
            crate::engine::testing::actions(r.store.as_ref())
                .await
                .contains(&"lease.bulk_revoked".to_owned())
        );
        assert_eq!(r.engine.finish_withdrawals().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn scheduled_steps_publish_then_promote() {
        let r = rig(POLICY).await;
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
        assert_eq!(r.store.keys().await.unwrap().len(), 2, "next key published");
        r.engine
            .rotate_due(&schedule, crate::engine::testing::T0 + period)
            .await
            .unwrap();
        assert_ne!(r.engine.keys().current().active.kid, first, "promoted");
    }
}

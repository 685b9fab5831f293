//! Leases: read, list, renew, revoke one, revoke every lease of a subject,
//! and revoke a token that could not be delivered.

use std::sync::Arc;
use std::time::Duration;

use super::records::revoke_if_active;
use super::{Cas, Engine, EngineError, SYSTEM_ACTOR};
use crate::audit::{Action, Entry as AuditEntry};
use crate::clock::millis;
use crate::identity::Identity;
use crate::model::{Lease, LeaseState};
use crate::policy::{Decision, Policy, Refusal};
use crate::store::{Millis, StoreError};
use crate::text::{FieldError, LEASE_PAGE, check_reason, page_size, require_id};

/// Why a token could not be handed over.
const UNDELIVERED: &str = "token could not be delivered";

impl Engine {
    /// Lease `id` if `who` owns it (or is an admin, when `admin_ok`).
    async fn owned_lease(
        &self,
        who: &Identity,
        id: &str,
        admin_ok: bool,
    ) -> Result<Lease, EngineError> {
        require_id("lease_id", id)?;
        let lease = self
            .store()
            .lease(id)
            .await?
            .ok_or_else(|| EngineError::not_found("lease", id))?;
        // Reading or revoking (`admin_ok`): also an admin, or an identity
        // that acts in the lease's delegation chain (who delegated it may
        // see and end it).
        let overseer = admin_ok && (self.policy().is_admin(who) || acts_upstream(&lease, who));
        check_owner(&lease, who, overseer)?;
        Ok(lease)
    }

    /// Read a lease (owner or admin).
    pub async fn get_lease(&self, who: &Identity, id: &str) -> Result<Lease, EngineError> {
        self.owned_lease(who, id, true).await
    }

    /// A delegated lease's ceiling: its parent's end, read before the edit
    /// (only for its owner, while it is renewable). `None` for any other.
    async fn parent_ceiling(
        &self,
        policy: &crate::policy::Policy,
        current: Option<&Lease>,
        who: &Identity,
        now: Millis,
    ) -> Result<Option<Millis>, EngineError> {
        let Some(lease) = current
            .filter(|l| check_owner(l, who, false).is_ok() && check_renewable(l, now).is_ok())
        else {
            return Ok(None);
        };
        let Some(d) = &lease.delegation else {
            return Ok(None);
        };
        let store = self.store().as_ref();
        Ok(Some(
            super::cascade::delegated_ceiling(store, policy, lease, d, now).await?,
        ))
    }

    /// Extend an active lease, up to its `max_expires_at`, with a fresh token.
    pub async fn renew(
        &self,
        who: &Identity,
        id: &str,
        ttl: Option<Duration>,
    ) -> Result<(String, Lease), EngineError> {
        let policy = self.policy();
        super::ask::check_ttl(&policy, ttl, "ttl")?;
        self.owned_lease(who, id, false).await?;
        let policy = &policy;
        let out = self
            .commit(|mut op| async move {
                let now = self.clock.now();
                let current = op.lease(self.store().as_ref(), id).await?;
                let ceiling = self
                    .parent_ceiling(policy, current.as_ref(), who, now)
                    .await?;
                let mut token = None;
                let out = self.records.edit_lease_from(&mut op, current, |lease| {
                    check_owner(lease, who, false)?;
                    check_renewable(lease, now)?;
                    let max_expires_at =
                        ceiling.map_or_else(|| current_ceiling(policy, who, lease), Ok)?;
                    let expires_at = renewed_until(lease, ttl, now, max_expires_at)?;
                    let keys = self.keys.current();
                    let renewed = Lease {
                        expires_at,
                        max_expires_at,
                        renewals: lease.renewals + 1,
                        token_issued_at: now,
                        kid: keys.active.kid.clone(),
                        ..lease.clone()
                    };
                    let (new, tok) = self.signed(&keys, renewed, now)?;
                    token = Some(tok);
                    Ok::<_, EngineError>(Some(new))
                })?;
                if let Cas::Swapped { new, .. } = &out {
                    self.extend_login(policy, new).await?;
                    op.record(vec![AuditEntry::ok(
                        who.as_str(),
                        Action::LeaseRenewed,
                        id,
                        &new.scopes,
                        "",
                    )])?;
                }
                Ok((op, (out, token)))
            })
            .await?;
        let (out, token) = out;
        let (Cas::Swapped { new, .. }, Some(tok)) = (out, token) else {
            return Err(EngineError::not_found("lease", id));
        };
        self.metrics.renewals.inc();
        self.deadlines.note(new.expires_at);
        tracing::info!(jti = %id, kid = %new.kid, sub = %who, renewals = new.renewals, "renewed");
        Ok((tok, new))
    }

    /// Revoke one lease (owner, or admin for anyone's). Revoking a lease that
    /// already ended returns it unchanged.
    pub async fn revoke(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<Lease, EngineError> {
        Ok(self.revoke_counted(who, id, reason).await?.0)
    }

    /// [`Engine::revoke`], and how many leases delegated from it (however
    /// deep) ended with it.
    pub async fn revoke_counted(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<(Lease, u64), EngineError> {
        check_reason("reason", reason, false)?;
        self.owned_lease(who, id, true).await?;
        let login_ends = self.login_ends(); // before the write: see below
        let (out, cascaded) = self
            .commit(|mut op| async move {
                let now = self.clock.now();
                let out = self
                    .records
                    .edit_lease(&mut op, id, revoke_if_active(who.as_str(), reason, now))
                    .await?;
                let Cas::Swapped { new, .. } = &out else {
                    return Ok((op, (out, (0, Vec::new()))));
                };
                let mut entries = vec![AuditEntry::ok(
                    who.as_str(),
                    Action::LeaseRevoked,
                    id,
                    &new.scopes,
                    reason,
                )];
                // Everything delegated from it ends with it, in the same
                // atomic batch.
                let (descendants, mut logins) = super::cascade::end_descendants(
                    &self.records,
                    &mut op,
                    id,
                    who.as_str(),
                    reason,
                    now,
                )
                .await?;
                let cascaded = descendants.len();
                entries.extend(descendants);
                op.record(entries)?;
                if new.login.is_some() {
                    logins.push(id.to_owned());
                }
                Ok((op, (out, (cascaded, logins))))
            })
            .await?;
        let (cascaded, logins) = cascaded;
        match out {
            Cas::Swapped { old, new } => {
                tracing::info!(jti = %id, sub = %old.subject, by = %who, cascaded, "revoked");
                // Its logins (its own, its descendants') can no longer sign
                // in, their sessions are gone.
                Self::wait_logins_end(logins, login_ends).await;
                Ok((new, cascaded as u64))
            }
            Cas::Kept(lease) => Ok((lease, 0)),
            Cas::Missing => Err(EngineError::not_found("lease", id)),
        }
    }

    /// Revoke every active lease of `subject` (admin only). Returns how many,
    /// and how many delegated from them ended with them.
    /// Runs to completion on its own task even if the caller goes away (a
    /// deadline, a reset), so a started bulk revocation is always recorded.
    pub async fn revoke_all(
        self: &Arc<Self>,
        who: &Identity,
        subject: &str,
        reason: &str,
    ) -> Result<(u64, u64), EngineError> {
        let (me, who, subject, reason) = (
            self.clone(),
            who.clone(),
            subject.to_owned(),
            reason.to_owned(),
        );
        tokio::spawn(async move { me.revoke_all_here(&who, &subject, &reason).await }).await?
    }

    async fn revoke_all_here(
        self: Arc<Self>,
        who: &Identity,
        subject: &str,
        reason: &str,
    ) -> Result<(u64, u64), EngineError> {
        let subject =
            Identity::parse(subject).map_err(|e| FieldError::new("subject", e.to_string()))?;
        check_reason("reason", reason, false)?;
        self.require_admin(who, "bulk revocation")?;
        let (by, why, subj) = (
            who.as_str().to_owned(),
            reason.to_owned(),
            subject.as_str().to_owned(),
        );
        // One operation: every lease of the subject, everything delegated
        // from them, and the records, in one atomic batch. The plan reads
        // page after page; a lost race plans again.
        let mut races = 0;
        let count = loop {
            races += 1;
            if races > 100 {
                return Err(StoreError::Contended(
                    "bulk revocation lost 100 races in a row; nothing was changed".into(),
                )
                .into());
            }
            let mut op = super::Op::new(self.clock.now());
            let count = self.plan_revoke_all(&mut op, &subj, &by, &why).await?;
            match self.records.apply(op).await? {
                crate::store::Applied::Done(_) => break count,
                crate::store::Applied::Lost(
                    crate::store::Lost::Lease(_) | crate::store::Lost::Request(_),
                ) => {}
                crate::store::Applied::Lost(other) => {
                    return Err(EngineError::Internal(format!(
                        "bulk revocation refused by the store: {other:?}"
                    )));
                }
            }
        };
        self.durable().await?;
        tracing::warn!(sub = %subject, by = %who, revoked = count.0, descendants = count.1, "bulk revocation");
        Ok(count)
    }

    /// Every page of `subject`'s leases, read before the batch is planned,
    /// so that the batch is sized once: grown by doubling, a hundred
    /// thousand swaps were copied and their fresh pages cleared again and
    /// again (a third of the time).
    async fn pages_of(&self, subject: &str) -> Result<Vec<Vec<Lease>>, EngineError> {
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            tokio::task::yield_now().await;
            let page = self
                .store()
                .leases_of(subject, after.as_deref(), 4096)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            pages.push(page);
        }
        Ok(pages)
    }

    /// The operation of [`Engine::revoke_all`]: how many leases it revokes,
    /// and how many delegated from them.
    async fn plan_revoke_all(
        &self,
        op: &mut super::Op,
        subject: &str,
        by: &str,
        why: &str,
    ) -> Result<(u64, u64), EngineError> {
        let now = self.clock.now();
        let pages = self.pages_of(subject).await?;
        op.reserve(pages.iter().map(Vec::len).sum());
        let mut count = 0;
        let mut delegated = Vec::new();
        for (i, lease) in pages.into_iter().flatten().enumerate() {
            if i % 4096 == 4095 {
                tokio::task::yield_now().await;
            }
            let id = lease.id.clone();
            // As the operation sees it: a cascade above may have ended it;
            // otherwise as the page read it.
            let current = op.changed_lease(&lease.id).unwrap_or(lease);
            if op.revoke(current, by, why, now) {
                count += 1;
                // What was delegated from it ends with it.
                delegated.extend(
                    super::cascade::end_descendants(&self.records, op, &id, by, why, now)
                        .await?
                        .0,
                );
            }
        }
        let n = delegated.len();
        let summary = if why.is_empty() {
            format!("{count} active leases revoked, {n} delegated from them ended")
        } else {
            format!("{count} active leases revoked, {n} delegated from them ended: {why}")
        };
        let mut entries = vec![AuditEntry::ok(
            by,
            Action::LeaseBulkRevoked,
            subject,
            &[],
            &summary,
        )];
        entries.extend(delegated);
        op.record(entries)?;
        Ok((count, n as u64))
    }

    /// A page of leases of `subject` (empty: the caller), optionally in one
    /// state, after `page_token`. Returns the page and the next token.
    pub async fn list_leases(
        &self,
        who: &Identity,
        subject: &str,
        state: Option<LeaseState>,
        page_size_asked: usize,
        page_token: &str,
    ) -> Result<(Vec<Lease>, String), EngineError> {
        let subject = if subject.is_empty() {
            who.clone()
        } else {
            Identity::parse(subject).map_err(|e| FieldError::new("subject", e.to_string()))?
        };
        if subject != *who {
            self.require_admin(who, "listing another identity's leases")?;
        }
        if !page_token.is_empty() {
            require_id("page_token", page_token)?;
        }
        let size = page_size(page_size_asked, LEASE_PAGE)?;
        let mut out = Vec::new();
        let mut after = (!page_token.is_empty()).then(|| page_token.to_owned());
        loop {
            let chunk = self
                .store()
                .leases_of(subject.as_str(), after.as_deref(), size + 1)
                .await?;
            let exhausted = chunk.len() <= size;
            for l in chunk {
                after = Some(l.id.clone());
                if state.is_none_or(|s| s == l.state) {
                    if out.len() == size {
                        // One more exists: the page is full.
                        let next = out.last().map(|l: &Lease| l.id.clone()).unwrap_or_default();
                        return Ok((out, next));
                    }
                    out.push(l);
                }
            }
            if exhausted {
                return Ok((out, String::new()));
            }
        }
    }

    /// The leases delegated directly from `parent_id`, in id order, after
    /// `page_token`: for its owner, the identities upstream of it, or an
    /// admin.
    pub async fn list_children(
        &self,
        who: &Identity,
        parent_id: &str,
        page_size_asked: usize,
        page_token: &str,
    ) -> Result<(Vec<Lease>, String), EngineError> {
        self.owned_lease(who, parent_id, true)
            .await
            .map_err(|e| match e {
                EngineError::Invalid(_) => {
                    FieldError::new("parent_id", "not a valid lease id").into()
                }
                other => other,
            })?;
        if !page_token.is_empty() {
            require_id("page_token", page_token)?;
        }
        let size = page_size(page_size_asked, LEASE_PAGE)?;
        let after = (!page_token.is_empty()).then_some(page_token);
        let mut ids = self.store().children(parent_id, after, size + 1).await?;
        let next = if ids.len() > size {
            ids.truncate(size);
            ids.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(l) = self.store().lease(&id).await? {
                out.push(l);
            }
        }
        Ok((out, next))
    }

    /// A claimed token could not be handed over (the caller went away):
    /// revoke its lease so no copy can ever be used. Recorded only if this
    /// call revoked it; failures are logged as failures.
    pub async fn revoke_undelivered(&self, lease: &Lease) {
        let out = self
            .commit(|mut op| async move {
                let now = self.clock.now();
                let out = self
                    .records
                    .edit_lease(
                        &mut op,
                        &lease.id,
                        revoke_if_active(SYSTEM_ACTOR, UNDELIVERED, now),
                    )
                    .await?;
                if let Cas::Swapped { new, .. } = &out {
                    op.record(vec![AuditEntry::ok(
                        SYSTEM_ACTOR,
                        Action::LeaseRevoked,
                        &new.id,
                        &new.scopes,
                        UNDELIVERED,
                    )])?;
                }
                Ok((op, out))
            })
            .await;
        match out {
            Ok(Cas::Swapped { .. }) => {
                tracing::warn!(jti = %lease.id, "token could not be delivered; lease revoked")
            }
            Ok(Cas::Kept(_) | Cas::Missing) => {
                tracing::info!(jti = %lease.id, "undelivered token's lease had already ended");
            }
            Err(e) => {
                tracing::error!(jti = %lease.id, error = %e, "could not revoke an undelivered lease");
            }
        }
    }
}

/// `who` owns `lease`, or `admin` lets them act on it anyway.
fn check_owner(lease: &Lease, who: &Identity, admin: bool) -> Result<(), EngineError> {
    if lease.subject == who.as_str() || admin {
        Ok(())
    } else {
        Err(EngineError::NotAllowed(format!(
            "`lease_id`: lease `{}` belongs to another identity",
            lease.id
        )))
    }
}

/// Does `who` act in `lease`'s delegation chain?
fn acts_upstream(lease: &Lease, who: &Identity) -> bool {
    lease
        .delegation
        .as_ref()
        .is_some_and(|d| d.actors.iter().any(|a| a == who.as_str()))
}

/// Only a live lease renews.
fn check_renewable(lease: &Lease, now: u64) -> Result<(), EngineError> {
    if lease.state == LeaseState::Active && lease.expires_at > now {
        return Ok(());
    }
    let state = if lease.state == LeaseState::Revoked {
        "revoked"
    } else {
        "expired"
    };
    Err(EngineError::WrongState(format!(
        "lease `{}` is {state} and cannot be renewed",
        lease.id
    )))
}

/// The renewal ceiling under the policy in force now: the identity must
/// still be allowed every scope; a scope that now needs approval renews only
/// a lease that was approved (or taken through break-glass); a lowered
/// `max_ttl` lowers the ceiling, never raises it.
fn current_ceiling(policy: &Policy, who: &Identity, lease: &Lease) -> Result<u64, EngineError> {
    let max_ttl = match policy.decide(who, &lease.scopes, None)? {
        Decision::Grant { max_ttl, .. } => max_ttl,
        Decision::Park { max_ttl, .. } if lease.request_id.is_some() => max_ttl,
        Decision::Park { requirements, .. } => {
            let scope = requirements
                .first()
                .map(|r| r.scope.clone())
                .unwrap_or_default();
            return Err(Refusal {
                scope,
                reason: "now needs approval; this lease was granted without it and cannot \
                         be renewed: request a new token"
                    .into(),
            }
            .into());
        }
    };
    Ok(lease
        .max_expires_at
        .min(lease.issued_at.saturating_add(millis(max_ttl))))
}

/// The new end of life of `lease` renewed at `now` for `ttl` (default: its
/// issue TTL), capped by `ceiling`.
fn renewed_until(
    lease: &Lease,
    ttl: Option<Duration>,
    now: u64,
    ceiling: u64,
) -> Result<u64, EngineError> {
    let id = &lease.id;
    let want = ttl.map_or(lease.ttl_ms, millis);
    let expires_at = now.saturating_add(want).min(ceiling);
    if expires_at <= now {
        return Err(EngineError::WrongState(format!(
            "lease `{id}` has reached its max_ttl"
        )));
    }
    Ok(expires_at)
}

#[cfg(test)]
mod tests;

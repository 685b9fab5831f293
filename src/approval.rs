//! `approval` moves parked requests: approve (N of M, each approver once,
//! never one's own), deny, acknowledge a break-glass grant, list what an
//! approver may decide, and claim an approved request's token exactly once.

use std::time::Duration;

use crate::audit::Entry as AuditEntry;
use crate::clock::millis;
use crate::grant::{Engine, GrantError, may_decide, new_id, require_id, revoked, validate_reason};
use crate::identity::Identity;
use crate::policy::Policy;
use crate::store::{Approval, Lease, LeaseState, RequestState, TokenRequest};
use crate::token;

/// Default and largest `ListPending` page.
const PAGE: usize = 50;
const MAX_PAGE: usize = 500;

/// Approvals a requirement has received.
pub fn received(req: &TokenRequest, scope: &str) -> u32 {
    let n = req
        .approvals
        .iter()
        .filter(|a| a.counted_for.iter().any(|s| s == scope))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn fully_approved(req: &TokenRequest) -> bool {
    req.waiting_for
        .iter()
        .all(|w| received(req, &w.scope) >= w.approvals_required)
}

/// Scopes whose unmet requirement `who` may approve.
fn counts_for(policy: &Policy, who: &Identity, req: &TokenRequest) -> Vec<String> {
    req.waiting_for
        .iter()
        .filter(|w| {
            w.approver_groups
                .iter()
                .any(|g| policy.is_member(g, who.as_str()))
        })
        .map(|w| w.scope.clone())
        .collect()
}

fn state_name(s: RequestState) -> String {
    format!("{s:?}").to_lowercase()
}

impl Engine {
    /// Load a request for a decision by `who`: unknown is NOT_FOUND; a
    /// requester or non-member is refused with the reason.
    fn for_decision(
        &self,
        who: &Identity,
        id: &str,
    ) -> Result<(TokenRequest, std::sync::Arc<Policy>), GrantError> {
        require_id("request_id", id)?;
        let req = self
            .store
            .request(id)?
            .ok_or_else(|| GrantError::NotFound {
                what: "request",
                id: id.to_owned(),
            })?;
        let policy = self.policy();
        if req.requester == who.as_str() {
            return Err(GrantError::NotAllowed(format!(
                "`{who}` requested `{id}` and cannot decide it"
            )));
        }
        if !may_decide(&policy, who, &req) {
            return Err(GrantError::NotAllowed(format!(
                "`{who}` is not in an approver group of request `{id}` ({})",
                req.waiting_for
                    .iter()
                    .map(|w| w.rule.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        Ok((req, policy))
    }

    /// Approve `id`. The last needed approval makes it APPROVED, open for
    /// the requester to claim within the scopes' `claim_ttl`.
    pub async fn approve(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
        ttl: Option<Duration>,
        digest: &str,
    ) -> Result<TokenRequest, GrantError> {
        loop {
            let (req, policy) = self.for_decision(who, id)?;
            if req.state != RequestState::Pending || req.break_glass {
                return Err(GrantError::WrongState(format!(
                    "request `{id}` is {} and cannot be approved",
                    state_name(req.state)
                )));
            }
            if !digest.is_empty() && digest != req.digest {
                return Err(GrantError::WrongState(format!(
                    "request `{id}` digest does not match what was reviewed"
                )));
            }
            if req.approvals.iter().any(|a| a.approver == who.as_str()) {
                return Err(GrantError::Duplicate(format!(
                    "`{who}` already approved request `{id}`"
                )));
            }
            let counted_for = counts_for(&policy, who, &req);
            let rules: Vec<_> = counted_for
                .iter()
                .filter_map(|s| policy.scopes.get(s))
                .filter_map(|r| r.approval.as_ref())
                .collect();
            validate_reason(reason, rules.iter().any(|a| a.require_reason))?;
            if let Some(t) = ttl
                && (t.is_zero() || millis(t) > req.ttl_ms)
            {
                return Err(GrantError::Invalid {
                    field: "ttl",
                    reason: format!(
                        "must be between 1s and the requested {}s",
                        req.ttl_ms / 1000
                    ),
                });
            }
            let now = self.clock.now();
            let mut new = req.clone();
            new.approvals.push(Approval {
                approver: who.as_str().to_owned(),
                at: now,
                reason: reason.to_owned(),
                ttl_ms: ttl.map(millis),
                counted_for,
            });
            let done = fully_approved(&new);
            if done {
                let claim = rules
                    .iter()
                    .map(|a| a.claim_ttl)
                    .min()
                    .unwrap_or(Duration::from_secs(600));
                new = new.moved(RequestState::Approved, who.as_str(), now, reason);
                new.deadline = now.saturating_add(millis(claim));
            }
            if self.swap_request(&req, &new)? {
                let action = if done {
                    "request.approved"
                } else {
                    "request.approval"
                };
                let rules: Vec<String> = new.waiting_for.iter().map(|w| w.rule.clone()).collect();
                self.record(vec![
                    AuditEntry::ok(who.as_str(), action, id, &new.scopes, reason)
                        .rule(rules.join("; ")),
                ])?;
                self.commit.durable().await?;
                tracing::info!(request_id = %id, approver = %who, complete = done, "approval recorded");
                self.metrics
                    .decisions
                    .get_or_create(&vec![("kind", "approve")])
                    .inc();
                if done {
                    self.note_deadline(new.deadline);
                    self.announce("approved", &new, who.as_str(), reason);
                } else {
                    let _ = self.request_events.send(id.to_owned());
                }
                return Ok(new);
            }
        }
    }

    /// Deny `id` (pending, or approved but not yet claimed). Reason required.
    pub async fn deny(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<TokenRequest, GrantError> {
        validate_reason(reason, true)?;
        loop {
            let (req, _) = self.for_decision(who, id)?;
            if req.state.is_terminal() {
                return Err(GrantError::WrongState(format!(
                    "request `{id}` is {} and cannot be denied",
                    state_name(req.state)
                )));
            }
            let now = self.clock.now();
            let new = req.moved(RequestState::Denied, who.as_str(), now, reason);
            if self.swap_request(&req, &new)? {
                self.record(vec![AuditEntry::ok(
                    who.as_str(),
                    "request.denied",
                    id,
                    &new.scopes,
                    reason,
                )])?;
                self.commit.durable().await?;
                tracing::info!(request_id = %id, approver = %who, "denied");
                self.metrics
                    .decisions
                    .get_or_create(&vec![("kind", "deny")])
                    .inc();
                self.announce("denied", &new, who.as_str(), reason);
                return Ok(new);
            }
        }
    }

    /// Acknowledge a break-glass grant (optionally revoking its lease).
    pub async fn acknowledge(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
        revoke: bool,
    ) -> Result<TokenRequest, GrantError> {
        validate_reason(reason, revoke)?;
        loop {
            let (req, _) = self.for_decision(who, id)?;
            if !req.break_glass || !req.review_pending {
                return Err(GrantError::WrongState(format!(
                    "request `{id}` has no break-glass grant awaiting review"
                )));
            }
            let now = self.clock.now();
            let mut new = req.clone();
            new.review_pending = false;
            new.reviewed_by = Some(who.as_str().to_owned());
            new.review_reason = Some(reason.to_owned());
            if revoke && let Some(lid) = &req.lease_id {
                while let Some(lease) = self.store.lease(lid)? {
                    if lease.state != LeaseState::Active
                        || self.swap_lease(&lease, &revoked(&lease, who.as_str(), reason, now))?
                    {
                        break;
                    }
                }
            }
            if self.swap_request(&req, &new)? {
                let action = if revoke {
                    "breakglass.revoked"
                } else {
                    "breakglass.acknowledged"
                };
                self.record(vec![AuditEntry::ok(
                    who.as_str(),
                    action,
                    id,
                    &new.scopes,
                    reason,
                )])?;
                self.commit.durable().await?;
                tracing::warn!(request_id = %id, reviewer = %who, revoked = revoke, "break-glass grant reviewed");
                self.metrics
                    .decisions
                    .get_or_create(&vec![("kind", "acknowledge")])
                    .inc();
                self.announce("acknowledged", &new, who.as_str(), reason);
                return Ok(new);
            }
        }
    }

    /// What `who` may decide now, oldest first, after `page_token`.
    pub fn list_pending(
        &self,
        who: &Identity,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<TokenRequest>, String), GrantError> {
        let size = match page_size {
            0 => PAGE,
            n if n > MAX_PAGE => {
                return Err(GrantError::Invalid {
                    field: "page_size",
                    reason: format!("at most {MAX_PAGE}"),
                });
            }
            n => n,
        };
        if !page_token.is_empty() {
            require_id("page_token", page_token).map_err(|_| GrantError::Invalid {
                field: "page_token",
                reason: "not a valid token".into(),
            })?;
        }
        let policy = self.policy();
        let mut out = Vec::new();
        let mut after = (!page_token.is_empty()).then(|| page_token.to_owned());
        loop {
            let chunk = self.store.open_requests(after.as_deref(), 256)?;
            let exhausted = chunk.len() < 256;
            for r in chunk {
                after = Some(r.id.clone());
                let mine = may_decide(&policy, who, &r)
                    && ((r.state == RequestState::Pending
                        && !r.approvals.iter().any(|a| a.approver == who.as_str()))
                        || r.review_pending);
                if mine {
                    if out.len() == size {
                        let next = out
                            .last()
                            .map(|l: &TokenRequest| l.id.clone())
                            .unwrap_or_default();
                        return Ok((out, next));
                    }
                    out.push(r);
                }
            }
            if exhausted {
                return Ok((out, String::new()));
            }
        }
    }

    /// The request as `who` may see it. For its requester an APPROVED
    /// request is claimed on the way, and the token comes back exactly once
    /// (to whichever caller's claim wins).
    pub async fn read_and_claim(
        &self,
        who: &Identity,
        id: &str,
    ) -> Result<(TokenRequest, Option<(String, Lease)>), GrantError> {
        let r = self.get_request(who, id)?;
        if r.state != RequestState::Approved || r.requester != who.as_str() {
            return Ok((r, None));
        }
        match self.claim(who, id).await? {
            Some((token, lease, issued)) => Ok((issued, Some((token, lease)))),
            // Another call claimed it first: report what is stored now.
            None => Ok((self.get_request(who, id)?, None)),
        }
    }

    /// Claim the token of an APPROVED request: only its requester, only
    /// once. Returns `None` when there is nothing to claim (not approved, not
    /// the requester, claim window passed, or someone else claimed it).
    pub async fn claim(
        &self,
        who: &Identity,
        id: &str,
    ) -> Result<Option<(String, Lease, TokenRequest)>, GrantError> {
        let Some(req) = self.store.request(id)? else {
            return Ok(None);
        };
        let now = self.clock.now();
        if req.requester != who.as_str()
            || req.state != RequestState::Approved
            || req.deadline <= now
        {
            return Ok(None);
        }
        let ttl = req
            .approvals
            .iter()
            .filter_map(|a| a.ttl_ms)
            .fold(req.ttl_ms, u64::min);
        let keys = self.keys.current();
        let lease = Lease {
            id: new_id("l_", now)?,
            subject: req.requester.clone(),
            client_id: req.requester.clone(),
            scopes: req.scopes.clone(),
            audience: req.audience.clone(),
            justification: req.justification.clone(),
            issued_at: now,
            expires_at: now.saturating_add(ttl),
            max_expires_at: now.saturating_add(req.max_ttl_ms.max(ttl)),
            ttl_ms: ttl,
            state: LeaseState::Active,
            kid: keys.active.kid.clone(),
            renewals: 0,
            token_issued_at: now,
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            expired_at: None,
            request_id: Some(req.id.clone()),
            approved_by: req.approvals.iter().map(|a| a.approver.clone()).collect(),
            break_glass: false,
        };
        // Sign before any write; the claim itself is the compare-and-swap
        // APPROVED -> ISSUED, so exactly one caller gets past it.
        let tok = token::mint(&keys, &self.claims(&lease, now))?;
        let mut issued = req.moved(RequestState::Issued, who.as_str(), now, "token delivered");
        issued.lease_id = Some(lease.id.clone());
        if !self.swap_request(&req, &issued)? {
            return Ok(None);
        }
        self.create_lease(&lease, None)?;
        self.record(vec![AuditEntry::ok(
            who.as_str(),
            "request.issued",
            id,
            &lease.scopes,
            &format!("lease {}", lease.id),
        )])?;
        self.commit.durable().await?;
        self.note_deadline(lease.expires_at);
        tracing::info!(request_id = %id, jti = %lease.id, kid = %lease.kid, sub = %who, "approved request issued");
        self.announce("issued", &issued, who.as_str(), "");
        Ok(Some((tok, lease, issued)))
    }

    /// A claimed token could not be handed over (the caller went away):
    /// revoke its lease so no copy can ever be used.
    pub async fn revoke_undelivered(&self, lease: &Lease) {
        let now = self.clock.now();
        let done = match self.store.lease(&lease.id) {
            Ok(Some(l)) if l.state == LeaseState::Active => {
                let _ = self.record(vec![AuditEntry::ok(
                    crate::grant::SYSTEM_ACTOR,
                    "lease.revoked",
                    &l.id,
                    &l.scopes,
                    "token could not be delivered",
                )]);
                self.swap_lease(
                    &l,
                    &revoked(
                        &l,
                        crate::grant::SYSTEM_ACTOR,
                        "token could not be delivered",
                        now,
                    ),
                )
                .map(|_| ())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = done.map_err(GrantError::from) {
            tracing::error!(jti = %lease.id, error = %e, "could not revoke an undelivered lease");
        } else if let Err(e) = self.commit.durable().await {
            tracing::error!(jti = %lease.id, error = %e, "could not persist the revocation of an undelivered lease");
        }
        tracing::warn!(jti = %lease.id, "token could not be delivered; lease revoked");
    }
}

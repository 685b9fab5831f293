//! Approvals: approve (N of M, each approver once, never one's own), deny,
//! acknowledge a break-glass grant, list what an approver may decide. The
//! requester's claim of the approved token is `claim.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::records::revoke_if_active;
use super::{Cas, Engine, EngineError, may_decide};
use crate::audit::{Action, Entry as AuditEntry};
use crate::clock::millis;
use crate::identity::Identity;
use crate::model::{Approval, RequestState, TokenRequest};
use crate::notify::EventKind;
use crate::policy::{ApprovalRule, Policy};
use crate::text::{FieldError, check_reason, require_id};

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

/// Scopes whose requirement `who` may approve.
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

fn rules_of(req: &TokenRequest) -> String {
    req.waiting_for
        .iter()
        .map(|w| w.rule.clone())
        .collect::<Vec<_>>()
        .join("; ")
}

/// May `who` decide `req` now? The requester never; otherwise a member of
/// an approver group of one of its scopes.
/// Someone who may not even see the request (not its requester, not an
/// approver of it, not an admin) is told it does not exist, exactly as for
/// an unknown id: no existence oracle.
fn check_decider(policy: &Policy, who: &Identity, req: &TokenRequest) -> Result<(), EngineError> {
    let id = &req.id;
    if policy.same_person(&req.requester, who.as_str()) {
        return Err(EngineError::NotAllowed(format!(
            "`{who}` requested `{id}` (as `{}`) and cannot decide it",
            req.requester
        )));
    }
    if in_chain(policy, req, who) {
        return Err(EngineError::NotAllowed(format!(
            "`{who}` acts in the delegation chain of `{id}` and cannot decide it"
        )));
    }
    if !may_decide(policy, who, req) {
        if !policy.is_admin(who) {
            return Err(EngineError::not_found("request", id));
        }
        return Err(EngineError::NotAllowed(format!(
            "`{who}` is not in an approver group of request `{id}` ({})",
            rules_of(req)
        )));
    }
    Ok(())
}

/// Does `who` act in the delegation chain `req` would extend?
pub(super) fn in_chain(policy: &Policy, req: &TokenRequest, who: &Identity) -> bool {
    req.delegation
        .as_ref()
        .is_some_and(|d| d.actors.iter().any(|a| policy.same_person(a, who.as_str())))
}

/// A decision lands before the request's deadline (pending window, claim
/// window), checked where the decision is made, not left to the sweep.
pub(super) fn check_deadline(req: &TokenRequest, now: u64) -> Result<(), EngineError> {
    if !req.state.is_terminal() && req.deadline <= now {
        return Err(EngineError::WrongState(format!(
            "request `{}` expired at its deadline ({} ms ago)",
            req.id,
            now - req.deadline
        )));
    }
    Ok(())
}

/// The current policy still lets the requester have every scope (a scope
/// removed or a workload no longer allowed after the request was parked).
/// A delegated request instead needs its parent lease alive at `now` and
/// its `[[delegation]]` edge still allowed; the parent is returned.
pub(super) async fn check_still_allowed(
    policy: &Policy,
    store: &dyn crate::store::Store,
    req: &TokenRequest,
    now: crate::store::Millis,
) -> Result<Option<crate::model::Lease>, EngineError> {
    let stored = |s: &str| {
        Identity::parse(s).map_err(|e| EngineError::Internal(format!("stored identity: {e}")))
    };
    let requester = stored(&req.requester)?;
    let Some(d) = &req.delegation else {
        policy.decide(&requester, &req.scopes, None)?;
        return Ok(None);
    };
    let parent = super::cascade::live_parent(store, d, now)
        .await?
        .ok_or_else(|| {
            EngineError::WrongState(format!(
                "request `{}` was to be delegated from lease `{}`, which has ended",
                req.id, d.parent_id
            ))
        })?;
    let holder = stored(d.actors.first().map_or("", String::as_str))?;
    policy.delegation_rule(&crate::policy::DelegationAsk {
        holder: &holder,
        to: &requester,
        scopes: &req.scopes,
        depth: d.depth,
        audience: &req.audience,
        parent_audience: &parent.audience,
    })?;
    policy.decide_delegated(&req.scopes, None)?;
    Ok(Some(parent))
}

/// May `who` review `req` now: a decider, and a break-glass grant awaiting
/// review.
fn check_reviewable(
    policy: &Policy,
    who: &Identity,
    req: &TokenRequest,
) -> Result<(), EngineError> {
    check_decider(policy, who, req)?;
    if !req.break_glass || !req.review_pending {
        return Err(EngineError::WrongState(format!(
            "request `{}` has no break-glass grant awaiting review",
            req.id
        )));
    }
    Ok(())
}

/// The approval rules of `scopes`.
fn approval_rules<'p>(policy: &'p Policy, scopes: &[String]) -> Vec<&'p ApprovalRule> {
    scopes
        .iter()
        .filter_map(|s| policy.scopes.get(s))
        .filter_map(|r| r.approval.as_ref())
        .collect()
}

/// An approver may shorten the TTL, never lengthen it.
fn check_approved_ttl(ttl: Option<Duration>, req: &TokenRequest) -> Result<(), FieldError> {
    match ttl {
        Some(t) if t.is_zero() || millis(t) > req.ttl_ms => Err(FieldError::new(
            "ttl",
            format!(
                "{} is longer than the {} asked for: an approver may shorten the TTL, never lengthen it",
                humantime::format_duration(Duration::from_secs(t.as_secs())),
                humantime::format_duration(Duration::from_millis(req.ttl_ms)),
            ),
        )),
        _ => Ok(()),
    }
}

/// One approval by `who`, checked against the request as it is now.
struct Approving<'a> {
    policy: &'a Policy,
    store: &'a dyn crate::store::Store,
    who: &'a Identity,
    reason: &'a str,
    ttl: Option<Duration>,
    digest: &'a str,
}

impl Approving<'_> {
    /// Whether this approver may decide `req` now at all.
    fn may_decide(&self, req: &TokenRequest, now: u64) -> Result<(), EngineError> {
        check_decider(self.policy, self.who, req)?;
        if req.state != RequestState::Pending || req.break_glass {
            return Err(EngineError::WrongState(format!(
                "request `{}` is {} and cannot be approved",
                req.id,
                req.state.name()
            )));
        }
        check_deadline(req, now)
    }

    /// The checks that read the store: `req` may still be granted under
    /// today's policy (a delegated one needs its parent lease alive, which
    /// is returned).
    async fn still_allowed(
        &self,
        req: &TokenRequest,
        now: u64,
    ) -> Result<Option<crate::model::Lease>, EngineError> {
        self.may_decide(req, now)?;
        check_still_allowed(self.policy, self.store, req, now).await
    }

    /// The request with this approval added (APPROVED when it was the last
    /// one needed), or why it cannot be approved. `req` is the copy
    /// [`Approving::still_allowed`] passed (`parent` is what it returned):
    /// the operation's compare-and-swap is on that same copy.
    fn apply(
        &self,
        req: &TokenRequest,
        now: u64,
        parent: Option<crate::model::Lease>,
    ) -> Result<TokenRequest, EngineError> {
        let (id, who) = (&req.id, self.who);
        if !self.digest.is_empty() && self.digest != req.digest {
            return Err(EngineError::WrongState(format!(
                "request `{id}` digest does not match what was reviewed"
            )));
        }
        if let Some(a) = req
            .approvals
            .iter()
            .find(|a| self.policy.same_person(&a.approver, who.as_str()))
        {
            return Err(EngineError::Duplicate(format!(
                "`{who}` already approved request `{id}` (as `{}`)",
                a.approver
            )));
        }
        let counted_for = counts_for(self.policy, who, req);
        let rules = approval_rules(self.policy, &counted_for);
        check_reason(
            "reason",
            self.reason,
            rules.iter().any(|a| a.require_reason),
        )?;
        check_approved_ttl(self.ttl, req)?;
        let mut new = req.clone();
        new.approvals.push(Approval {
            approver: who.as_str().to_owned(),
            at: now,
            reason: self.reason.to_owned(),
            ttl_ms: self.ttl.map(millis),
            counted_for,
        });
        if fully_approved(&new) {
            // The window is the request's, over all its scopes (as an
            // exchange left for its recipient gets), whoever approved last.
            let claim = self.policy.claim_ttl(&new.scopes);
            new = new.moved(RequestState::Approved, who.as_str(), now, self.reason);
            new.deadline = now.saturating_add(millis(claim));
            if let Some(p) = parent {
                // A delegated token cannot be claimed after its parent ends.
                new.deadline = new.deadline.min(p.expires_at);
            }
        }
        Ok(new)
    }
}

impl Engine {
    /// The policy a decision on request `id` is checked against (the
    /// request itself is read by the compare-and-swap; unknown is
    /// NOT_FOUND there).
    fn for_decision(&self, id: &str) -> Result<Arc<Policy>, EngineError> {
        require_id("request_id", id)?;
        Ok(self.policy())
    }

    /// Approve `id`. The last needed approval makes it APPROVED, open for
    /// the requester to claim within the scopes' `claim_ttl`. A refusal of
    /// who is deciding is recorded ([`Self::decision_refused`]).
    pub async fn approve(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
        ttl: Option<Duration>,
        digest: &str,
    ) -> Result<TokenRequest, EngineError> {
        match self.try_approve(who, id, reason, ttl, digest).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.decision_refused(who, id, "approve", e).await),
        }
    }

    async fn try_approve(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
        ttl: Option<Duration>,
        digest: &str,
    ) -> Result<TokenRequest, EngineError> {
        let policy = self.for_decision(id)?;
        let approving = Approving {
            policy: &policy,
            store: self.store().as_ref(),
            who,
            reason,
            ttl,
            digest,
        };
        let approving = &approving;
        let out = self
            .commit(|mut op| async move {
                let now = self.clock.now();
                let current = self.store().request(id).await?;
                let parent = match &current {
                    Some(req) => approving.still_allowed(req, now).await?,
                    None => None,
                };
                let out = self.records.edit_request_from(&mut op, current, |req| {
                    approving.apply(req, now, parent).map(Some)
                })?;
                if let Cas::Swapped { new, .. } = &out {
                    let action = if new.state == RequestState::Approved {
                        Action::RequestApproved
                    } else {
                        Action::RequestApproval
                    };
                    let entry = AuditEntry::ok(who.as_str(), action, id, &new.scopes, reason);
                    op.record(vec![entry.rule(rules_of(new))])?;
                }
                Ok((op, out))
            })
            .await?;
        let Cas::Swapped { new, .. } = out else {
            return Err(EngineError::not_found("request", id));
        };
        let done = new.state == RequestState::Approved;
        tracing::info!(request_id = %id, approver = %who, complete = done, "approval recorded");
        self.metrics.decision("approve");
        if done {
            self.deadlines.note(new.deadline);
            self.announce(EventKind::Approved, &new, who.as_str(), reason);
        } else {
            self.touched(id);
        }
        Ok(new)
    }

    /// Deny `id` (pending, or approved but not yet claimed). Reason
    /// required. A refusal of who is deciding is recorded.
    pub async fn deny(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<TokenRequest, EngineError> {
        match self.try_deny(who, id, reason).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.decision_refused(who, id, "deny", e).await),
        }
    }

    /// A decision refused because of who tried it — the requester, someone
    /// in the delegation chain, someone who may not decide the request (or
    /// may not even see it: NOT_FOUND, as for an unknown id) — changes
    /// nothing; its record is noted, not waited on, as a refused grant's
    /// is, and counted (`portcullis_decisions_total{kind="refused"}`). An
    /// id that names no request is not recorded: the trail holds attempts
    /// on requests, not whatever ids a caller makes up. Other failures (a
    /// bad field, a lost race, an expired request) pass through.
    async fn decision_refused(
        &self,
        who: &Identity,
        id: &str,
        decision: &str,
        e: EngineError,
    ) -> EngineError {
        let on_a_request = match &e {
            EngineError::NotAllowed(_) => true,
            EngineError::NotFound { .. } => {
                matches!(self.store().request(id).await, Ok(Some(_)))
            }
            _ => false,
        };
        if !on_a_request {
            return e;
        }
        self.metrics.decision("refused");
        let entry = AuditEntry::ok(
            who.as_str(),
            Action::DecisionRefused,
            id,
            &[],
            &format!("{decision}: {e}"),
        )
        .outcome(crate::audit::Outcome::Refused);
        if let Err(failed) = self.note(vec![entry]) {
            return failed;
        }
        tracing::warn!(request_id = %id, who = %who, decision, "decision refused");
        e
    }

    async fn try_deny(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<TokenRequest, EngineError> {
        check_reason("reason", reason, true)?;
        let policy = &self.for_decision(id)?;
        let out = self
            .commit(|mut op| async move {
                let now = self.clock.now();
                let out = self
                    .records
                    .edit_request(&mut op, id, |req| {
                        check_decider(policy, who, req)?;
                        super::end_request(req, RequestState::Denied, who, now, reason)
                    })
                    .await?;
                if let Cas::Swapped { new, .. } = &out {
                    op.record(vec![AuditEntry::ok(
                        who.as_str(),
                        Action::RequestDenied,
                        id,
                        &new.scopes,
                        reason,
                    )])?;
                }
                Ok((op, out))
            })
            .await?;
        let Cas::Swapped { new, .. } = out else {
            return Err(EngineError::not_found("request", id));
        };
        tracing::info!(request_id = %id, approver = %who, "denied");
        self.metrics.decision("deny");
        self.announce(EventKind::Denied, &new, who.as_str(), reason);
        Ok(new)
    }

    /// Acknowledge a break-glass grant (optionally revoking its lease). A
    /// refusal of who is reviewing is recorded.
    pub async fn acknowledge(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
        revoke: bool,
    ) -> Result<TokenRequest, EngineError> {
        match self.try_acknowledge(who, id, reason, revoke).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.decision_refused(who, id, "acknowledge", e).await),
        }
    }

    async fn try_acknowledge(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
        revoke: bool,
    ) -> Result<TokenRequest, EngineError> {
        check_reason("reason", reason, revoke)?;
        let policy = &self.for_decision(id)?;
        // The review is the compare-and-swap: only the reviewer whose swap
        // wins may revoke, so a lost race never revokes unrecorded.
        let out = self
            .commit(|mut op| async move {
                let out = self
                    .records
                    .edit_request(&mut op, id, |req| {
                        check_reviewable(policy, who, req)?;
                        let mut new = req.clone();
                        new.review_pending = false;
                        new.reviewed_by = Some(who.as_str().to_owned());
                        new.review_reason = Some(reason.to_owned());
                        Ok::<_, EngineError>(Some(new))
                    })
                    .await?;
                if let Cas::Swapped { new, .. } = &out {
                    self.plan_review(&mut op, who, new, reason, revoke).await?;
                }
                Ok((op, out))
            })
            .await?;
        let Cas::Swapped { new, .. } = out else {
            return Err(EngineError::not_found("request", id));
        };
        tracing::warn!(request_id = %id, reviewer = %who, revoked = revoke, "break-glass grant reviewed");
        self.metrics.decision("acknowledge");
        self.announce(EventKind::Acknowledged, &new, who.as_str(), reason);
        Ok(new)
    }

    /// The rest of a break-glass review, in `op`: with `revoke`, the grant's
    /// lease and everything delegated from it end; the review's record.
    async fn plan_review(
        &self,
        op: &mut super::Op,
        who: &Identity,
        reviewed: &TokenRequest,
        reason: &str,
        revoke: bool,
    ) -> Result<(), EngineError> {
        let mut entries = Vec::new();
        if revoke && let Some(lid) = &reviewed.lease_id {
            let now = self.clock.now();
            self.records
                .edit_lease(op, lid, revoke_if_active(who.as_str(), reason, now))
                .await?;
            // Whatever was delegated from the grant ends with it.
            entries =
                super::cascade::end_descendants(&self.records, op, lid, who.as_str(), reason, now)
                    .await?
                    .0;
        }
        let action = if revoke {
            Action::BreakGlassRevoked
        } else {
            Action::BreakGlassAcknowledged
        };
        entries.insert(
            0,
            AuditEntry::ok(who.as_str(), action, &reviewed.id, &reviewed.scopes, reason),
        );
        op.record(entries)?;
        Ok(())
    }

    /// What `who` may decide now, oldest first, after `page_token`.
    pub async fn list_pending(
        &self,
        who: &Identity,
        page_size_asked: usize,
        page_token: &str,
    ) -> Result<(Vec<TokenRequest>, String), EngineError> {
        let policy = self.policy();
        self.page_open_requests(None, page_size_asked, page_token, |r| {
            may_decide(&policy, who, r)
                && ((r.state == RequestState::Pending
                    && !r
                        .approvals
                        .iter()
                        .any(|a| policy.same_person(&a.approver, who.as_str())))
                    || r.review_pending)
        })
        .await
    }
}

#[cfg(test)]
mod tests;

//! Approvals: approve (N of M, each approver once, never one's own), deny,
//! acknowledge a break-glass grant, list what an approver may decide, and
//! claim an approved request's token exactly once.

use std::sync::Arc;
use std::time::Duration;

use super::records::revoke_if_active;
use super::{Cas, Engine, EngineError, may_decide};
use crate::audit::{Action, Entry as AuditEntry};
use crate::clock::millis;
use crate::identity::Identity;
use crate::notify::EventKind;
use crate::policy::{ApprovalRule, Policy};
use crate::store::{Approval, Lease, RequestState, TokenRequest};
use crate::text::{FieldError, REQUEST_PAGE, check_reason, new_id, page_size, require_id};
use crate::token;

/// Claim window when no rule names one.
const DEFAULT_CLAIM: Duration = Duration::from_secs(600);

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
fn check_decider(policy: &Policy, who: &Identity, req: &TokenRequest) -> Result<(), EngineError> {
    let id = &req.id;
    if req.requester == who.as_str() {
        return Err(EngineError::NotAllowed(format!(
            "`{who}` requested `{id}` and cannot decide it"
        )));
    }
    if !may_decide(policy, who, req) {
        return Err(EngineError::NotAllowed(format!(
            "`{who}` is not in an approver group of request `{id}` ({})",
            rules_of(req)
        )));
    }
    Ok(())
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
                "must be between 1s and the requested {}s",
                req.ttl_ms / 1000
            ),
        )),
        _ => Ok(()),
    }
}

/// One approval by `who`, checked against the request as it is now.
struct Approving<'a> {
    policy: &'a Policy,
    who: &'a Identity,
    reason: &'a str,
    ttl: Option<Duration>,
    digest: &'a str,
}

impl Approving<'_> {
    /// The request with this approval added (APPROVED when it was the last
    /// one needed), or why it cannot be approved.
    fn apply(&self, req: &TokenRequest, now: u64) -> Result<TokenRequest, EngineError> {
        let (id, who) = (&req.id, self.who);
        check_decider(self.policy, who, req)?;
        if req.state != RequestState::Pending || req.break_glass {
            return Err(EngineError::WrongState(format!(
                "request `{id}` is {} and cannot be approved",
                req.state.name()
            )));
        }
        if !self.digest.is_empty() && self.digest != req.digest {
            return Err(EngineError::WrongState(format!(
                "request `{id}` digest does not match what was reviewed"
            )));
        }
        if req.approvals.iter().any(|a| a.approver == who.as_str()) {
            return Err(EngineError::Duplicate(format!(
                "`{who}` already approved request `{id}`"
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
            let claim = rules
                .iter()
                .map(|a| a.claim_ttl)
                .min()
                .unwrap_or(DEFAULT_CLAIM);
            new = new.moved(RequestState::Approved, who.as_str(), now, self.reason);
            new.deadline = now.saturating_add(millis(claim));
        }
        Ok(new)
    }
}

impl Engine {
    /// Load request `id` for a decision: unknown is NOT_FOUND.
    fn for_decision(&self, id: &str) -> Result<(TokenRequest, Arc<Policy>), EngineError> {
        require_id("request_id", id)?;
        let req = self
            .store()
            .request(id)?
            .ok_or_else(|| EngineError::not_found("request", id))?;
        Ok((req, self.policy()))
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
    ) -> Result<TokenRequest, EngineError> {
        let (_, policy) = self.for_decision(id)?;
        let approving = Approving {
            policy: &policy,
            who,
            reason,
            ttl,
            digest,
        };
        let out = self
            .records
            .edit_request(id, |req| approving.apply(req, self.clock.now()).map(Some))?;
        let Cas::Swapped { new, .. } = out else {
            return Err(EngineError::not_found("request", id));
        };
        let done = new.state == RequestState::Approved;
        let action = if done {
            Action::RequestApproved
        } else {
            Action::RequestApproval
        };
        let entry = AuditEntry::ok(who.as_str(), action, id, &new.scopes, reason);
        self.record(vec![entry.rule(rules_of(&new))]).await?;
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

    /// Deny `id` (pending, or approved but not yet claimed). Reason required.
    pub async fn deny(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<TokenRequest, EngineError> {
        check_reason("reason", reason, true)?;
        let (_, policy) = self.for_decision(id)?;
        let out = self.records.edit_request(id, |req| {
            check_decider(&policy, who, req)?;
            if req.state.is_terminal() {
                return Err(EngineError::WrongState(format!(
                    "request `{id}` is {} and cannot be denied",
                    req.state.name()
                )));
            }
            let now = self.clock.now();
            Ok::<_, EngineError>(Some(req.moved(
                RequestState::Denied,
                who.as_str(),
                now,
                reason,
            )))
        })?;
        let Cas::Swapped { new, .. } = out else {
            return Err(EngineError::not_found("request", id));
        };
        let entry = AuditEntry::ok(who.as_str(), Action::RequestDenied, id, &new.scopes, reason);
        self.record(vec![entry]).await?;
        tracing::info!(request_id = %id, approver = %who, "denied");
        self.metrics.decision("deny");
        self.announce(EventKind::Denied, &new, who.as_str(), reason);
        Ok(new)
    }

    /// Acknowledge a break-glass grant (optionally revoking its lease).
    pub async fn acknowledge(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
        revoke: bool,
    ) -> Result<TokenRequest, EngineError> {
        check_reason("reason", reason, revoke)?;
        let (current, policy) = self.for_decision(id)?;
        check_reviewable(&policy, who, &current)?;
        if revoke && let Some(lid) = &current.lease_id {
            let now = self.clock.now();
            self.records
                .edit_lease(lid, revoke_if_active(who.as_str(), reason, now))?;
        }
        let out = self.records.edit_request(id, |req| {
            check_reviewable(&policy, who, req)?;
            let mut new = req.clone();
            new.review_pending = false;
            new.reviewed_by = Some(who.as_str().to_owned());
            new.review_reason = Some(reason.to_owned());
            Ok::<_, EngineError>(Some(new))
        })?;
        let Cas::Swapped { new, .. } = out else {
            return Err(EngineError::not_found("request", id));
        };
        let action = if revoke {
            Action::BreakGlassRevoked
        } else {
            Action::BreakGlassAcknowledged
        };
        let entry = AuditEntry::ok(who.as_str(), action, id, &new.scopes, reason);
        self.record(vec![entry]).await?;
        tracing::warn!(request_id = %id, reviewer = %who, revoked = revoke, "break-glass grant reviewed");
        self.metrics.decision("acknowledge");
        self.announce(EventKind::Acknowledged, &new, who.as_str(), reason);
        Ok(new)
    }

    /// What `who` may decide now, oldest first, after `page_token`.
    pub fn list_pending(
        &self,
        who: &Identity,
        page_size_asked: usize,
        page_token: &str,
    ) -> Result<(Vec<TokenRequest>, String), EngineError> {
        let size = page_size(page_size_asked, REQUEST_PAGE)?;
        if !page_token.is_empty() {
            require_id("page_token", page_token)
                .map_err(|_| FieldError::new("page_token", "not a valid token"))?;
        }
        let policy = self.policy();
        let mine = |r: &TokenRequest| {
            may_decide(&policy, who, r)
                && ((r.state == RequestState::Pending
                    && !r.approvals.iter().any(|a| a.approver == who.as_str()))
                    || r.review_pending)
        };
        let mut out = Vec::new();
        let mut after = (!page_token.is_empty()).then(|| page_token.to_owned());
        loop {
            let chunk = self.store().open_requests(after.as_deref(), 256)?;
            let exhausted = chunk.len() < 256;
            for r in chunk {
                after = Some(r.id.clone());
                if !mine(&r) {
                    continue;
                }
                if out.len() == size {
                    let next = out.last().map(|l: &TokenRequest| l.id.clone());
                    return Ok((out, next.unwrap_or_default()));
                }
                out.push(r);
            }
            if exhausted {
                return Ok((out, String::new()));
            }
        }
    }

    /// Claim the token of an APPROVED request: only its requester, only
    /// once. Returns `None` when there is nothing to claim (not approved, not
    /// the requester, claim window passed, or someone else claimed it).
    pub async fn claim(
        &self,
        who: &Identity,
        id: &str,
    ) -> Result<Option<(String, Lease, TokenRequest)>, EngineError> {
        let mut minted = None;
        // The claim is the compare-and-swap APPROVED -> ISSUED, so exactly
        // one caller gets past it; the token is signed before any write.
        let out = self.records.edit_request(id, |req| {
            let now = self.clock.now();
            if req.requester != who.as_str()
                || req.state != RequestState::Approved
                || req.deadline <= now
            {
                return Ok(None);
            }
            let (lease, tok) = self.approved_lease(req, now)?;
            let mut issued = req.moved(RequestState::Issued, who.as_str(), now, "token delivered");
            issued.lease_id = Some(lease.id.clone());
            minted = Some((tok, lease));
            Ok::<_, EngineError>(Some(issued))
        })?;
        let (Cas::Swapped { new: issued, .. }, Some((tok, lease))) = (out, minted) else {
            return Ok(None);
        };
        self.records.create_lease(&lease, None)?;
        let reason = format!("lease {}", lease.id);
        let entry = AuditEntry::ok(
            who.as_str(),
            Action::RequestIssued,
            id,
            &lease.scopes,
            &reason,
        );
        self.record(vec![entry]).await?;
        self.deadlines.note(lease.expires_at);
        tracing::info!(request_id = %id, jti = %lease.id, kid = %lease.kid, sub = %who, "approved request issued");
        self.announce(EventKind::Issued, &issued, who.as_str(), "");
        Ok(Some((tok, lease, issued)))
    }

    /// The lease an approved request becomes at `now`, and its signed token.
    /// Its TTL is the shortest any approver allowed.
    fn approved_lease(&self, req: &TokenRequest, now: u64) -> Result<(Lease, String), EngineError> {
        let ttl = req
            .approvals
            .iter()
            .filter_map(|a| a.ttl_ms)
            .fold(req.ttl_ms, u64::min);
        let mut terms = req.terms();
        terms.max_ttl_ms = terms.max_ttl_ms.max(ttl);
        terms.ttl_ms = ttl;
        let keys = self.keys.current();
        let lease = Lease {
            request_id: Some(req.id.clone()),
            approved_by: req.approvals.iter().map(|a| a.approver.clone()).collect(),
            ..Lease::active(
                new_id("l_", now)?,
                &req.requester,
                &terms,
                now,
                &keys.active.kid,
            )
        };
        let tok = token::mint(&keys, &self.claims(&lease, now))?;
        Ok((lease, tok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Outcome;
    use crate::engine::testing::{POLICY, actions, ask, id, rig, workload};
    use crate::store::LeaseState;

    async fn parked(r: &crate::engine::testing::Rig) -> TokenRequest {
        match r
            .engine
            .request_token(&workload(), ask(&["admin"]))
            .await
            .unwrap()
        {
            Outcome::Parked(req) => req,
            Outcome::Granted { .. } => panic!("approval scope granted"),
        }
    }

    #[tokio::test]
    async fn two_distinct_approvers_then_exactly_one_claim() {
        let r = rig(POLICY);
        let req = parked(&r).await;
        let (alice, bob) = (id("spiffe://t/human/alice"), id("spiffe://t/human/bob"));
        let one = r
            .engine
            .approve(&alice, &req.id, "", None, "")
            .await
            .unwrap();
        assert_eq!(one.state, RequestState::Pending);
        let err = r
            .engine
            .approve(&alice, &req.id, "", None, "")
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Duplicate(_)), "{err}");
        let err = r
            .engine
            .approve(&workload(), &req.id, "", None, "")
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::NotAllowed(_)),
            "self-approval: {err}"
        );
        let two = r
            .engine
            .approve(&bob, &req.id, "", Some(Duration::from_secs(60)), "")
            .await
            .unwrap();
        assert_eq!(two.state, RequestState::Approved);
        assert!(
            r.engine.claim(&bob, &req.id).await.unwrap().is_none(),
            "not the requester"
        );
        let (_, lease, issued) = r.engine.claim(&workload(), &req.id).await.unwrap().unwrap();
        assert_eq!(issued.state, RequestState::Issued);
        assert_eq!(lease.ttl_ms, 60_000, "the shortest approved TTL");
        assert_eq!(
            lease.approved_by,
            ["spiffe://t/human/alice", "spiffe://t/human/bob"]
        );
        assert!(
            r.engine
                .claim(&workload(), &req.id)
                .await
                .unwrap()
                .is_none(),
            "only once"
        );
        assert_eq!(
            actions(r.store.as_ref()),
            [
                "request.parked",
                "request.approval",
                "request.approved",
                "request.issued"
            ]
        );
    }

    #[tokio::test]
    async fn a_digest_mismatch_or_a_stranger_changes_nothing() {
        let r = rig(POLICY);
        let req = parked(&r).await;
        let alice = id("spiffe://t/human/alice");
        let err = r
            .engine
            .approve(&alice, &req.id, "", None, "bad")
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::WrongState(_)));
        let err = r
            .engine
            .deny(&id("spiffe://t/human/eve"), &req.id, "no")
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::NotAllowed(_)));
        let err = r.engine.deny(&alice, &req.id, " ").await.unwrap_err();
        assert!(matches!(err, EngineError::Invalid(ref f) if f.field == "reason"));
        assert_eq!(r.store.request(&req.id).unwrap().unwrap(), req);
        let denied = r.engine.deny(&alice, &req.id, "no").await.unwrap();
        assert_eq!(denied.state, RequestState::Denied);
    }

    #[tokio::test]
    async fn acknowledging_break_glass_can_revoke_and_needs_a_review_pending() {
        let r = rig(POLICY);
        let mut a = ask(&["admin"]);
        a.break_glass = true;
        a.justification = "pager".into();
        let Outcome::Granted { lease, .. } = r.engine.request_token(&workload(), a).await.unwrap()
        else {
            panic!()
        };
        let rid = lease.request_id.clone().unwrap();
        let alice = id("spiffe://t/human/alice");
        let parked = parked(&r).await;
        let err = r
            .engine
            .acknowledge(&alice, &parked.id, "x", true)
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::WrongState(_)));
        let (pending, _) = r.engine.list_pending(&alice, 0, "").unwrap();
        assert_eq!(pending.len(), 2, "the parked request and the review");
        let reviewed = r
            .engine
            .acknowledge(&alice, &rid, "misuse", true)
            .await
            .unwrap();
        assert!(!reviewed.review_pending);
        assert_eq!(
            r.store.lease(&lease.id).unwrap().unwrap().state,
            LeaseState::Revoked
        );
    }
}

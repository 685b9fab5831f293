//! Token exchange (RFC 8693 semantics; issue 12): the holder of an active
//! token gets a *child* token, for itself or for another identity, never
//! wider than the parent — scopes a subset, audience the parent's or one a
//! `[[delegation]]` rule names, life within the parent's. The child is a
//! lease of its own that names its parent, so ending the parent ends it
//! ([`super::cascade`]). See docs/design-delegation.md.
//!
//! Three outcomes: granted at once; parked for approvers (an approval-tier
//! scope under a rule with `approval = "again"`); or left APPROVED for its
//! recipient to claim over its own mTLS, when the child is for another
//! identity and a scope binds its tokens to the holder's certificate
//! (RFC 8705) — the broker cannot know that certificate before it sees it.

use std::time::Duration;

use super::ask::{check_ttl, sha256_hex};
use super::issue::Outcome;
use super::{Engine, EngineError, Holder};
use crate::audit::{Action, Entry as AuditEntry, Outcome as AuditOutcome};
use crate::clock::millis;
use crate::identity::Identity;
use crate::model::{
    Delegation, Idempotency, IdempotentOutcome, Lease, RequestState, Requirement, Terms,
    TokenRequest,
};
use crate::notify::EventKind;
use crate::policy::{DelegationApproval, DelegationAsk, Policy, Refusal};
use crate::store::Millis;
use crate::text::{
    FieldError, check_audience, check_client_request_id, check_reason, check_scopes, new_id,
};
use crate::token::MAX_TOKEN_LEN;

/// An exchange as received (see the `ExchangeToken` RPC). Its `Debug`
/// leaves the subject token out.
#[derive(Clone, Default)]
pub struct ExchangeAsk {
    /// The parent token (a secret: never log it).
    pub subject_token: String,
    /// The child's scopes; empty for all of the parent's.
    pub scopes: Vec<String>,
    /// The child's audience; empty for the parent's.
    pub audience: String,
    /// The child's life; `None` for the scopes' default, cut to the parent's.
    pub ttl: Option<Duration>,
    /// Who the child is for; empty for the caller.
    pub for_identity: String,
    /// Why.
    pub justification: String,
    /// Idempotency key; empty for none.
    pub client_request_id: String,
}

impl std::fmt::Debug for ExchangeAsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeAsk")
            .field("subject_token", &"<redacted>")
            .field("scopes", &self.scopes)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .field("for_identity", &self.for_identity)
            .field("client_request_id", &self.client_request_id)
            .finish_non_exhaustive()
    }
}

/// An exchange that passed every check: what the child will be.
struct Plan {
    holder: Holder,
    to: Identity,
    parent: Lease,
    terms: Terms,
    /// The child's end of life and renewal ceiling.
    expires_at: Millis,
    max_expires_at: Millis,
    delegation: Delegation,
    /// The rule that allowed the edge.
    rule: String,
    /// Approval-tier scopes the rule sends to approvers again.
    again: Vec<Requirement>,
    pending_ttl: Duration,
    /// Some scope binds its tokens to the holder's certificate.
    bound: bool,
    digest: String,
    client_request_id: String,
    now: Millis,
}

impl Engine {
    /// Exchange `ask.subject_token` for a child token (see the
    /// `ExchangeToken` RPC). Every field is checked before anything is
    /// written; a refusal is recorded, nothing else is.
    pub async fn exchange(
        &self,
        holder: &Holder,
        ask: ExchangeAsk,
    ) -> Result<Outcome, EngineError> {
        let policy = self.policy();
        let now = self.clock.now();
        self.exchanges
            .admit(holder.who.as_str(), now)
            .map_err(|wait| super::too_fast("ExchangeToken", wait))?;
        let to = check_fields(&policy, holder, &ask)?;
        let parent = self.subject_lease(holder, &ask.subject_token, now).await?;
        self.check_children(&parent).await?;
        let plan = match plan(&policy, holder, to, parent, &ask, now) {
            Ok(p) => p,
            Err(EngineError::Refused(r)) => return Err(self.refuse_exchange(holder, r)),
            Err(e) => return Err(e),
        };
        let pickup = plan.bound && plan.to != plan.holder.who;
        if !plan.again.is_empty() || pickup {
            return self.park_exchange(&policy, plan).await;
        }
        self.grant_exchange(&policy, plan).await
    }

    /// The lease of an active subject token `who` holds: its `sub`, and
    /// presented with its certificate when it is bound.
    async fn subject_lease(
        &self,
        holder: &Holder,
        tok: &str,
        now: Millis,
    ) -> Result<Lease, EngineError> {
        let field = |why: &str| EngineError::from(FieldError::new("subject_token", why));
        let Some((parent, _)) = self.live_lease(tok, now).await? else {
            return Err(field(
                "is not an active token of this broker (expired, revoked, ended with an ancestor, or not issued here)",
            ));
        };
        let why = if parent.subject != holder.who.as_str() {
            format!(
                "is held by `{}`, not by the caller: only a token's holder may exchange it",
                parent.subject
            )
        } else if let Some(bound) = &parent.cnf
            && holder.x5t.as_deref() != Some(bound.as_str())
        {
            "is bound to another certificate (RFC 8705): present it with the certificate it was issued to".to_owned()
        } else {
            return Ok(parent);
        };
        // Someone presents a token that is not theirs to use: a sign of
        // theft, so it goes in the trail, not only the log.
        let entry = AuditEntry::ok(
            holder.who.as_str(),
            Action::ExchangeRefused,
            &parent.id,
            &parent.scopes,
            &format!("subject_token {why}"),
        )
        .outcome(AuditOutcome::Refused);
        self.note(vec![entry])?;
        tracing::warn!(jti = %parent.id, caller = %holder.who, "exchange of a token the caller may not use");
        Err(field(&why))
    }

    /// The subject token's lease as the operation reads it now: still
    /// live (a renewal since the plan is fine), or the exchange is refused.
    async fn parent_now(&self, op: &super::Op, plan: &Plan) -> Result<Lease, EngineError> {
        op.lease(self.store().as_ref(), &plan.parent.id)
            .await?
            .filter(|p| {
                p.state == crate::model::LeaseState::Active && p.expires_at > self.clock.now()
            })
            .ok_or_else(|| {
                EngineError::WrongState(format!(
                    "the lease `{}` of the subject token has ended",
                    plan.parent.id
                ))
            })
    }

    /// A refused exchange changes nothing; its record is noted, not waited on.
    fn refuse_exchange(&self, holder: &Holder, refusal: Refusal) -> EngineError {
        let entry = AuditEntry::ok(
            holder.who.as_str(),
            Action::ExchangeRefused,
            "",
            std::slice::from_ref(&refusal.scope),
            &refusal.to_string(),
        )
        .outcome(AuditOutcome::Refused);
        if let Err(e) = self.note(vec![entry]) {
            return e;
        }
        self.metrics.exchange("refused");
        refusal.into()
    }

    /// Grant the child now: sign, write its lease (indexed under its
    /// parent), record, wait for durability, hand the token over.
    async fn grant_exchange(&self, policy: &Policy, plan: Plan) -> Result<Outcome, EngineError> {
        let now = plan.now;
        let cnf = super::bound_to(policy, &plan.terms.scopes, plan.holder.x5t.as_deref())?;
        let id = new_id("l_", now)?;
        let idem = idempotency(&plan, IdempotentOutcome::Lease(id.clone()));
        let made = self.login_for_child(policy, &plan, &id).await?;
        let login = made.as_ref().map(|m| Box::new(m.login.clone()));
        let (plan_ref, cnf, id, idem, login_ref) = (&plan, &cnf, &id, &idem, &login);
        let out = self
            .commit_claiming(|mut op| async move {
                let plan = plan_ref;
                super::logins::still_in_time(login_ref.is_some(), now, self.clock.now())?;
                let keys = self.keys.current();
                let lease = Lease {
                    expires_at: plan.expires_at,
                    max_expires_at: plan.max_expires_at,
                    cnf: cnf.clone(),
                    login: login_ref.clone(),
                    ..Lease::active(
                        id.clone(),
                        plan.to.as_str(),
                        &plan.terms,
                        now,
                        &keys.active.kid,
                    )
                };
                // A child of a break-glass grant is break-glass too: it
                // lives within that grant and its review.
                let parent = self.parent_now(&op, plan).await?;
                let lease = super::cascade::child_of(lease, &parent, &plan.delegation);
                let (lease, tok) = self.signed(&keys, lease, now)?;
                // The parent as read: should it change meanwhile, the child
                // is never written (the batch loses, the plan runs again).
                op.expect_lease(parent);
                op.create_lease(lease.clone(), idem.clone());
                exchanged_in(&mut op, plan, &lease)?;
                Ok((op, (lease, tok)))
            })
            .await;
        // Not written: `made` ends its login when dropped.
        let (lease, tok) = match out? {
            Ok(done) => done,
            Err(existing) => return self.replay(&plan.holder.who, existing, &plan.digest).await,
        };
        self.deadlines.note(lease.expires_at);
        self.metrics.exchange("granted");
        tracing::info!(jti = %lease.id, parent = %plan.parent.id, sub = %lease.subject, actor = %plan.holder.who, depth = plan.delegation.depth, scopes = %lease.scopes.join(" "), rule = %plan.rule, "token exchanged");
        Ok(Outcome::Granted {
            token: tok,
            lease,
            login: made.map(super::logins::Made::deliver),
        })
    }

    /// A login scope gives the child a login of its own (the parent's
    /// password is never handed on), made before the child is written.
    async fn login_for_child(
        &self,
        policy: &Policy,
        plan: &Plan,
        lease_id: &str,
    ) -> Result<Option<super::logins::Made>, EngineError> {
        match super::logins::login_scope(policy, &plan.terms.scopes)? {
            Some((db, rule)) => Ok(Some(
                self.make_login(plan.to.as_str(), db, rule, lease_id, plan.expires_at)
                    .await?,
            )),
            None => Ok(None),
        }
    }

    /// Park the child: for approvers (PENDING), or — nothing to approve —
    /// APPROVED for its recipient to claim with its own certificate.
    async fn park_exchange(&self, policy: &Policy, plan: Plan) -> Result<Outcome, EngineError> {
        if let Some(scope) = policy.unjustified(&plan.again, &plan.terms.justification) {
            return Err(super::issue::unjustified(scope).into());
        }
        self.check_open_requests(&plan.holder.who).await?;
        let req = parked_request(policy, &plan)?;
        let idem = idempotency(&plan, IdempotentOutcome::Request(req.id.clone()));
        let pending = req.state == RequestState::Pending;
        let why = chain_text(&req.requester, &plan.delegation);
        let (action, rule) = if pending {
            let rules: Vec<String> = req.waiting_for.iter().map(|w| w.rule.clone()).collect();
            (
                Action::RequestParked,
                format!("{}; {}", plan.rule, rules.join("; ")),
            )
        } else {
            (Action::TokenExchanged, plan.rule.clone())
        };
        let actor = plan.holder.who.as_str();
        let (plan_ref, req_ref, idem, why_ref, rule) = (&plan, &req, &idem, &why, &rule);
        let parked = self
            .commit_claiming(|mut op| async move {
                let parent = self.parent_now(&op, plan_ref).await?;
                op.expect_lease(parent);
                op.create_request(req_ref.clone(), idem.clone());
                let entry = AuditEntry::ok(actor, action, &req_ref.id, &req_ref.scopes, why_ref);
                op.record(vec![entry.rule(rule.clone())])?;
                Ok((op, ()))
            })
            .await?;
        if let Err(existing) = parked {
            return self.replay(&plan.holder.who, existing, &plan.digest).await;
        }
        self.metrics.exchange("parked");
        self.deadlines.note(req.deadline);
        tracing::info!(request_id = %req.id, parent = %plan.parent.id, sub = %req.requester, actor, pending, "token exchange parked");
        if pending {
            self.announce(EventKind::Parked, &req, actor, &why);
        } else {
            self.touched(&req.id);
        }
        Ok(Outcome::Parked(req))
    }
}

/// The records of child `lease` granted by `plan`, in its operation.
fn exchanged_in(op: &mut super::Op, plan: &Plan, lease: &Lease) -> Result<(), EngineError> {
    let entry = AuditEntry::ok(
        plan.holder.who.as_str(),
        Action::TokenExchanged,
        &lease.id,
        &lease.scopes,
        &chain_text(&lease.subject, &plan.delegation),
    );
    op.record(vec![entry.rule(plan.rule.clone())])?;
    if let Some(l) = &lease.login {
        Engine::record_login(op, plan.to.as_str(), &lease.id, &lease.scopes, l)?;
    }
    Ok(())
}

/// The request a parked exchange is: PENDING for approvers, or APPROVED
/// for its recipient to claim; never open past the parent's end.
fn parked_request(policy: &Policy, plan: &Plan) -> Result<TokenRequest, EngineError> {
    let now = plan.now;
    let (state, wait) = if plan.again.is_empty() {
        (RequestState::Approved, policy.claim_ttl(&plan.terms.scopes))
    } else {
        (RequestState::Pending, plan.pending_ttl)
    };
    Ok(TokenRequest {
        // Approvals bind to this digest: the requester, the terms, and the
        // lease the child would hang from.
        digest: sha256_hex(&[
            plan.to.as_str().as_bytes(),
            plan.terms.scopes.join(" ").as_bytes(),
            &plan.terms.ttl_ms.to_be_bytes(),
            plan.terms.audience.as_bytes(),
            plan.parent.id.as_bytes(),
        ]),
        deadline: now.saturating_add(millis(wait)).min(plan.parent.expires_at),
        waiting_for: plan.again.clone(),
        client_request_id: (!plan.client_request_id.is_empty())
            .then(|| plan.client_request_id.clone()),
        delegation: Some(plan.delegation.clone()),
        ..TokenRequest::new(
            new_id("r_", now)?,
            plan.to.as_str(),
            &plan.terms,
            now,
            state,
            &format!("exchange by `{}`", plan.holder.who),
        )
    })
}

/// Every field of `ask`, checked before anything is read; the recipient.
fn check_fields(
    policy: &Policy,
    holder: &Holder,
    ask: &ExchangeAsk,
) -> Result<Identity, FieldError> {
    if ask.subject_token.is_empty() {
        return Err(FieldError::new("subject_token", "is required"));
    }
    if ask.subject_token.len() > MAX_TOKEN_LEN {
        return Err(FieldError::new(
            "subject_token",
            format!("is longer than {MAX_TOKEN_LEN} bytes"),
        ));
    }
    if !ask.scopes.is_empty() {
        check_scopes(&ask.scopes)?;
    }
    check_ttl(policy, ask.ttl, "ttl")?;
    check_audience(&ask.audience)?;
    check_reason("justification", &ask.justification, false)?;
    check_client_request_id(&ask.client_request_id)?;
    if ask.for_identity.is_empty() {
        return Ok(holder.who.clone());
    }
    let to = Identity::parse(&ask.for_identity)
        .map_err(|e| FieldError::new("for_identity", e.to_string()))?;
    // Whatever the delegation rules' patterns say: a workload of an
    // issuer's trust domain signs in only with that issuer's tokens.
    if let Some(issuer) = policy.issuer_owning(&to) {
        return Err(FieldError::new(
            "for_identity",
            format!(
                "is in a trust domain of issuer `{issuer}`, whose workloads sign in only with its tokens"
            ),
        ));
    }
    Ok(to)
}

/// What the child of `parent` will be, or why it may not exist: the
/// attenuation checks (each naming its field), the chain, then the rule.
fn plan(
    policy: &Policy,
    holder: &Holder,
    to: Identity,
    parent: Lease,
    ask: &ExchangeAsk,
    now: Millis,
) -> Result<Plan, EngineError> {
    let (scopes, audience, left) = attenuate(&parent, ask, now)?;
    // At most one login scope, as for any grant (the child gets a login of
    // its own: see `grant_exchange`).
    super::logins::login_scope(policy, &scopes)?;
    let delegation = chain(&parent, holder, &to)?;
    let rule = policy.delegation_rule(&DelegationAsk {
        holder: &holder.who,
        to: &to,
        scopes: &scopes,
        depth: delegation.depth,
        audience: &audience,
        parent_audience: &parent.audience,
    })?;
    let (ttl, max_ttl, requirements, pending_ttl) =
        policy.decide_delegated(&scopes, ask.ttl)?.parked();
    let again = match rule.approval {
        DelegationApproval::Again => requirements,
        DelegationApproval::Inherit if requirements.is_empty() => requirements,
        DelegationApproval::Inherit => {
            inherited(&parent, &requirements)?;
            Vec::new()
        }
    };
    let terms = Terms {
        scopes,
        audience,
        justification: ask.justification.clone(),
        ttl_ms: millis(ttl).min(left),
        max_ttl_ms: millis(max_ttl),
    };
    Ok(Plan {
        digest: params_digest(holder, &parent, &to, &terms, ask),
        holder: holder.clone(),
        expires_at: now.saturating_add(terms.ttl_ms),
        max_expires_at: now
            .saturating_add(terms.max_ttl_ms)
            .min(parent.max_expires_at),
        bound: policy.binds(&terms.scopes),
        rule: rule.rule_name(),
        again,
        pending_ttl,
        delegation,
        terms,
        to,
        parent,
        client_request_id: ask.client_request_id.clone(),
        now,
    })
}

/// What an idempotent retry must repeat: who, from which lease, for whom,
/// and what was asked.
fn params_digest(
    holder: &Holder,
    parent: &Lease,
    to: &Identity,
    terms: &Terms,
    ask: &ExchangeAsk,
) -> String {
    sha256_hex(&[
        holder.who.as_str().as_bytes(),
        parent.id.as_bytes(),
        to.as_str().as_bytes(),
        terms.scopes.join(" ").as_bytes(),
        &ask.ttl.map_or(0, millis).to_be_bytes(),
        terms.audience.as_bytes(),
        ask.justification.as_bytes(),
    ])
}

/// The child's scopes and audience, and what is left of the parent's life
/// at `now`: never wider than the parent in scopes or lifetime (the
/// audience is the rule's to judge).
fn attenuate(
    parent: &Lease,
    ask: &ExchangeAsk,
    now: Millis,
) -> Result<(Vec<String>, String, u64), FieldError> {
    let scopes = if ask.scopes.is_empty() {
        parent.scopes.clone()
    } else {
        check_scopes(&ask.scopes)?
    };
    if let Some(s) = scopes.iter().find(|s| !parent.scopes.contains(s)) {
        return Err(FieldError::new(
            "scopes",
            format!(
                "`{s}` is not a scope of the subject token (it carries: {}); a delegation can only narrow",
                parent.scopes.join(" ")
            ),
        ));
    }
    let audience = if ask.audience.is_empty() {
        parent.audience.clone()
    } else {
        ask.audience.clone()
    };
    let left = parent.expires_at.saturating_sub(now);
    if let Some(t) = ask.ttl
        && millis(t) > left
    {
        return Err(FieldError::new(
            "ttl",
            format!(
                "{}s outlives the subject token, which has {}s left",
                t.as_secs(),
                left / 1000
            ),
        ));
    }
    Ok((scopes, audience, left))
}

/// Where a child of `parent` delegated by `holder` to `to` hangs: one link
/// deeper, `holder` the nearest actor. Delegating back to an identity
/// already in the chain (other than the holder narrowing its own token) is
/// a loop.
fn chain(parent: &Lease, holder: &Holder, to: &Identity) -> Result<Delegation, FieldError> {
    let above = parent.delegation.as_ref();
    let mut actors = vec![holder.who.as_str().to_owned()];
    actors.extend(above.map(|d| d.actors.clone()).unwrap_or_default());
    if to != &holder.who && actors.iter().any(|a| a == to.as_str()) {
        return Err(FieldError::new(
            "for_identity",
            format!(
                "`{to}` already acts in this chain ({}): delegating back to it would make a loop",
                actors.join(" <- ")
            ),
        ));
    }
    Ok(Delegation {
        parent_id: parent.id.clone(),
        depth: above.map_or(0, |d| d.depth).saturating_add(1),
        actors,
    })
}

/// Under `approval = "inherit"` an approval-tier scope passes on only from
/// a lease that went through approval (or break-glass, or was itself
/// delegated from one, whose `approved_by` it carries): never from one
/// granted while the scope was `auto`.
fn inherited(parent: &Lease, requirements: &[Requirement]) -> Result<(), Refusal> {
    // A child of an approved lease carries its `approved_by`, so a chain
    // from an approved root passes; one from an auto-tier lease never does.
    if !parent.approved_by.is_empty() || parent.break_glass {
        return Ok(());
    }
    let scope = requirements
        .first()
        .map(|r| r.scope.clone())
        .unwrap_or_default();
    Err(Refusal {
        reason: format!(
            "needs approval, and the subject token's lease `{}` was not approved, so there is no approval to inherit",
            parent.id
        ),
        scope,
    })
}

fn idempotency(plan: &Plan, outcome: IdempotentOutcome) -> Option<Idempotency> {
    (!plan.client_request_id.is_empty()).then(|| Idempotency {
        caller: plan.holder.who.as_str().to_owned(),
        key: plan.client_request_id.clone(),
        params_digest: plan.digest.clone(),
        outcome,
    })
}

/// The chain as the trail records it: `sub <- actor <- earlier actor`,
/// and the parent lease.
fn chain_text(sub: &str, d: &Delegation) -> String {
    format!(
        "delegated from lease `{}` (depth {}): {sub} <- {}",
        d.parent_id,
        d.depth,
        d.actors.join(" <- ")
    )
}

#[cfg(test)]
mod tests;

//! Issuance: validate an ask, let policy decide, and either grant at once (a
//! durable lease and a token), take the break-glass path (grant now, review
//! later), or park the request for approvers. Retries with the same
//! `client_request_id` get the first outcome back.

use std::time::Duration;

pub use super::ask::TokenAsk;
use super::ask::{Checked, Grant, sha256_hex};
use super::{Engine, EngineError};
use crate::audit::{Action, Entry as AuditEntry, Outcome as AuditOutcome};
use crate::clock::millis;
use crate::identity::Identity;
use crate::model::{
    Idempotency, IdempotentOutcome, Lease, LeaseState, RequestState, Requirement, TokenRequest,
};
use crate::notify::EventKind;
use crate::policy::{Decision, Policy, Refusal};
use crate::text::new_id;
use crate::token;

/// Outcome of [`Engine::request_token`].
#[derive(Debug)]
pub enum Outcome {
    /// Granted at once.
    Granted {
        /// The token (a secret: never log it).
        token: String,
        /// Its lease.
        lease: Lease,
        /// A login scope's database login, made for this lease (its
        /// password is a secret, given here once).
        login: Option<Box<crate::logins::Issued>>,
    },
    /// Parked for approval.
    Parked(TokenRequest),
}

impl Engine {
    /// Ask for a token (see the `RequestToken` RPC).
    pub async fn request_token(
        &self,
        who: &Identity,
        ask: TokenAsk,
    ) -> Result<Outcome, EngineError> {
        let policy = self.policy();
        let checked = Checked::new(&policy, who, &ask, self.clock.now())?;
        let decision = match policy.decide(who, &checked.scopes, ask.ttl) {
            Ok(d) => d,
            Err(refusal) => return Err(self.refuse(&checked, refusal)),
        };
        match decision {
            Decision::Park {
                ttl,
                max_ttl,
                pending_ttl,
                requirements,
            } if !ask.break_glass => {
                if let Some(scope) = policy.unjustified(&requirements, &checked.justification) {
                    return Err(unjustified(scope).into());
                }
                self.park(checked, ttl, max_ttl, pending_ttl, requirements)
                    .await
            }
            Decision::Park {
                ttl,
                max_ttl,
                requirements,
                ..
            } => {
                let grant =
                    super::break_glass::grant(&policy, &checked, ttl, max_ttl, requirements)?;
                self.grant(&policy, checked, grant).await
            }
            Decision::Grant {
                ttl,
                max_ttl,
                rules,
            } => {
                let grant = Grant {
                    ttl,
                    max_ttl,
                    rules,
                    review: None,
                };
                self.grant(&policy, checked, grant).await
            }
        }
    }

    /// A refusal changes nothing; its record is noted, not waited on.
    fn refuse(&self, c: &Checked, refusal: Refusal) -> EngineError {
        // A refusal costs the caller nothing, so what it writes is bounded:
        // the refused scope and how many were asked, not all 64 of them.
        let reason = match c.scopes.len() {
            1 => refusal.to_string(),
            n => format!("{refusal} ({n} scopes asked)"),
        };
        let entry = AuditEntry::ok(
            c.who.as_str(),
            Action::TokenRefused,
            "",
            std::slice::from_ref(&refusal.scope),
            &reason,
        )
        .outcome(AuditOutcome::Refused);
        if let Err(e) = self.note(vec![entry]) {
            return e;
        }
        self.metrics.request("refused");
        refusal.into()
    }

    /// Grant now under `policy` (the one that decided): sign, write the
    /// lease (and the break-glass review record), record, wait for
    /// durability, then hand the token over.
    async fn grant(&self, policy: &Policy, c: Checked, g: Grant) -> Result<Outcome, EngineError> {
        let now = c.now;
        let request_id = g.review.as_ref().map(|_| new_id("r_", now)).transpose()?;
        let terms = c.terms(g.ttl, g.max_ttl);
        let cnf = super::bound_to(policy, &c.scopes, c.x5t.as_deref())?;
        let id = new_id("l_", now)?;
        let idem = c.idempotency(IdempotentOutcome::Lease(id.clone()));
        let made = self
            .login_for_grant(policy, &c, &id, now.saturating_add(terms.ttl_ms))
            .await?;
        let login = made.as_ref().map(|m| Box::new(m.login.clone()));
        // One batch: the lease, the key claim, the break-glass review
        // record, and the grant's own record. Signed (again, should the
        // key ring have moved) on every try.
        let (c, g) = (&c, &g);
        let (request_id, cnf, id, idem, terms, login_ref) =
            (&request_id, &cnf, &id, &idem, &terms, &login);
        let out = self
            .commit_claiming(|mut op| async move {
                super::logins::still_in_time(login_ref.is_some(), now, self.clock.now())?;
                let keys = self.keys.current();
                let lease = Lease {
                    request_id: request_id.clone(),
                    break_glass: g.review.is_some(),
                    cnf: cnf.clone(),
                    login: login_ref.clone(),
                    ..Lease::active(id.clone(), c.who.as_str(), terms, now, &keys.active.kid)
                };
                let (lease, tok) = self.signed(&keys, lease, now)?;
                op.create_lease(lease.clone(), idem.clone());
                let review = grant_in(&mut op, c, g, &lease)?;
                Ok((op, (lease, tok, review)))
            })
            .await;
        // Not written (or answered from an earlier call): `made` ends its
        // login when dropped.
        let (lease, tok, review) = match out? {
            Ok(done) => done,
            Err(existing) => return self.replay(&c.who, existing, &c.digest).await,
        };
        self.deadlines.note(lease.expires_at);
        let who = &c.who;
        if let Some(r) = &review {
            self.metrics.request("break_glass");
            tracing::warn!(jti = %lease.id, request_id = %r.id, sub = %who, scopes = %lease.scopes.join(" "), "break-glass grant; review pending");
            self.announce(EventKind::BreakGlass, r, who.as_str(), &lease.justification);
        } else {
            self.metrics.request("granted");
        }
        tracing::info!(jti = %lease.id, kid = %lease.kid, sub = %who, scopes = %lease.scopes.join(" "), rules = %g.rules.join(", "), "granted");
        Ok(Outcome::Granted {
            token: tok,
            lease,
            login: made.map(super::logins::Made::deliver),
        })
    }

    /// A login scope's login, made before its lease is written: a crash
    /// in between leaves a marked role the reconciler ends, never a lease
    /// whose login does not exist.
    async fn login_for_grant(
        &self,
        policy: &Policy,
        c: &Checked,
        lease_id: &str,
        until: u64,
    ) -> Result<Option<super::logins::Made>, EngineError> {
        match super::logins::login_scope(policy, &c.scopes)? {
            Some((db, rule)) => Ok(Some(
                self.make_login(c.who.as_str(), db, rule, lease_id, until)
                    .await?,
            )),
            None => Ok(None),
        }
    }

    /// Park for approvers: a durable PENDING request with its deadline.
    async fn park(
        &self,
        c: Checked,
        ttl: Duration,
        max_ttl: Duration,
        pending_ttl: Duration,
        requirements: Vec<Requirement>,
    ) -> Result<Outcome, EngineError> {
        let who = &c.who;
        self.check_open_requests(who).await?;
        let req = parked_request(&c, ttl, max_ttl, pending_ttl, requirements)?;
        let idem = c.idempotency(IdempotentOutcome::Request(req.id.clone()));
        let rules: Vec<String> = req.waiting_for.iter().map(|w| w.rule.clone()).collect();
        let (req_ref, idem, rules) = (&req, &idem, &rules);
        let signed_in = c.signed_in.as_ref();
        let parked = self
            .commit_claiming(|mut op| async move {
                let req = req_ref;
                op.create_request(req.clone(), idem.clone());
                let entry = AuditEntry::ok(
                    who.as_str(),
                    Action::RequestParked,
                    &req.id,
                    &req.scopes,
                    &req.justification,
                );
                let mut entries = vec![entry.rule(rules.join("; "))];
                entries.extend(signed_in.map(|s| s.entry(who, &req.id, &req.scopes)));
                op.record(entries)?;
                Ok((op, ()))
            })
            .await?;
        if let Err(existing) = parked {
            return self.replay(who, existing, &c.digest).await;
        }
        self.metrics.request("parked");
        self.deadlines.note(req.deadline);
        tracing::info!(request_id = %req.id, sub = %who, scopes = %req.scopes.join(" "), "parked for approval");
        self.announce(EventKind::Parked, &req, who.as_str(), &req.justification);
        Ok(Outcome::Parked(req))
    }

    /// Answer a retried request with the first outcome.
    pub(super) async fn replay(
        &self,
        who: &Identity,
        existing: Idempotency,
        digest: &str,
    ) -> Result<Outcome, EngineError> {
        if existing.params_digest != digest {
            return Err(EngineError::IdempotencyConflict);
        }
        // The first call's write may not be durable yet: wait for it too.
        self.commit.durable().await?;
        match existing.outcome {
            IdempotentOutcome::Lease(id) => {
                let lease = self
                    .store()
                    .lease(&id)
                    .await?
                    .ok_or_else(|| EngineError::not_found("lease", &id))?;
                if lease.state != LeaseState::Active || lease.expires_at <= self.clock.now() {
                    return Err(EngineError::WrongState(format!(
                        "the lease `{id}` granted for this client_request_id is no longer active"
                    )));
                }
                if lease.login.is_some() {
                    return Err(EngineError::WrongState(format!(
                        "the lease `{id}` granted for this client_request_id holds a database login, whose password was given once and is kept nowhere: revoke it and ask again"
                    )));
                }
                let keys = self.keys.current();
                let tok = token::mint(&keys, &self.claims(&lease, lease.token_issued_at))?;
                tracing::info!(jti = %lease.id, sub = %who, "idempotent replay");
                Ok(Outcome::Granted {
                    token: tok,
                    lease,
                    login: None,
                })
            }
            IdempotentOutcome::Request(id) => {
                let req = self
                    .store()
                    .request(&id)
                    .await?
                    .ok_or_else(|| EngineError::not_found("request", &id))?;
                Ok(Outcome::Parked(req))
            }
        }
    }
}

/// The PENDING request `c` parks as, with its deadline.
fn parked_request(
    c: &Checked,
    ttl: Duration,
    max_ttl: Duration,
    pending_ttl: Duration,
    requirements: Vec<Requirement>,
) -> Result<TokenRequest, EngineError> {
    let (now, who) = (c.now, &c.who);
    let claims = c
        .signed_in
        .as_ref()
        .map_or("", |s| s.verified.claims_digest.as_str());
    let (joined, ttl_be) = (c.scopes.join(" "), millis(ttl).to_be_bytes());
    let mut parts: Vec<&[u8]> = vec![
        who.as_str().as_bytes(),
        joined.as_bytes(),
        &ttl_be,
        c.audience.as_bytes(),
    ];
    // A signed-in workload's request names its one token, so an approval
    // is for that run (unchanged for every other request).
    if !claims.is_empty() {
        parts.push(claims.as_bytes());
    }
    Ok(TokenRequest {
        digest: sha256_hex(&parts),
        sign_in: c.signed_in.as_ref().map(super::ask::SignedIn::sign_in),
        claim_digest: c.signed_in.as_ref().map(|s| s.claim_digest.clone()),
        deadline: now.saturating_add(millis(pending_ttl)),
        waiting_for: requirements,
        client_request_id: (!c.client_request_id.is_empty()).then(|| c.client_request_id.clone()),
        ..TokenRequest::new(
            new_id("r_", now)?,
            who.as_str(),
            &c.terms(ttl, max_ttl),
            now,
            RequestState::Pending,
            &c.justification,
        )
    })
}

/// The rest of a grant, in `op`: the break-glass review record, if any,
/// and the grant's own record.
fn grant_in(
    op: &mut super::Op,
    c: &Checked,
    g: &Grant,
    lease: &Lease,
) -> Result<Option<TokenRequest>, EngineError> {
    let review = match (&g.review, &lease.request_id) {
        (Some(waiting_for), Some(rid)) => {
            let r = super::break_glass::review_record(c, lease, rid, waiting_for.clone());
            op.create_request(r.clone(), None);
            Some(r)
        }
        _ => None,
    };
    let action = match review {
        Some(_) => Action::TokenBreakGlass,
        None => Action::TokenGranted,
    };
    let entry = AuditEntry::ok(
        c.who.as_str(),
        action,
        &lease.id,
        &lease.scopes,
        &lease.justification,
    );
    let mut entries = vec![entry.rule(g.rules.join("; "))];
    entries.extend(
        c.signed_in
            .as_ref()
            .map(|s| s.entry(&c.who, &lease.id, &lease.scopes)),
    );
    op.record(entries)?;
    if let Some(l) = &lease.login {
        Engine::record_login(op, c.who.as_str(), &lease.id, &lease.scopes, l)?;
    }
    Ok(review)
}

#[cfg(test)]
mod tests;

/// A request for `scope` would park with no reason for its approvers.
pub(super) fn unjustified(scope: &str) -> crate::text::FieldError {
    crate::text::FieldError::new(
        "justification",
        format!(
            "`{scope}` waits for approvers, who must be told why it is needed (`--reason` on the command line); the scope's policy can set require_justification = false"
        ),
    )
}

//! Issuance: validate an ask, let policy decide, and either grant at once (a
//! durable lease and a token), take the break-glass path (grant now, review
//! later), or park the request for approvers. Retries with the same
//! `client_request_id` get the first outcome back.

use std::time::Duration;

use super::{Engine, EngineError};
use crate::audit::{Action, Entry as AuditEntry, Outcome as AuditOutcome};
use crate::clock::millis;
use crate::identity::Identity;
use crate::notify::EventKind;
use crate::policy::{Decision, Policy, Refusal};
use crate::store::{
    Idempotency, IdempotentOutcome, Lease, LeaseState, Millis, RequestState, Requirement, Terms,
    TokenRequest,
};
use crate::text::{
    FieldError, check_audience, check_client_request_id, check_reason, check_scopes, new_id,
};
use crate::token;

/// A workload's ask, as received (validated by [`Engine::request_token`]).
#[derive(Clone, Debug, Default)]
pub struct TokenAsk {
    /// Scopes.
    pub scopes: Vec<String>,
    /// Wanted TTL; `None` for the policy default.
    pub ttl: Option<Duration>,
    /// Audience; empty for the policy default.
    pub audience: String,
    /// Why.
    pub justification: String,
    /// Idempotency key; empty for none.
    pub client_request_id: String,
    /// Break-glass flag.
    pub break_glass: bool,
}

/// Outcome of [`Engine::request_token`].
#[derive(Debug)]
pub enum Outcome {
    /// Granted at once.
    Granted {
        /// The token (a secret: never log it).
        token: String,
        /// Its lease.
        lease: Lease,
    },
    /// Parked for approval.
    Parked(TokenRequest),
}

/// An ask that passed validation, with what the request is bound to.
struct Checked {
    who: Identity,
    scopes: Vec<String>,
    audience: String,
    justification: String,
    client_request_id: String,
    /// Digest of the parameters: idempotent retries must match it.
    digest: String,
    now: Millis,
}

impl Checked {
    fn terms(&self, ttl: Duration, max_ttl: Duration) -> Terms {
        Terms {
            scopes: self.scopes.clone(),
            audience: self.audience.clone(),
            justification: self.justification.clone(),
            ttl_ms: millis(ttl),
            max_ttl_ms: millis(max_ttl),
        }
    }

    fn idempotency(&self, outcome: IdempotentOutcome) -> Option<Idempotency> {
        (!self.client_request_id.is_empty()).then(|| Idempotency {
            caller: self.who.as_str().to_owned(),
            key: self.client_request_id.clone(),
            params_digest: self.digest.clone(),
            outcome,
        })
    }
}

/// What to grant at once.
struct Grant {
    ttl: Duration,
    max_ttl: Duration,
    rules: Vec<String>,
    /// Break-glass: the requirements a reviewer must see to.
    review: Option<Vec<Requirement>>,
}

pub(super) fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A TTL a caller asked for: non-zero and within the broker's hard cap.
pub(super) fn check_ttl(
    policy: &Policy,
    ttl: Option<Duration>,
    field: &'static str,
) -> Result<(), FieldError> {
    match ttl {
        Some(t) if t.is_zero() => Err(FieldError::new(field, "must be greater than zero")),
        Some(t) if t > policy.hard_max_ttl => Err(FieldError::new(
            field,
            format!(
                "exceeds the broker limit of {}",
                humantime::format_duration(policy.hard_max_ttl)
            ),
        )),
        _ => Ok(()),
    }
}

impl Engine {
    /// Ask for a token (see the `RequestToken` RPC).
    pub async fn request_token(
        &self,
        who: &Identity,
        ask: TokenAsk,
    ) -> Result<Outcome, EngineError> {
        let policy = self.policy();
        let checked = self.check_ask(&policy, who, &ask)?;
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
                self.park(checked, ttl, max_ttl, pending_ttl, requirements)
                    .await
            }
            Decision::Park {
                ttl,
                max_ttl,
                requirements,
                ..
            } => {
                let grant = break_glass(&policy, &checked, ttl, max_ttl, requirements)?;
                self.grant(checked, grant).await
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
                self.grant(checked, grant).await
            }
        }
    }

    /// Validate every field; normalise scopes; fill the default audience.
    fn check_ask(
        &self,
        policy: &Policy,
        who: &Identity,
        ask: &TokenAsk,
    ) -> Result<Checked, FieldError> {
        let scopes = check_scopes(&ask.scopes)?;
        check_ttl(policy, ask.ttl, "ttl")?;
        check_reason("justification", &ask.justification, false)?;
        check_audience(&ask.audience)?;
        check_client_request_id(&ask.client_request_id)?;
        let audience = if ask.audience.is_empty() {
            policy.default_audience.clone()
        } else {
            ask.audience.clone()
        };
        let ttl_ms = ask.ttl.map_or(0, millis).to_be_bytes();
        let digest = sha256_hex(&[
            who.as_str().as_bytes(),
            scopes.join(" ").as_bytes(),
            &ttl_ms,
            audience.as_bytes(),
            ask.justification.as_bytes(),
        ]);
        Ok(Checked {
            who: who.clone(),
            scopes,
            audience,
            justification: ask.justification.clone(),
            client_request_id: ask.client_request_id.clone(),
            digest,
            now: self.clock.now(),
        })
    }

    /// A refusal changes nothing; its record is noted, not waited on.
    fn refuse(&self, c: &Checked, refusal: Refusal) -> EngineError {
        let entry = AuditEntry::ok(
            c.who.as_str(),
            Action::TokenRefused,
            "",
            &c.scopes,
            &refusal.to_string(),
        )
        .outcome(AuditOutcome::Refused);
        if let Err(e) = self.note(vec![entry]) {
            return e;
        }
        self.metrics.request("refused");
        refusal.into()
    }

    /// Grant now: sign, write the lease (and the break-glass review record),
    /// record, wait for durability, then hand the token over.
    async fn grant(&self, c: Checked, g: Grant) -> Result<Outcome, EngineError> {
        let now = c.now;
        let request_id = g.review.as_ref().map(|_| new_id("r_", now)).transpose()?;
        let keys = self.keys.current();
        let terms = c.terms(g.ttl, g.max_ttl);
        let lease = Lease {
            request_id,
            break_glass: g.review.is_some(),
            ..Lease::active(
                new_id("l_", now)?,
                c.who.as_str(),
                &terms,
                now,
                &keys.active.kid,
            )
        };
        // Sign first: if signing fails, nothing is written.
        let tok = token::mint(&keys, &self.claims(&lease, now))?;
        let idem = c.idempotency(IdempotentOutcome::Lease(lease.id.clone()));
        if let Some(existing) = self.records.create_lease(&lease, idem.as_ref())? {
            return self.replay(&c.who, existing, &c.digest).await;
        }
        // Break-glass: a record for the review queue, in the same durable
        // batch as the lease.
        let review = match (g.review, &lease.request_id) {
            (Some(waiting_for), Some(rid)) => {
                let r = review_record(&c, &lease, rid, waiting_for);
                self.records.create_request(&r, None)?;
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
        self.record(vec![entry.rule(g.rules.join("; "))]).await?;
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
        Ok(Outcome::Granted { token: tok, lease })
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
        let (now, who) = (c.now, &c.who);
        let req = TokenRequest {
            digest: sha256_hex(&[
                who.as_str().as_bytes(),
                c.scopes.join(" ").as_bytes(),
                &millis(ttl).to_be_bytes(),
                c.audience.as_bytes(),
            ]),
            deadline: now.saturating_add(millis(pending_ttl)),
            waiting_for: requirements,
            client_request_id: (!c.client_request_id.is_empty())
                .then(|| c.client_request_id.clone()),
            ..TokenRequest::new(
                new_id("r_", now)?,
                who.as_str(),
                &c.terms(ttl, max_ttl),
                now,
                RequestState::Pending,
                &c.justification,
            )
        };
        let idem = c.idempotency(IdempotentOutcome::Request(req.id.clone()));
        if let Some(existing) = self.records.create_request(&req, idem.as_ref())? {
            return self.replay(who, existing, &c.digest).await;
        }
        let rules: Vec<String> = req.waiting_for.iter().map(|w| w.rule.clone()).collect();
        let entry = AuditEntry::ok(
            who.as_str(),
            Action::RequestParked,
            &req.id,
            &req.scopes,
            &req.justification,
        );
        self.record(vec![entry.rule(rules.join("; "))]).await?;
        self.metrics.request("parked");
        self.deadlines.note(req.deadline);
        tracing::info!(request_id = %req.id, sub = %who, scopes = %req.scopes.join(" "), "parked for approval");
        self.announce(EventKind::Parked, &req, who.as_str(), &req.justification);
        Ok(Outcome::Parked(req))
    }

    /// Answer a retried request with the first outcome.
    async fn replay(
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
                    .lease(&id)?
                    .ok_or_else(|| EngineError::not_found("lease", &id))?;
                if lease.state != LeaseState::Active || lease.expires_at <= self.clock.now() {
                    return Err(EngineError::WrongState(format!(
                        "the lease `{id}` granted for this client_request_id is no longer active"
                    )));
                }
                let keys = self.keys.current();
                let tok = token::mint(&keys, &self.claims(&lease, lease.token_issued_at))?;
                tracing::info!(jti = %lease.id, sub = %who, "idempotent replay");
                Ok(Outcome::Granted { token: tok, lease })
            }
            IdempotentOutcome::Request(id) => {
                let req = self
                    .store()
                    .request(&id)?
                    .ok_or_else(|| EngineError::not_found("request", &id))?;
                Ok(Outcome::Parked(req))
            }
        }
    }
}

/// Break-glass turns a park into a grant capped by every scope's
/// `break_glass.max_ttl`; a scope without one refuses.
fn break_glass(
    policy: &Policy,
    c: &Checked,
    ttl: Duration,
    max_ttl: Duration,
    requirements: Vec<Requirement>,
) -> Result<Grant, EngineError> {
    check_reason("justification", &c.justification, true)
        .map_err(|_| FieldError::new("justification", "required for break-glass"))?;
    let mut cap = ttl;
    for r in &requirements {
        let allowed = policy
            .scopes
            .get(&r.scope)
            .and_then(|s| s.approval.as_ref())
            .and_then(|a| a.break_glass_max_ttl);
        match allowed {
            Some(max) => cap = cap.min(max),
            None => {
                return Err(EngineError::Refused(Refusal {
                    scope: r.scope.clone(),
                    reason: format!("break-glass is not allowed ({})", r.rule),
                }));
            }
        }
    }
    Ok(Grant {
        ttl: cap,
        max_ttl: cap.min(max_ttl),
        rules: requirements
            .iter()
            .map(|r| format!("break-glass on {}", r.rule))
            .collect(),
        review: Some(requirements),
    })
}

/// The review-queue record of a break-glass grant: already ISSUED, review
/// pending.
fn review_record(
    c: &Checked,
    lease: &Lease,
    id: &str,
    waiting_for: Vec<Requirement>,
) -> TokenRequest {
    TokenRequest {
        deadline: c.now,
        waiting_for,
        lease_id: Some(lease.id.clone()),
        digest: c.digest.clone(),
        break_glass: true,
        review_pending: true,
        ..TokenRequest::new(
            id.to_owned(),
            c.who.as_str(),
            &Terms {
                ttl_ms: lease.ttl_ms,
                max_ttl_ms: lease.max_expires_at - lease.issued_at,
                ..c.terms(Duration::ZERO, Duration::ZERO)
            },
            c.now,
            RequestState::Issued,
            &format!("break-glass: {}", lease.justification),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::engine::testing::{POLICY, actions, ask, rig, rig_on, workload};
    use crate::store::conformance::FailingSync;
    use crate::store::mem::MemStore;

    #[tokio::test]
    async fn auto_grants_at_once_approval_parks_and_unknown_is_refused() {
        let r = rig(POLICY);
        let Outcome::Granted { lease, .. } = r
            .engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap()
        else {
            panic!("auto scope must be granted")
        };
        assert_eq!(lease.expires_at - lease.issued_at, 300_000, "default_ttl");
        assert!(matches!(
            r.engine.request_token(&workload(), ask(&["admin"])).await.unwrap(),
            Outcome::Parked(req) if req.state == RequestState::Pending
        ));
        let err = r
            .engine
            .request_token(&workload(), ask(&["nope"]))
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Refused(_)), "{err}");
        let err = r
            .engine
            .request_token(&workload(), ask(&[]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::Invalid(ref f) if f.field == "scopes"),
            "{err}"
        );
        assert_eq!(
            actions(r.store.as_ref()),
            ["token.granted", "request.parked", "token.refused"]
        );
    }

    #[tokio::test]
    async fn a_retry_with_the_same_key_replays_and_other_parameters_conflict() {
        let r = rig(POLICY);
        let mut a = ask(&["read"]);
        a.client_request_id = "k1".into();
        let Outcome::Granted { lease: first, .. } = r
            .engine
            .request_token(&workload(), a.clone())
            .await
            .unwrap()
        else {
            panic!()
        };
        let Outcome::Granted { lease: again, .. } = r
            .engine
            .request_token(&workload(), a.clone())
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(first.id, again.id);
        a.justification = "other".into();
        let err = r.engine.request_token(&workload(), a).await.unwrap_err();
        assert!(matches!(err, EngineError::IdempotencyConflict));
    }

    #[tokio::test]
    async fn break_glass_grants_capped_and_queues_a_review() {
        let r = rig(POLICY);
        let mut a = ask(&["admin"]);
        a.break_glass = true;
        let err = r
            .engine
            .request_token(&workload(), a.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Invalid(ref f) if f.field == "justification"));
        a.justification = "pager".into();
        let Outcome::Granted { lease, .. } = r.engine.request_token(&workload(), a).await.unwrap()
        else {
            panic!()
        };
        assert!(lease.break_glass);
        assert_eq!(
            lease.max_expires_at - lease.issued_at,
            300_000,
            "break_glass.max_ttl"
        );
        let review = r
            .store
            .request(lease.request_id.as_deref().unwrap())
            .unwrap()
            .unwrap();
        assert!(review.review_pending && review.state == RequestState::Issued);
    }

    #[tokio::test]
    async fn a_store_that_cannot_persist_yields_no_token_no_audit_gap_and_unhealthy() {
        let store = Arc::new(FailingSync(MemStore::new(), AtomicBool::new(false)));
        let r = rig_on(store.clone(), POLICY);
        assert!(matches!(
            r.engine
                .request_token(&workload(), ask(&["read"]))
                .await
                .unwrap(),
            Outcome::Granted { .. }
        ));
        assert!(r.engine.healthy());

        store.1.store(true, Ordering::SeqCst);
        let err = r
            .engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        assert!(!r.engine.healthy(), "health follows the failed commit");

        // The chain has no gap: every record is there, in order, and verifies.
        let report = crate::audit::verify(r.store.as_ref(), &r.engine.keys().current()).unwrap();
        assert!(report.problem.is_none(), "{report:?}");
        store.1.store(false, Ordering::SeqCst);
        assert!(matches!(
            r.engine
                .request_token(&workload(), ask(&["read"]))
                .await
                .unwrap(),
            Outcome::Granted { .. }
        ));
        assert!(r.engine.healthy(), "recovers once a sync succeeds");
    }
}

//! A workload without a client certificate (issue 24,
//! docs/design-federation.md). Its platform token, verified by
//! `federation`, names it; its ask then goes through issuance like any
//! other caller's: the same policy, tiers, approvals and records. What is
//! added: the token's `jti` is used once, claimed in the same store
//! operation as the decision it leads to; the sign-in is recorded in that
//! operation too; a parked request gets a claim secret, the only thing
//! that proves its requester again; and no scope binds to a certificate
//! it does not have.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SecureRandom as _;

use super::ask::{SignedIn, sha256_hex};
use super::issue::TokenAsk;
use super::{Engine, EngineError, Holder, Outcome};
use crate::audit::{Action, Entry as AuditEntry, Outcome as AuditOutcome};
use crate::federation::{Check, Refusal, Verified};
use crate::identity::Identity;
use crate::model::TokenRequest;
use crate::text::NoRandomness;

fn secret() -> Result<String, NoRandomness> {
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| NoRandomness)?;
    Ok(B64.encode(b))
}

impl Engine {
    /// Ask for a token as the workload `verified` names (see
    /// `ExchangeToken` with a platform token). A parked ask comes back with
    /// the claim secret its requester proves itself with.
    pub async fn request_federated(
        &self,
        verified: Verified,
        mut ask: TokenAsk,
    ) -> Result<(Outcome, Option<String>), EngineError> {
        let policy = self.policy();
        // The key caches follow policy reloads a moment later: the policy
        // in force decides whether the issuer is still trusted.
        if !policy.issuers.contains_key(&verified.issuer) {
            return Err(self.sign_in_refused(Refusal {
                check: Check::Issuer,
                issuer: Some(verified.issuer.clone()),
                claims_digest: None,
            }));
        }
        if let Some(s) = ask
            .scopes
            .iter()
            .find(|s| policy.binds(std::slice::from_ref(s)))
        {
            return Err(EngineError::WrongState(format!(
                "scope `{}` binds its tokens to the caller's client certificate (bind = \"mtls\"), and a workload signed in with a platform token has none",
                crate::text::escape_controls(s)
            )));
        }
        let claim = secret()?;
        let claim_digest = sha256_hex(&[claim.as_bytes()]);
        let (issuer, who) = (verified.issuer.clone(), verified.identity.clone());
        let digest = verified.claims_digest.clone();
        ask.x5t = None;
        ask.break_glass = false;
        ask.signed_in = Some(SignedIn::new(verified, claim_digest.clone(), secret()?));
        let out = match self.request_token(&who, ask).await {
            Ok(Outcome::Parked(r)) if r.claim_digest.as_deref() == Some(&claim_digest) => {
                (Outcome::Parked(r), Some(claim))
            }
            Ok(Outcome::Parked(r)) => return Err(claimed_before(&r)),
            Ok(granted) => (granted, None),
            Err(EngineError::IdempotencyConflict) => {
                return Err(self.sign_in_refused(Refusal {
                    check: Check::Replay,
                    issuer: Some(issuer),
                    claims_digest: Some(digest),
                }));
            }
            Err(e) => return Err(e),
        };
        self.metrics.sign_in(&issuer, "signed_in");
        Ok(out)
    }

    /// Count and record a refused platform token; the error to answer
    /// with. Tokens refused before their signature verified reach the log
    /// and metrics only: anyone could have sent them.
    pub fn sign_in_refused(&self, r: Refusal) -> EngineError {
        let issuer = r.issuer.as_deref().unwrap_or("");
        let check = match &r.check {
            Check::BoundClaim(_) => "bound claim".to_owned(),
            c => c.name(),
        };
        self.metrics.sign_in(issuer, &check);
        if r.check.unrecorded() || !self.first_refusal(r.claims_digest.as_deref()) {
            tracing::debug!(issuer, check = %r.check.name(), "platform token refused");
        } else {
            tracing::info!(issuer, check = %r.check.name(), claims = r.claims_digest.as_deref().unwrap_or(""), "platform token refused");
            let reason = format!(
                "issuer {issuer}: {}; claims sha256:{}",
                r.check.name(),
                r.claims_digest.as_deref().unwrap_or("-")
            );
            let entry = AuditEntry::ok("-", Action::FederationRefused, "", &[], &reason)
                .outcome(AuditOutcome::Refused);
            if let Err(e) = self.note(vec![entry]) {
                return e;
            }
        }
        EngineError::SignIn(r)
    }

    /// Whether the token with this claims digest was not refused (and
    /// recorded) before: anyone with a validly signed token could replay
    /// it to fill the trail. Bounded: the set starts again when full.
    fn first_refusal(&self, digest: Option<&str>) -> bool {
        const KEPT: usize = 4096;
        let (Some(d), Ok(mut seen)) = (digest, self.refusals_recorded.lock()) else {
            return true;
        };
        if seen.len() >= KEPT {
            seen.clear();
        }
        seen.insert(d.to_owned())
    }

    /// The requester of parked request `id`, proven by `claim_secret`
    /// (a caller without a certificate): who it may watch and claim it as.
    pub async fn holder_by_claim_secret(
        &self,
        id: &str,
        claim_secret: &str,
    ) -> Result<Holder, EngineError> {
        crate::text::require_id("request_id", id)?;
        let req = self.store().request(id).await?;
        let proven = req.as_ref().and_then(|r| {
            let digest = r.claim_digest.as_deref()?;
            let ok = crate::text::same_secret(&sha256_hex(&[claim_secret.as_bytes()]), digest);
            ok.then(|| Identity::parse(&r.requester).ok())?
        });
        proven
            .map(Holder::from)
            .ok_or_else(|| EngineError::not_found("request", id))
    }
}

/// A retry of a federated ask that parked: its claim secret was given to
/// the first call only.
fn claimed_before(r: &TokenRequest) -> EngineError {
    EngineError::WrongState(format!(
        "this platform token already opened request `{}`, whose claim secret was given once and is kept nowhere: sign in again with a new token",
        r.id
    ))
}

//! An ask for a token as received, and as it stands once every field is
//! checked: what issuance, break-glass and renewal share.

use std::time::Duration;

use crate::audit::{Action, Entry as AuditEntry};
use crate::clock::millis;
use crate::federation::Verified;
use crate::identity::Identity;
use crate::model::{Idempotency, IdempotentOutcome, Requirement, SignIn, Terms};
use crate::policy::Policy;
use crate::store::Millis;
use crate::text::{
    FieldError, check_audience, check_client_request_id, check_reason, check_scopes,
};

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
    /// RFC 8705 thumbprint of the caller's client certificate: what the
    /// token is bound to when a scope says `bind = "mtls"`.
    pub x5t: Option<String>,
    /// The platform sign-in of a caller without a certificate (issue 24);
    /// set only by [`Engine::request_federated`](super::Engine::request_federated)
    /// (its fields are the engine's: others can only leave it `None`).
    pub signed_in: Option<SignedIn>,
}

/// An ask that passed validation, with what the request is bound to.
pub(super) struct Checked {
    pub(super) who: Identity,
    pub(super) scopes: Vec<String>,
    pub(super) audience: String,
    pub(super) justification: String,
    pub(super) client_request_id: String,
    pub(super) x5t: Option<String>,
    /// The platform sign-in, for a caller without a certificate.
    pub(super) signed_in: Option<SignedIn>,
    /// Digest of the parameters: idempotent retries must match it.
    pub(super) digest: String,
    pub(super) now: Millis,
}

impl Checked {
    /// Validate every field of `ask` by `who` at `now`; normalise scopes;
    /// fill the default audience.
    pub(super) fn new(
        policy: &Policy,
        who: &Identity,
        ask: &TokenAsk,
        now: Millis,
    ) -> Result<Self, FieldError> {
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
        let claims = ask
            .signed_in
            .as_ref()
            .map_or("", |s| s.verified.claims_digest.as_str());
        let (joined, glass) = (scopes.join(" "), [u8::from(ask.break_glass)]);
        let mut parts: Vec<&[u8]> = vec![
            who.as_str().as_bytes(),
            joined.as_bytes(),
            &ttl_ms,
            audience.as_bytes(),
            ask.justification.as_bytes(),
            &glass,
        ];
        // A signed-in ask names its one token (unchanged for every other).
        if !claims.is_empty() {
            parts.push(claims.as_bytes());
        }
        let digest = sha256_hex(&parts);
        Ok(Self {
            who: who.clone(),
            scopes,
            audience,
            justification: ask.justification.clone(),
            client_request_id: ask.client_request_id.clone(),
            x5t: ask.x5t.clone(),
            signed_in: ask.signed_in.clone(),
            digest,
            now,
        })
    }

    pub(super) fn terms(&self, ttl: Duration, max_ttl: Duration) -> Terms {
        Terms {
            scopes: self.scopes.clone(),
            audience: self.audience.clone(),
            justification: self.justification.clone(),
            ttl_ms: millis(ttl),
            max_ttl_ms: millis(max_ttl),
        }
    }

    pub(super) fn idempotency(&self, outcome: IdempotentOutcome) -> Option<Idempotency> {
        if let Some(once) = self.signed_in.as_ref().and_then(SignedIn::use_once) {
            return Some(Idempotency { outcome, ..once });
        }
        (!self.client_request_id.is_empty()).then(|| Idempotency {
            caller: self.who.as_str().to_owned(),
            key: self.client_request_id.clone(),
            params_digest: self.digest.clone(),
            outcome,
        })
    }
}

/// Longest `sub` the trail keeps.
const MAX_SUB: usize = 256;

/// A verified platform sign-in, carried by the ask it came with.
#[derive(Clone, Debug)]
pub struct SignedIn {
    pub(super) verified: Verified,
    /// Hex SHA-256 of the claim secret handed back if the ask parks.
    pub(super) claim_digest: String,
    /// Makes a second use of the token without the first call's
    /// `client_request_id` conflict with the first (a replay, not a retry).
    nonce: String,
}

impl SignedIn {
    pub(super) fn new(verified: Verified, claim_digest: String, nonce: String) -> Self {
        Self {
            verified,
            claim_digest,
            nonce,
        }
    }

    /// The token's use-once claim, in the idempotency table: the key is
    /// the issuer and `jti`, and no second use matches the first (its
    /// digest is unique to it): a retry whose answer was lost signs in
    /// again with a new platform token, so no copy of the token can ever
    /// mint a second credential. `None` where the issuer bounds replay by
    /// age instead.
    pub(super) fn use_once(&self) -> Option<Idempotency> {
        let jti = self
            .verified
            .jti
            .as_ref()
            .filter(|_| self.verified.use_once)?;
        let key = sha256_hex(&[self.verified.issuer.as_bytes(), jti.as_bytes()]);
        let params_digest = format!("once:{}", self.nonce);
        Some(Idempotency {
            // Not the mapped identity: a change of the identity template
            // must not make a used token new again.
            caller: format!("federation:{}", self.verified.issuer),
            key: format!("jti:{key}"),
            params_digest,
            outcome: IdempotentOutcome::Request(String::new()),
        })
    }

    /// What approvers see of the sign-in.
    pub(super) fn sign_in(&self) -> SignIn {
        let v = &self.verified;
        SignIn {
            issuer: v.issuer.clone(),
            subject: v.sub.chars().take(MAX_SUB).collect(),
            claims_digest: v.claims_digest.clone(),
            evidence: v.evidence.clone(),
        }
    }

    /// The `federation.signed_in` record, written with the grant or park.
    pub(super) fn entry(&self, who: &Identity, target: &str, scopes: &[String]) -> AuditEntry {
        let v = &self.verified;
        let sub: String = v.sub.chars().take(MAX_SUB).collect();
        let reason = format!(
            "issuer {}; sub {}; jti {}; claims sha256:{}",
            v.issuer,
            crate::text::escape_controls(&sub),
            crate::text::escape_controls(v.jti.as_deref().unwrap_or("-")),
            v.claims_digest
        );
        AuditEntry::ok(
            who.as_str(),
            Action::FederationSignedIn,
            target,
            scopes,
            &reason,
        )
    }
}

/// What to grant at once.
pub(super) struct Grant {
    pub(super) ttl: Duration,
    pub(super) max_ttl: Duration,
    pub(super) rules: Vec<String>,
    /// Break-glass: the requirements a reviewer must see to.
    pub(super) review: Option<Vec<Requirement>>,
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

//! A platform token checked in the order of docs/design-federation.md
//! ("Verification, in order"): shape, issuer, header, algorithm, key and
//! signature, audience, times, bound claims, then the mapping to an
//! identity. Each refusal names the check that failed and never the token.
//!
//! Signatures are checked with ring directly from the JWK's public
//! parameters: no JWT library decides which algorithm a key is used with.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use ring::signature as rsig;
use serde_json::{Map, Value};

use crate::identity::Identity;
use crate::policy::{Issuer, IssuerKind, SingleUse};

/// Largest platform token read (GitHub's are about 1.5 KiB).
pub const MAX_TOKEN: usize = 8 * 1024;
/// Header parameters that would let a token choose its own key, or ask
/// for processing the verifier does not do.
const FORBIDDEN_HEADER: [&str; 6] = ["jku", "x5u", "jwk", "x5c", "crit", "zip"];
/// Longest `jti` kept.
const MAX_JTI: usize = 256;
/// Longest value of a piece of evidence shown to approvers.
const MAX_EVIDENCE: usize = 200;

/// The check a token failed. Checks before the signature, the audience
/// and the bound claims (`unrecorded`) cost their sender nothing, so they
/// reach metrics and the log, never the trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Not three base64url segments of JSON, or larger than 8 KiB.
    Malformed,
    /// No `[[issuer]]` entry for its `iss` (or `sub`'s trust domain).
    Issuer,
    /// A header parameter the verifier refuses, or no `kid`.
    Header,
    /// `alg` is not one the issuer entry allows, or does not fit the key.
    Algorithm,
    /// No key of the issuer has its `kid` (or the issuer has no keys yet).
    Key,
    /// The signature does not verify.
    Signature,
    /// `aud` does not name this broker as the entry says.
    Audience,
    /// Past `exp`.
    Expired,
    /// `nbf` or `iat` in the future.
    NotYetValid,
    /// `exp - iat` longer than the entry's `max_age`, or no `iat`.
    Age,
    /// A bound claim is missing or holds another value.
    BoundClaim(String),
    /// The identity template cannot be filled (a missing claim, or a value
    /// that is not one path segment).
    Mapping,
    /// No usable `jti` where the entry needs one.
    Jti,
    /// The token was used before.
    Replay,
}

impl Check {
    /// The name the trail, the log and metrics use.
    pub fn name(&self) -> String {
        match self {
            Self::Malformed => "malformed".into(),
            Self::Issuer => "issuer".into(),
            Self::Header => "header".into(),
            Self::Algorithm => "algorithm".into(),
            Self::Key => "key".into(),
            Self::Signature => "signature".into(),
            Self::Audience => "audience".into(),
            Self::Expired => "expired".into(),
            Self::NotYetValid => "not yet valid".into(),
            Self::Age => "age".into(),
            Self::BoundClaim(c) => format!("bound claim {c}"),
            Self::Mapping => "mapping".into(),
            Self::Jti => "jti".into(),
            Self::Replay => "replay".into(),
        }
    }

    /// Refused before a signature verified (anyone could have sent it),
    /// or before the token was shown to be for this broker and from a
    /// tenant the policy binds (any tenant of the issuer can mint those
    /// at will): counted and logged, never recorded in the trail.
    pub fn unrecorded(&self) -> bool {
        matches!(
            self,
            Self::Malformed
                | Self::Issuer
                | Self::Header
                | Self::Algorithm
                | Self::Key
                | Self::Signature
                | Self::Audience
                | Self::BoundClaim(_)
        )
    }
}

/// A refusal: the check, and which issuer entry (once one was chosen).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What failed.
    pub check: Check,
    /// The entry's name, when the token got that far.
    pub issuer: Option<String>,
    /// The claims' digest, once the signature verified.
    pub claims_digest: Option<String>,
}

impl Refusal {
    fn new(check: Check, issuer: Option<&Issuer>) -> Self {
        Self {
            check,
            issuer: issuer.map(|i| i.name.clone()),
            claims_digest: None,
        }
    }
}

/// A token that passed every check: who it names, and what the trail and
/// approvers are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The `[[issuer]]` entry's name.
    pub issuer: String,
    /// The mapped identity.
    pub identity: Identity,
    /// `sub`, as the platform wrote it (escaped when shown).
    pub sub: String,
    /// `jti`, when the token has one.
    pub jti: Option<String>,
    /// The token may be used once (`single_use = "jti"`); else its replay
    /// is bounded by its age (Kubernetes hands a pod one token for most of
    /// its life, `jti` or not).
    pub use_once: bool,
    /// Hex SHA-256 of the payload segment exactly as received.
    pub claims_digest: String,
    /// What approvers see of the run or pod (kind-specific claims).
    pub evidence: BTreeMap<String, String>,
}

/// The unverified parts of a token: enough to choose its issuer entry.
pub struct Parsed<'t> {
    signed: &'t str,
    signature: Vec<u8>,
    header: Map<String, Value>,
    claims: Map<String, Value>,
    payload_segment: &'t str,
}

impl<'t> Parsed<'t> {
    /// Split and decode `token` (nothing is trusted yet).
    pub fn new(token: &'t str) -> Result<Self, Refusal> {
        let bad = || Refusal::new(Check::Malformed, None);
        if token.len() > MAX_TOKEN {
            return Err(bad());
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let json = |seg: &str| -> Result<Map<String, Value>, Refusal> {
            let bytes = B64.decode(seg).map_err(|_| bad())?;
            serde_json::from_slice(&bytes).map_err(|_| bad())
        };
        Ok(Self {
            signed: &token[..h.len() + 1 + p.len()],
            signature: B64.decode(s).map_err(|_| bad())?,
            header: json(h)?,
            claims: json(p)?,
            payload_segment: p,
        })
    }

    /// The entry that speaks for this token: the one whose `iss` it names,
    /// else (no entry for its `iss`, or none given) the JWT-SVID entry of
    /// its `sub`'s trust domain.
    pub fn issuer<'i>(
        &self,
        issuers: impl Iterator<Item = &'i Issuer> + Clone,
    ) -> Option<&'i Issuer> {
        let iss = self.claims.get("iss").and_then(Value::as_str);
        if let Some(iss) = iss
            && let Some(i) = issuers.clone().find(|i| i.issuer.as_deref() == Some(iss))
        {
            return Some(i);
        }
        let sub = self.claims.get("sub").and_then(Value::as_str)?;
        let domain = sub.strip_prefix("spiffe://")?.split('/').next()?;
        issuers.into_iter().find(|i| {
            i.kind == IssuerKind::JwtSvid
                && i.issuer.as_deref().is_none_or(|want| iss == Some(want))
                && i.trust_domains.iter().any(|d| d == domain)
        })
    }

    /// The `kid` and `alg` the header names, if the header is acceptable
    /// for `issuer`.
    pub fn header(&self, issuer: &Issuer) -> Result<(String, String), Refusal> {
        if FORBIDDEN_HEADER
            .iter()
            .any(|p| self.header.contains_key(*p))
        {
            return Err(Refusal::new(Check::Header, Some(issuer)));
        }
        let kid = self
            .header
            .get("kid")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty() && k.len() <= 256)
            .ok_or_else(|| Refusal::new(Check::Header, Some(issuer)))?;
        let alg = self
            .header
            .get("alg")
            .and_then(Value::as_str)
            .filter(|a| issuer.algorithms.iter().any(|x| x == a))
            .ok_or_else(|| Refusal::new(Check::Algorithm, Some(issuer)))?;
        Ok((kid.to_owned(), alg.to_owned()))
    }

    /// Every check after the key is known, at `now` (seconds).
    pub fn verify(
        &self,
        issuer: &Issuer,
        alg: &str,
        key: &Jwk,
        now: u64,
    ) -> Result<Verified, Refusal> {
        check_signature(issuer, alg, key, self.signed.as_bytes(), &self.signature)?;
        let digest = hex_sha256(self.payload_segment.as_bytes());
        let refuse = |check: Check| Refusal {
            check,
            issuer: Some(issuer.name.clone()),
            claims_digest: Some(digest.clone()),
        };
        // Audience and bound claims first: until both pass, the token may
        // be any tenant's of the issuer (any repository on GitHub), minted
        // at will, and its refusal is not worth a durable record.
        audience(issuer, &self.claims).map_err(refuse)?;
        bound(issuer, &self.claims).map_err(refuse)?;
        times(issuer, &self.claims, now).map_err(refuse)?;
        let identity = mapped(issuer, &self.claims).ok_or_else(|| refuse(Check::Mapping))?;
        let jti = match (
            self.claims.get("jti").and_then(Value::as_str),
            issuer.single_use,
        ) {
            (Some(j), _) if !j.is_empty() && j.len() <= MAX_JTI => Some(j.to_owned()),
            (_, SingleUse::Jti) => return Err(refuse(Check::Jti)),
            (_, SingleUse::Bounded) => None,
        };
        Ok(Verified {
            issuer: issuer.name.clone(),
            identity,
            sub: claim_text(&self.claims, "sub").unwrap_or_default(),
            jti,
            use_once: issuer.single_use == SingleUse::Jti,
            evidence: evidence(issuer.kind, &self.claims),
            claims_digest: digest,
        })
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The signature over `signed`, with `key` used only for `alg`: its type
/// and curve must fit, and a key that says its algorithm or use must say
/// this one.
fn check_signature(
    issuer: &Issuer,
    alg: &str,
    key: &Jwk,
    signed: &[u8],
    signature: &[u8],
) -> Result<(), Refusal> {
    let refuse = |c: Check| Refusal::new(c, Some(issuer));
    if let Some(a) = &key.common.key_algorithm
        && a.to_string() != alg
    {
        return Err(refuse(Check::Algorithm));
    }
    let use_ok = match (&key.common.public_key_use, issuer.kind) {
        (Some(PublicKeyUse::Other(u)), IssuerKind::JwtSvid) => u == "jwt-svid",
        (_, IssuerKind::JwtSvid) => false,
        (Some(PublicKeyUse::Signature) | None, _) => true,
        _ => false,
    };
    if !use_ok {
        return Err(refuse(Check::Key));
    }
    match verified_by(key, alg, signed, signature) {
        Ok(true) => Ok(()),
        Ok(false) => Err(refuse(Check::Signature)),
        Err(c) => Err(refuse(c)),
    }
}

/// Whether `key`, used for `alg`, verifies `signature` over `signed`; the
/// check that fails when the key does not fit the algorithm or does not
/// decode.
fn verified_by(key: &Jwk, alg: &str, signed: &[u8], signature: &[u8]) -> Result<bool, Check> {
    let b = |s: &str| B64.decode(s).map_err(|_| Check::Key);
    Ok(match (&key.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), "ES256" | "ES384") => {
            let (curve, verifier): (_, &dyn rsig::VerificationAlgorithm) = match alg {
                "ES256" => (EllipticCurve::P256, &rsig::ECDSA_P256_SHA256_FIXED),
                _ => (EllipticCurve::P384, &rsig::ECDSA_P384_SHA384_FIXED),
            };
            if p.curve != curve {
                return Err(Check::Algorithm);
            }
            let mut point = vec![4u8];
            point.extend(b(&p.x)?);
            point.extend(b(&p.y)?);
            rsig::UnparsedPublicKey::new(verifier, point)
                .verify(signed, signature)
                .is_ok()
        }
        (AlgorithmParameters::RSA(p), _) => {
            let verifier: &rsig::RsaParameters = match alg {
                "RS256" => &rsig::RSA_PKCS1_2048_8192_SHA256,
                "RS384" => &rsig::RSA_PKCS1_2048_8192_SHA384,
                "RS512" => &rsig::RSA_PKCS1_2048_8192_SHA512,
                "PS256" => &rsig::RSA_PSS_2048_8192_SHA256,
                "PS384" => &rsig::RSA_PSS_2048_8192_SHA384,
                "PS512" => &rsig::RSA_PSS_2048_8192_SHA512,
                _ => return Err(Check::Algorithm),
            };
            let (n, e) = (b(&p.n)?, b(&p.e)?);
            rsig::RsaPublicKeyComponents { n: &n, e: &e }
                .verify(verifier, signed, signature)
                .is_ok()
        }
        (AlgorithmParameters::OctetKeyPair(p), "EdDSA") if p.curve == EllipticCurve::Ed25519 => {
            rsig::UnparsedPublicKey::new(&rsig::ED25519, b(&p.x)?)
                .verify(signed, signature)
                .is_ok()
        }
        _ => return Err(Check::Algorithm),
    })
}

/// `aud` is the entry's audience, or an array holding it whose other
/// members are allowed only when `azp` names that audience (OpenID
/// Connect Core §3.1.3.7).
fn audience(issuer: &Issuer, claims: &Map<String, Value>) -> Result<(), Check> {
    let want = issuer.audience.as_str();
    let ok = match claims.get("aud") {
        Some(Value::String(a)) => a == want,
        Some(Value::Array(list)) => {
            let has = list.iter().any(|a| a.as_str() == Some(want));
            let azp = claims.get("azp").and_then(Value::as_str);
            has && (list.len() == 1 || azp == Some(want))
        }
        _ => false,
    };
    if ok { Ok(()) } else { Err(Check::Audience) }
}

fn seconds(claims: &Map<String, Value>, name: &str) -> Option<u64> {
    claims.get(name).and_then(Value::as_u64)
}

/// `exp`, `nbf` and `iat` within leeway of `now`, and `exp - iat` within
/// `max_age`.
fn times(issuer: &Issuer, claims: &Map<String, Value>, now: u64) -> Result<(), Check> {
    let leeway = issuer.leeway.as_secs();
    let exp = seconds(claims, "exp").ok_or(Check::Expired)?;
    if now >= exp.saturating_add(leeway) {
        return Err(Check::Expired);
    }
    let iat = seconds(claims, "iat").ok_or(Check::Age)?;
    if iat > now.saturating_add(leeway) {
        return Err(Check::NotYetValid);
    }
    if claims.contains_key("nbf") {
        let nbf = seconds(claims, "nbf").ok_or(Check::NotYetValid)?;
        if nbf > now.saturating_add(leeway) {
            return Err(Check::NotYetValid);
        }
    }
    if exp.saturating_sub(iat) > issuer.max_age.as_secs() || exp < iat {
        return Err(Check::Age);
    }
    Ok(())
}

/// A claim by its canonical name (a top-level name or a JSON pointer).
fn claim<'c>(claims: &'c Map<String, Value>, name: &str) -> Option<&'c Value> {
    if let Some(pointer) = name.strip_prefix('/') {
        let mut v = claims;
        let mut steps = pointer.split('/').peekable();
        while let Some(step) = steps.next() {
            let step = step.replace("~1", "/").replace("~0", "~");
            let next = v.get(&step)?;
            if steps.peek().is_none() {
                return Some(next);
            }
            v = next.as_object()?;
        }
        None
    } else {
        claims.get(name)
    }
}

/// A claim's value as text: a string, or a whole number (some issuers
/// write ids as numbers).
fn claim_text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claim(claims, name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Every bound claim holds its value exactly; a GitHub run of
/// `pull_request_target` (the base repository's context, the pull
/// request's code) only where `require` names that event.
fn bound(issuer: &Issuer, claims: &Map<String, Value>) -> Result<(), Check> {
    for (name, any_of) in &issuer.require {
        let ok = claim_text(claims, name).is_some_and(|v| any_of.contains(&v));
        if !ok {
            return Err(Check::BoundClaim(name.clone()));
        }
    }
    if issuer.kind == IssuerKind::Github
        && claims.get("event_name").and_then(Value::as_str) == Some("pull_request_target")
        && !issuer.require.contains_key("event_name")
    {
        return Err(Check::BoundClaim("event_name".into()));
    }
    Ok(())
}

/// A filled path segment: letters, digits, `.`, `-`, `_` (SPIFFE's
/// characters); anything else is refused, never escaped.
fn segment_ok(v: &str) -> bool {
    !v.is_empty()
        && v != "."
        && v != ".."
        && v.len() <= 255
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The identity the entry's template names for these claims (`sub` itself
/// for a JWT-SVID), in one of the entry's trust domains.
fn mapped(issuer: &Issuer, claims: &Map<String, Value>) -> Option<Identity> {
    let text = match &issuer.identity {
        None => claims.get("sub")?.as_str()?.to_owned(),
        Some(t) => fill(t, claims)?,
    };
    let id = Identity::parse(&text).ok()?;
    let domain = id.as_str().strip_prefix("spiffe://")?.split('/').next()?;
    issuer
        .trust_domains
        .iter()
        .any(|d| d == domain)
        .then_some(id)
}

/// Template `t` (checked by `policy check`) with each `{claim}` segment
/// replaced by that claim's value.
fn fill(t: &str, claims: &Map<String, Value>) -> Option<String> {
    let (names, domain) = crate::policy::identity_template(t).ok()?;
    let path = t.strip_prefix("spiffe://")?.strip_prefix(domain.as_str())?;
    let mut names = names.into_iter();
    let mut out = format!("spiffe://{domain}");
    for segment in crate::policy::template_segments(path.trim_start_matches('/')).ok()? {
        out.push('/');
        if segment.starts_with('{') {
            let v = claim_text(claims, &names.next()?)?;
            if !segment_ok(&v) {
                return None;
            }
            out.push_str(&v);
        } else {
            out.push_str(segment);
        }
    }
    Some(out)
}

/// What approvers are shown of the run or pod, by kind; values with
/// characters outside printable ASCII are left out, long ones cut.
fn evidence(kind: IssuerKind, claims: &Map<String, Value>) -> BTreeMap<String, String> {
    let names: &[&str] = match kind {
        IssuerKind::Github => &[
            "repository",
            "run_id",
            "run_attempt",
            "sha",
            "ref",
            "actor",
            "event_name",
            "workflow_ref",
            "environment",
        ],
        IssuerKind::Kubernetes => &[
            "/kubernetes.io/pod/name",
            "/kubernetes.io/pod/uid",
            "/kubernetes.io/node/name",
        ],
        IssuerKind::JwtSvid => &["sub"],
        // Other CI systems (GitLab, Buildkite, a GitHub Enterprise proxy)
        // name their runs with claims like these.
        IssuerKind::Generic => &[
            "sub",
            "repository",
            "project_path",
            "ref",
            "sha",
            "run_id",
            "pipeline_id",
            "job_id",
            "actor",
            "user_login",
            "event_name",
            "environment",
        ],
    };
    names
        .iter()
        .filter_map(|n| {
            let v = claim_text(claims, n)?;
            let printable = v.bytes().all(|b| (0x20..0x7f).contains(&b));
            printable.then(|| {
                let cut: String = v.chars().take(MAX_EVIDENCE).collect();
                (n.trim_start_matches('/').to_owned(), cut)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;

//! `token` mints and verifies the access tokens: compact JWS, RFC 9068
//! profile (`typ: at+jwt`), signed by the key ring's active key.

use jsonwebtoken::{Header, Validation};
use serde::{Deserialize, Serialize};

use crate::keys::KeySet;

/// Longest token introspection will look at.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Claims of a portcullis access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer URL (matches the OIDC discovery document).
    pub iss: String,
    /// The identity the token is for.
    pub sub: String,
    /// Audience.
    pub aud: String,
    /// The authenticated client that asked.
    pub client_id: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before (Unix seconds).
    pub nbf: u64,
    /// Expires (Unix seconds).
    pub exp: u64,
    /// Token id: the lease id.
    pub jti: String,
    /// Approvers, for approval-tier grants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_by: Vec<String>,
    /// Set on break-glass grants.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    /// Who acts for `sub` on a delegated token (RFC 8693 §4.1): the current
    /// actor outermost, each earlier one nested in its `act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// RFC 8705 confirmation: the client certificate the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// RFC 8705 §3.1 `cnf` claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// Base64url SHA-256 of the DER certificate.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// One link of an `act` chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The acting identity.
    pub sub: String,
    /// Who acted before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The chain for `actors`, nearest first (`None` when empty).
    pub fn chain(actors: &[String]) -> Option<Self> {
        let (first, rest) = actors.split_first()?;
        Some(Self {
            sub: first.clone(),
            act: Self::chain(rest).map(Box::new),
        })
    }

    /// The chain as a list, nearest first (the inverse of [`Actor::chain`]).
    pub fn flatten(self) -> Vec<String> {
        let mut out = vec![self.sub];
        let mut next = self.act;
        while let Some(a) = next {
            out.push(a.sub);
            next = a.act;
        }
        out
    }
}

/// Why a token could not be minted or is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Signing failed (key problem).
    #[error("signing failed: {0}")]
    Sign(String),
    /// The token is not one this broker would accept (detail for logs only).
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

/// Sign `claims` with the active key.
pub fn mint(keys: &KeySet, claims: &Claims) -> Result<String, TokenError> {
    let mut header = Header::new(keys.active.alg);
    header.kid = Some(keys.active.kid.clone());
    header.typ = Some("at+jwt".into());
    jsonwebtoken::encode(&header, claims, &keys.active.encoding)
        .map_err(|e| TokenError::Sign(e.to_string()))
}

/// Part `index` of a compact JWS (0 header, 1 payload), decoded as JSON,
/// unchecked.
fn part<T: serde::de::DeserializeOwned>(token: &str, index: usize) -> Option<T> {
    use base64::Engine as _;
    let b64 = token.split('.').nth(index)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Does the token's protected header carry a `crit` member?
fn has_crit(token: &str) -> bool {
    part::<serde_json::Map<String, serde_json::Value>>(token, 0)
        .is_some_and(|h| h.contains_key("crit"))
}

/// The token's header and the published key its `kid` names, if that key
/// is still trusted and its algorithm is the header's.
fn trusted_key<'k>(
    keys: &'k KeySet,
    token: &str,
) -> Result<
    (
        Header,
        &'k (jsonwebtoken::Algorithm, jsonwebtoken::DecodingKey),
    ),
    TokenError,
> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid("header"))?;
    let kid = header.kid.as_deref().ok_or(TokenError::Invalid("no kid"))?;
    let key = keys
        .verify
        .get(kid)
        .ok_or(TokenError::Invalid("unknown kid"))?;
    if header.alg != key.0 {
        return Err(TokenError::Invalid("alg does not match the key"));
    }
    Ok((header, key))
}

/// Verify signature, `kid`, `alg`, `typ`, `iss`, the absence of `crit` and
/// the time claims at `now` (Unix seconds). Lease state is the caller's
/// business.
pub fn verify(keys: &KeySet, issuer: &str, token: &str, now: u64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Invalid("too long"));
    }
    if has_crit(token) {
        // RFC 7515 §4.1.11: we understand no extension, so any `crit` fails.
        return Err(TokenError::Invalid("crit"));
    }
    let (header, (alg, key)) = trusted_key(keys, token)?;
    if header.typ.as_deref() != Some("at+jwt") {
        return Err(TokenError::Invalid("typ"));
    }
    let mut v = Validation::new(*alg);
    // Time is checked below against the broker's clock, not the system's.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.leeway = 0;
    v.set_issuer(&[issuer]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, key, &v)
        .map_err(|_| TokenError::Invalid("signature or claims"))?;
    check_time(data.claims, now)
}

fn check_time(c: Claims, now: u64) -> Result<Claims, TokenError> {
    if c.nbf > now || c.iat > now {
        return Err(TokenError::Invalid("not yet valid"));
    }
    if c.exp <= now {
        return Err(TokenError::Invalid("expired"));
    }
    Ok(c)
}

/// The MAC a lease keeps over the newest token minted for it: HMAC-SHA256
/// under a key derived from the KEK ([`crate::keys::Kek::token_mac_key`]).
/// The token itself is never stored.
pub fn mac(keys: &KeySet, token: &str) -> [u8; 32] {
    let tag = ring::hmac::sign(&keys.token_mac, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The claims a token says it has, unchecked: only to find its lease (the
/// `jti`) before deciding how to check it. Never trust what this returns.
pub fn unverified_claims(token: &str) -> Option<Claims> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    part(token, 1)
}

/// Proof that a token's bytes are exactly those of a token this broker
/// signed: only [`minted_as`] makes one, and [`recognise`] needs one.
#[derive(Debug)]
pub struct Minted<'a>(&'a str);

/// `token` as [`Minted`] if its MAC is the one a lease recorded when it
/// was signed (checked in constant time by `ring::hmac::verify`).
pub fn minted_as<'a>(keys: &KeySet, token: &'a str, recorded: &[u8; 32]) -> Option<Minted<'a>> {
    ring::hmac::verify(&keys.token_mac, token.as_bytes(), recorded)
        .ok()
        .map(|()| Minted(token))
}

/// The claims of a token [`minted_as`] recognised as one this broker
/// signed: its bytes are exactly what was signed, so the signature need not
/// be checked again. What can have changed since is checked: its key must
/// still be trusted (a key withdrawn in an emergency voids what it signed),
/// the issuer must still be this broker's, and time must be within its life.
pub fn recognise(
    keys: &KeySet,
    issuer: &str,
    minted: &Minted<'_>,
    now: u64,
) -> Result<Claims, TokenError> {
    let token = minted.0;
    trusted_key(keys, token)?;
    let c = unverified_claims(token).ok_or(TokenError::Invalid("claims"))?;
    if c.iss != issuer {
        return Err(TokenError::Invalid("issuer"));
    }
    check_time(c, now)
}

//! OpenID Connect sign-in for the console: authorization code flow with
//! PKCE (RFC 7636, S256) and a `nonce`, a confidential client
//! (`client_secret_basic`), ID tokens verified against the provider's JWKS
//! (RS256, ES256 or EdDSA) for `iss`, `aud`, `exp`, `nonce` and `azp`. The
//! configured claim (default `email`, which must then be verified) names the
//! person: `oidc:<value>`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::RwLock;

use crate::identity::Identity;

/// Per-call timeout towards the provider.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest provider answer read.
const MAX_BODY: usize = 1 << 20;
/// JWKS are fetched again for an unknown `kid`, at most this often.
const JWKS_REFRESH: Duration = Duration::from_secs(60);

/// How the console reaches the organisation's provider (its `Debug`
/// leaves the client secret out).
#[derive(Clone)]
pub struct OidcConfig {
    /// The provider's issuer URL (`https://`, or `http://` on loopback).
    pub issuer: String,
    /// This console's client id at the provider.
    pub client_id: String,
    /// Its client secret (a secret: never logged).
    pub client_secret: String,
    /// The ID-token claim that names the person (`email`, `sub`, …).
    pub claim: String,
    /// Shown on the sign-in button.
    pub display_name: String,
}

impl std::fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("claim", &self.claim)
            .field("display_name", &self.display_name)
            .finish()
    }
}

/// HTTPS, or plain HTTP only to a loopback host.
fn safe_url(url: &str) -> bool {
    url.starts_with("https://") || super::loopback_http(url)
}

impl OidcConfig {
    /// Check the issuer URL: HTTPS, or plain HTTP only to a loopback host.
    pub fn check(&self) -> Result<(), String> {
        if !safe_url(&self.issuer) {
            return Err(format!(
                "--oidc-issuer `{}` must be https:// (http:// only on loopback)",
                self.issuer
            ));
        }
        if self.client_id.is_empty() || self.client_secret.is_empty() || self.claim.is_empty() {
            return Err(
                "--oidc-client-id, the client secret and --oidc-claim must not be empty".into(),
            );
        }
        Ok(())
    }
}

/// The provider's discovery document (the fields used).
#[derive(Clone, Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    userinfo_endpoint: Option<String>,
}

struct Known {
    discovery: Discovery,
    jwks: JwkSet,
    jwks_at: tokio::time::Instant,
}

/// Why a sign-in failed (shown to the person; never holds a secret).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider could not be reached or answered badly.
    #[error("the identity provider could not be reached: {0}")]
    Provider(String),
    /// The ID token did not verify.
    #[error("the identity provider's answer did not verify: {0}")]
    Token(String),
    /// The token verified but names nobody usable.
    #[error("{0}")]
    Person(String),
}

/// An OpenID client.
pub struct Oidc {
    config: OidcConfig,
    redirect_uri: String,
    known: RwLock<Option<Known>>,
    client: crate::notify::HttpsClient,
}

/// The ID token claims checked here (the rest by `jsonwebtoken`).
#[derive(Deserialize)]
struct IdClaims {
    nonce: Option<String>,
    azp: Option<String>,
    email_verified: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// PKCE S256 challenge of `verifier`.
pub fn challenge(verifier: &str) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref())
}

impl Oidc {
    /// A client for `config`, calling back to `redirect_uri`.
    pub fn new(config: OidcConfig, redirect_uri: String) -> Result<Arc<Self>, String> {
        config.check()?;
        Ok(Arc::new(Self {
            config,
            redirect_uri,
            known: RwLock::new(None),
            client: crate::notify::https_client()?,
        }))
    }

    /// What the sign-in button says.
    pub fn display_name(&self) -> &str {
        &self.config.display_name
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let req = hyper::Request::get(url)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        self.call(req).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<T, OidcError> {
        let p = |e: &dyn std::fmt::Display| OidcError::Provider(e.to_string());
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| OidcError::Provider("timed out".into()))?
            .map_err(|e| p(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| p(&e))?
            .to_bytes();
        if !status.is_success() {
            // The provider's error code, never the whole body.
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .unwrap_or_default();
            return Err(OidcError::Provider(format!("HTTP {status} {code}")));
        }
        serde_json::from_slice(&body).map_err(|e| p(&e))
    }

    /// Discovery and keys, fetched on first use (and the keys again when
    /// `refresh_for` names a `kid` they lack, at most once a minute).
    async fn known(&self, refresh_for: Option<&str>) -> Result<(Discovery, JwkSet), OidcError> {
        if let Some(k) = self.known.read().await.as_ref() {
            let has = refresh_for.is_none_or(|kid| k.jwks.find(kid).is_some());
            if has || k.jwks_at.elapsed() < JWKS_REFRESH {
                return Ok((k.discovery.clone(), k.jwks.clone()));
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = self.get_json(&url).await?;
        for (name, u) in [
            (
                "authorization_endpoint",
                Some(&discovery.authorization_endpoint),
            ),
            ("token_endpoint", Some(&discovery.token_endpoint)),
            ("jwks_uri", Some(&discovery.jwks_uri)),
            ("userinfo_endpoint", discovery.userinfo_endpoint.as_ref()),
        ] {
            // The client secret and access tokens never travel in the clear.
            if let Some(u) = u.filter(|u| !safe_url(u)) {
                return Err(OidcError::Provider(format!(
                    "discovery's {name} `{u}` is not https:// (or http:// on loopback)"
                )));
            }
        }
        if discovery.issuer != self.config.issuer {
            return Err(OidcError::Provider(format!(
                "discovery names issuer `{}`, not the configured `{}`",
                discovery.issuer, self.config.issuer
            )));
        }
        let jwks: JwkSet = self.get_json(&discovery.jwks_uri).await?;
        *self.known.write().await = Some(Known {
            discovery: discovery.clone(),
            jwks: jwks.clone(),
            jwks_at: tokio::time::Instant::now(),
        });
        Ok((discovery, jwks))
    }

    /// Where to send the browser to sign in.
    pub async fn authorize_url(
        &self,
        state: &str,
        nonce: &str,
        verifier: &str,
    ) -> Result<String, OidcError> {
        let (d, _) = self.known(None).await?;
        let query = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", self.config.client_id.as_str()),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("scope", "openid email profile"),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", challenge(verifier).as_str()),
            ("code_challenge_method", "S256"),
        ])
        .map_err(|e| OidcError::Provider(e.to_string()))?;
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!("{}{sep}{query}", d.authorization_endpoint))
    }

    /// Redeem `code` and verify the ID token: the person it names.
    pub async fn redeem(
        &self,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<Identity, OidcError> {
        #[derive(Deserialize)]
        struct TokenResponse {
            id_token: String,
            #[serde(default)]
            access_token: String,
        }
        let (d, _) = self.known(None).await?;
        let form = serde_urlencoded::to_string([
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", verifier),
        ])
        .map_err(|e| OidcError::Provider(e.to_string()))?;
        // RFC 6749 §2.3.1: id and secret form-encoded, then Basic.
        let enc = |s: &str| {
            serde_urlencoded::to_string([("", s)])
                .map(|x| x.trim_start_matches('=').to_owned())
                .unwrap_or_default()
        };
        let basic = STANDARD.encode(format!(
            "{}:{}",
            enc(&self.config.client_id),
            enc(&self.config.client_secret)
        ));
        let req = hyper::Request::post(&d.token_endpoint)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::AUTHORIZATION, format!("Basic {basic}"))
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        let t: TokenResponse = self.call(req).await?;
        let claims = self.verified(&t.id_token, nonce).await?;
        // A provider that conforms to OIDC Core §5.4 may keep scope claims
        // (`email`) out of the ID token and answer them at `userinfo`.
        let claims = if claims.rest.contains_key(&self.config.claim) {
            claims
        } else {
            self.userinfo(&d, &t.access_token, &claims).await?
        };
        self.person(&claims)
    }

    /// The `userinfo` claims for `access_token`, for the same subject as
    /// the ID token (OIDC Core §5.3.2).
    async fn userinfo(
        &self,
        d: &Discovery,
        access_token: &str,
        id: &IdClaims,
    ) -> Result<IdClaims, OidcError> {
        let (Some(url), false) = (&d.userinfo_endpoint, access_token.is_empty()) else {
            let claim = &self.config.claim;
            return Err(OidcError::Person(format!(
                "the ID token has no `{claim}` claim and the provider offers no userinfo"
            )));
        };
        let req = hyper::Request::get(url)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {access_token}"),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        let info: IdClaims = self.call(req).await?;
        if info.rest.get("sub") != id.rest.get("sub") {
            return Err(OidcError::Token(
                "userinfo names another subject than the ID token".into(),
            ));
        }
        Ok(info)
    }

    /// Verify `id_token` (signature, `iss`, `aud`, `exp`, `nonce`, `azp`).
    async fn verified(&self, id_token: &str, nonce: &str) -> Result<IdClaims, OidcError> {
        let bad = |s: &str| OidcError::Token(s.to_owned());
        let header = jsonwebtoken::decode_header(id_token).map_err(|_| bad("not a JWT"))?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
        ) {
            return Err(bad("signed with an algorithm the console does not accept"));
        }
        let kid = header.kid.as_deref().unwrap_or_default();
        let (_, jwks) = self.known(Some(kid)).await?;
        let jwk = if kid.is_empty() {
            match jwks.keys.as_slice() {
                [one] => one,
                _ => return Err(bad("no `kid` and not exactly one key")),
            }
        } else {
            jwks.find(kid)
                .ok_or_else(|| bad("signed by an unknown key"))?
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|_| bad("the provider's key is unusable"))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.client_id]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 60;
        let claims = jsonwebtoken::decode::<IdClaims>(id_token, &key, &v)
            .map_err(|e| OidcError::Token(e.to_string()))?
            .claims;
        if !claims
            .nonce
            .as_deref()
            .is_some_and(|n| super::session::same_secret(n, nonce))
        {
            return Err(bad("nonce does not match this sign-in"));
        }
        issued_to_us(
            claims.rest.get("aud"),
            claims.azp.as_deref(),
            &self.config.client_id,
        )
        .map_err(bad)?;
        Ok(claims)
    }

    /// The person the verified claims name.
    fn person(&self, claims: &IdClaims) -> Result<Identity, OidcError> {
        let claim = self.config.claim.as_str();
        let value = claims
            .rest
            .get(claim)
            .and_then(|v| v.as_str())
            .ok_or_else(|| OidcError::Person(format!("the ID token has no `{claim}` claim")))?;
        if claim == "email" && claims.email_verified != Some(serde_json::Value::Bool(true)) {
            return Err(OidcError::Person(
                "the provider has not verified this email address".into(),
            ));
        }
        Identity::person(value).map_err(|e| OidcError::Person(e.to_string()))
    }
}

/// OpenID Connect Core §3.1.3.7, points 3–5: `aud` names this client (the
/// JWT library checked that), an ID token for several audiences must name
/// its authorized party (`azp`), and an `azp` must be this client.
fn issued_to_us(
    aud: Option<&serde_json::Value>,
    azp: Option<&str>,
    client_id: &str,
) -> Result<(), &'static str> {
    let several = aud
        .and_then(serde_json::Value::as_array)
        .is_some_and(|a| a.len() > 1);
    match azp {
        Some(a) if a != client_id => Err("issued to another client (azp)"),
        None if several => Err("issued for several audiences without naming this client (azp)"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21, finding 5.
    #[test]
    fn several_audiences_need_an_azp_naming_this_client() {
        let (one, two) = (serde_json::json!("c"), serde_json::json!(["c", "other"]));
        assert!(issued_to_us(Some(&one), None, "c").is_ok());
        assert!(issued_to_us(Some(&serde_json::json!(["c"])), None, "c").is_ok());
        assert!(issued_to_us(Some(&two), Some("c"), "c").is_ok());
        assert!(issued_to_us(Some(&two), None, "c").is_err());
        assert!(issued_to_us(Some(&two), Some("other"), "c").is_err());
        assert!(issued_to_us(Some(&one), Some("other"), "c").is_err());
    }

    fn config(issuer: &str) -> OidcConfig {
        OidcConfig {
            issuer: issuer.into(),
            client_id: "c".into(),
            client_secret: "s".into(),
            claim: "email".into(),
            display_name: "SSO".into(),
        }
    }

    #[test]
    fn an_issuer_is_https_or_loopback() {
        assert!(config("https://id.example.org").check().is_ok());
        assert!(config("http://127.0.0.1:9000").check().is_ok());
        assert!(config("http://localhost/realms/x").check().is_ok());
        assert!(config("http://id.example.org").check().is_err());
        assert!(config("http://127.0.0.1.evil.org").check().is_err());
        assert!(config("http://localhost.evil.org").check().is_err());
    }

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}

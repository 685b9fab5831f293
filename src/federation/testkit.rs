// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
//! Keys and tokens made in the tests: an ES256 key pair signed with ring
//! directly, and an issuer entry shaped like GitHub's.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

use crate::policy::{Issuer, IssuerKind, KeySource, SingleUse};

pub(crate) struct TestKey {
    pub(crate) kid: String,
    pair: EcdsaKeyPair,
}

impl TestKey {
    pub(crate) fn new(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            kid: kid.to_owned(),
            pair,
        }
    }

    pub(crate) fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
               "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])})
    }

    pub(crate) fn sign(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signed.as_bytes())
            .unwrap();
        format!("{signed}.{}", B64.encode(sig.as_ref()))
    }

    pub(crate) fn token(&self, claims: &Value) -> String {
        self.sign(
            &json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }
}

pub(crate) const GITHUB: &str = "https://token.actions.githubusercontent.com";

pub(crate) fn github_issuer(jwks: &Value) -> Issuer {
    Issuer {
        name: "github".into(),
        kind: IssuerKind::Github,
        issuer: Some(GITHUB.into()),
        keys: KeySource::Inline(jwks.to_string()),
        ca_file: None,
        audience: "https://broker.example.org".into(),
        algorithms: vec!["ES256".into(), "RS256".into()],
        max_age: Duration::from_secs(3600),
        leeway: Duration::from_secs(30),
        require: BTreeMap::from([("repository_owner_id".into(), vec!["1001".into()])]),
        identity: Some(
            "spiffe://github.example.org/{repository_owner_id}/{repository_id}/env/{environment}"
                .into(),
        ),
        trust_domains: vec!["github.example.org".into()],
        single_use: SingleUse::Jti,
        line: 1,
    }
}

/// Claims as GitHub Actions writes them for a job in environment `prod`.
pub(crate) fn github_claims(now: u64) -> Value {
    json!({
        "iss": GITHUB,
        "aud": "https://broker.example.org",
        "sub": "repo:acme/deploy:environment:prod",
        "jti": format!("jti-{now}-{}", crate::text::new_id("x", now).unwrap()),
        "iat": now - 10, "nbf": now - 10, "exp": now + 290,
        "repository": "acme/deploy", "repository_id": "4242",
        "repository_owner": "acme", "repository_owner_id": "1001",
        "environment": "prod", "run_id": "7", "run_attempt": "1",
        "sha": "0123abcd", "ref": "refs/heads/main", "actor": "octo",
        "event_name": "push",
        "workflow_ref": "acme/deploy/.github/workflows/deploy.yml@refs/heads/main"
    })
}

// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
use serde_json::{Value, json};

use super::*;
use crate::federation::testkit::{GITHUB, TestKey, github_claims, github_issuer};

const NOW: u64 = 1_800_000_000;

fn check(issuer: &Issuer, key: &TestKey, token: &str) -> Result<Verified, Refusal> {
    let p = Parsed::new(token)?;
    let i = p
        .issuer(std::iter::once(issuer))
        .ok_or(Refusal::new(Check::Issuer, None))?;
    let (kid, alg) = p.header(i)?;
    let jwk: Jwk = serde_json::from_value(key.jwk()).unwrap();
    assert_eq!(kid, key.kid);
    p.verify(i, &alg, &jwk, NOW)
}

fn failed(issuer: &Issuer, key: &TestKey, token: &str) -> Check {
    check(issuer, key, token).unwrap_err().check
}

fn with(mut claims: Value, name: &str, v: Value) -> Value {
    claims[name] = v;
    claims
}

#[test]
fn a_github_token_maps_to_its_ids_and_environment() {
    let key = TestKey::new("k1");
    let issuer = github_issuer(&json!({"keys": [key.jwk()]}));
    let v = check(&issuer, &key, &key.token(&github_claims(NOW))).unwrap();
    assert_eq!(
        v.identity.as_str(),
        "spiffe://github.example.org/1001/4242/env/prod"
    );
    assert_eq!(v.issuer, "github");
    assert!(v.jti.is_some());
    assert_eq!(v.evidence["repository"], "acme/deploy");
    assert_eq!(v.evidence["run_id"], "7");
    assert_eq!(v.claims_digest.len(), 64);
}

#[test]
fn a_renamed_repository_keeps_its_identity_and_a_new_one_with_the_old_name_does_not_take_it() {
    let key = TestKey::new("k1");
    let issuer = github_issuer(&json!({"keys": [key.jwk()]}));
    let renamed = with(github_claims(NOW), "repository", json!("acme/shipit"));
    let squatter = with(github_claims(NOW), "repository_id", json!("9999"));
    let a = check(&issuer, &key, &key.token(&renamed)).unwrap();
    let b = check(&issuer, &key, &key.token(&squatter)).unwrap();
    assert_eq!(
        a.identity.as_str(),
        "spiffe://github.example.org/1001/4242/env/prod"
    );
    assert_eq!(
        b.identity.as_str(),
        "spiffe://github.example.org/1001/9999/env/prod"
    );
}

#[test]
fn each_check_refuses_by_name() {
    let key = TestKey::new("k1");
    let issuer = github_issuer(&json!({"keys": [key.jwk()]}));
    let c = github_claims(NOW);
    let cases: Vec<(Value, Check)> = vec![
        (
            with(c.clone(), "aud", json!("https://other.example")),
            Check::Audience,
        ),
        (
            with(c.clone(), "aud", json!(["https://broker.example.org", "x"])),
            Check::Audience,
        ),
        (with(c.clone(), "exp", json!(NOW - 31)), Check::Expired),
        (with(c.clone(), "iat", json!(NOW + 120)), Check::NotYetValid),
        (with(c.clone(), "nbf", json!(NOW + 120)), Check::NotYetValid),
        (
            with(
                with(c.clone(), "iat", json!(NOW - 7200)),
                "nbf",
                json!(NOW - 7200),
            ),
            Check::Age,
        ),
        (
            with(c.clone(), "repository_owner_id", json!("1002")),
            Check::BoundClaim("repository_owner_id".into()),
        ),
        (
            with(c.clone(), "event_name", json!("pull_request_target")),
            Check::BoundClaim("event_name".into()),
        ),
        (
            with(c.clone(), "environment", json!("prod/../x")),
            Check::Mapping,
        ),
        (with(c.clone(), "environment", json!("")), Check::Mapping),
        (with(c.clone(), "jti", json!("")), Check::Jti),
    ];
    for (claims, want) in cases {
        let got = check(&issuer, &key, &key.token(&claims)).unwrap_err();
        assert_eq!(got.check, want, "{claims}");
        assert_eq!(
            got.check.unrecorded(),
            matches!(got.check, Check::Audience | Check::BoundClaim(_))
        );
        assert!(got.claims_digest.is_some());
    }
    let mut no_iat = c.clone();
    no_iat.as_object_mut().unwrap().remove("iat");
    assert_eq!(failed(&issuer, &key, &key.token(&no_iat)), Check::Age);
    // Several audiences are fine when `azp` names this broker.
    let azp = with(
        with(c.clone(), "aud", json!(["https://broker.example.org", "x"])),
        "azp",
        json!("https://broker.example.org"),
    );
    check(&issuer, &key, &key.token(&azp)).unwrap();
}

#[test]
fn unsigned_shared_secret_and_self_keyed_tokens_are_refused_before_their_claims() {
    let key = TestKey::new("k1");
    let issuer = github_issuer(&json!({"keys": [key.jwk()]}));
    let claims = github_claims(NOW);
    let body = |h: Value| {
        let t = key.sign(&h, &claims);
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[2] = "";
        parts.join(".")
    };
    assert_eq!(
        failed(&issuer, &key, &body(json!({"alg": "none", "kid": "k1"}))),
        Check::Algorithm
    );
    assert_eq!(
        failed(
            &issuer,
            &key,
            &key.sign(&json!({"alg": "HS256", "kid": "k1"}), &claims)
        ),
        Check::Algorithm
    );
    assert_eq!(
        failed(
            &issuer,
            &key,
            &key.sign(&json!({"alg": "RS256", "kid": "k1"}), &claims)
        ),
        Check::Algorithm
    );
    for p in ["jku", "x5u", "jwk", "x5c", "crit", "zip"] {
        let h = json!({"alg": "ES256", "kid": "k1", p: "x"});
        assert_eq!(
            failed(&issuer, &key, &key.sign(&h, &claims)),
            Check::Header,
            "{p}"
        );
    }
    assert_eq!(
        failed(&issuer, &key, &key.sign(&json!({"alg": "ES256"}), &claims)),
        Check::Header
    );
    // Another key's signature.
    let other = TestKey::new("k1");
    assert_eq!(
        failed(&issuer, &key, &other.token(&claims)),
        Check::Signature
    );
    // Shape.
    for bad in ["", "a.b", "a.b.c.d.e", "!!.??.**"] {
        assert_eq!(failed(&issuer, &key, bad), Check::Malformed);
    }
    let huge = format!("{}.{}.x", "a".repeat(MAX_TOKEN), "b");
    assert_eq!(failed(&issuer, &key, &huge), Check::Malformed);
    // An issuer no entry names.
    let stranger = with(claims, "iss", json!("https://evil.example"));
    assert_eq!(failed(&issuer, &key, &key.token(&stranger)), Check::Issuer);
}

#[test]
fn a_kubernetes_token_maps_nested_claims() {
    let key = TestKey::new("k8s");
    let mut issuer = github_issuer(&json!({"keys": [key.jwk()]}));
    issuer.kind = IssuerKind::Kubernetes;
    issuer.issuer = Some("https://k8s.example.org".into());
    issuer.single_use = SingleUse::Bounded;
    issuer.trust_domains = vec!["k8s.example.org".into()];
    issuer.identity = Some(
        "spiffe://k8s.example.org/prod-eu/{/kubernetes.io/namespace}/{/kubernetes.io/serviceaccount/name}".into(),
    );
    issuer.require = [
        (
            "/kubernetes.io/namespace".to_owned(),
            vec!["orders".to_owned(), "payments".to_owned()],
        ),
        (
            "/kubernetes.io/serviceaccount/uid".to_owned(),
            vec!["u-1".to_owned()],
        ),
    ]
    .into();
    let claims = json!({
        "iss": "https://k8s.example.org", "aud": ["https://broker.example.org"],
        "sub": "system:serviceaccount:payments:api", "iat": NOW - 5, "nbf": NOW - 5, "exp": NOW + 600,
        "kubernetes.io": {"namespace": "payments",
            "serviceaccount": {"name": "api", "uid": "u-1"},
            "pod": {"name": "api-7d9", "uid": "p-1"}}
    });
    let v = check(&issuer, &key, &key.token(&claims)).unwrap();
    assert_eq!(
        v.identity.as_str(),
        "spiffe://k8s.example.org/prod-eu/payments/api"
    );
    assert_eq!(v.jti, None);
    assert_eq!(v.evidence["kubernetes.io/pod/name"], "api-7d9");
    let recreated = {
        let mut c = claims.clone();
        c["kubernetes.io"]["serviceaccount"]["uid"] = json!("u-2");
        c
    };
    assert_eq!(
        failed(&issuer, &key, &key.token(&recreated)),
        Check::BoundClaim("/kubernetes.io/serviceaccount/uid".into())
    );
}

#[test]
fn a_jwt_svid_is_chosen_by_its_trust_domain_and_needs_an_svid_key() {
    let key = TestKey::new("svid");
    let mut jwk = key.jwk();
    jwk["use"] = json!("jwt-svid");
    let mut issuer = github_issuer(&json!({"keys": [jwk.clone()]}));
    issuer.kind = IssuerKind::JwtSvid;
    issuer.issuer = None;
    issuer.identity = None;
    issuer.require.clear();
    issuer.single_use = SingleUse::Bounded;
    issuer.trust_domains = vec!["spire.example.org".into()];
    let claims = json!({"sub": "spiffe://spire.example.org/ns/db/sa/migrator",
        "aud": "https://broker.example.org", "iat": NOW - 1, "exp": NOW + 120});
    let token = key.token(&claims);
    let p = Parsed::new(&token).unwrap();
    let i = p.issuer(std::iter::once(&issuer)).unwrap();
    let good: Jwk = serde_json::from_value(jwk).unwrap();
    let v = p.verify(i, "ES256", &good, NOW).unwrap();
    assert_eq!(
        v.identity.as_str(),
        "spiffe://spire.example.org/ns/db/sa/migrator"
    );
    // A key not marked for JWT-SVIDs is not used for them.
    let plain: Jwk = serde_json::from_value(key.jwk()).unwrap();
    assert_eq!(
        p.verify(i, "ES256", &plain, NOW).unwrap_err().check,
        Check::Key
    );
    // Another trust domain finds no entry.
    let elsewhere = with(claims, "sub", json!("spiffe://other.example.org/x"));
    let t = key.token(&elsewhere);
    assert!(
        Parsed::new(&t)
            .unwrap()
            .issuer(std::iter::once(&issuer))
            .is_none()
    );
    let _ = GITHUB;
}

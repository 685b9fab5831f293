// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
//! Unit tests of `policy::check::issuers`.

use crate::policy::{IssuerKind, KeySource, Policy, PolicyError, SingleUse};

/// A GitHub issuer as the README shows it, with `extra` lines added.
fn github(extra: &str) -> String {
    format!(
        r#"[[issuer]]
name = "github"
kind = "github"
issuer = "https://token.actions.githubusercontent.com"
discovery = true
audience = "https://broker.example.org"
require = {{ repository_owner_id = "1234567" }}
identity = "spiffe://github.example.org/{{repository_owner_id}}/{{repository_id}}/env/{{environment}}"
{extra}"#
    )
}

/// `got` holds a problem that says `what`.
fn assert_says(got: &[String], what: &str) {
    assert!(
        got.iter().any(|p| p.contains(what)),
        "no `{what}` in {got:#?}"
    );
}

fn problems(text: &str) -> Vec<String> {
    match Policy::parse(text) {
        Ok(_) => Vec::new(),
        Err(PolicyError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn a_github_issuer_bound_to_its_owner_and_named_by_ids_is_accepted() {
    let p = Policy::parse(&github("")).unwrap();
    let i = &p.issuers["github"];
    assert_eq!(i.kind, IssuerKind::Github);
    assert_eq!(i.keys, KeySource::Discovery);
    assert_eq!(i.algorithms, ["ES256", "RS256"]);
    assert_eq!(i.single_use, SingleUse::Jti);
    assert_eq!(i.max_age.as_secs(), 3600);
    assert_eq!(i.leeway.as_secs(), 30);
    assert_eq!(i.trust_domains, ["github.example.org"]);
    assert_eq!(i.require["repository_owner_id"], ["1234567"]);
    assert_eq!(i.line, 1);
}

#[test]
fn unsigned_and_shared_secret_algorithms_are_refused_with_their_lines() {
    let got = problems(&github(
        "algorithms = [\"none\", \"HS256\", \"RS256\", \"XX1\"]\n",
    ));
    assert_eq!(
        got,
        [
            "line 9: issuer `github`: algorithms: `none`: never: an unsigned token proves nothing",
            "line 9: issuer `github`: algorithms: `HS256`: never: a shared secret lets whoever holds it mint tokens",
            "line 9: issuer `github`: algorithms: `XX1`: not a signing algorithm this broker verifies",
        ]
    );
}

#[test]
fn an_issuer_needs_a_kind_one_key_source_an_audience_and_a_bound_claim() {
    let text = r#"[[issuer]]
name = "loose"
issuer = "http://issuer.example.org"
discovery = true
jwks_url = "https://issuer.example.org/jwks"
identity = "spiffe://ci.example.org/{sub}"
"#;
    assert_eq!(
        problems(text),
        [
            "line 2: issuer `loose`: kind: required (github, kubernetes, jwt-svid or generic: each has rules of its own)",
            "line 3: issuer `loose`: issuer: `http://issuer.example.org` is not an https URL",
            "line 2: issuer `loose`: give exactly one key source: discovery = true, jwks_url, jwks_file or jwks (found 2)",
            "line 2: issuer `loose`: require: bind at least one claim besides the audience (e.g. repository_owner_id), or every tenant of the issuer could sign in",
            "line 2: issuer `loose`: audience: required (the audience its tokens must name: this broker)",
        ]
    );
    // GitHub's issuer cannot escape GitHub's rules by another kind.
    let generic = github("").replace("kind = \"github\"", "kind = \"generic\"");
    assert_says(&problems(&generic), "GitHub's issuer is kind = \"github\"");
}

#[test]
fn github_identities_come_from_ids_never_recycled_names_or_paths() {
    let text = github("").replace(
        "{repository_owner_id}/{repository_id}/env/{environment}",
        "{repository}/{job_workflow_ref}/{actor}",
    );
    let got = problems(&text);
    assert_eq!(got.len(), 4, "{got:#?}");
    assert!(got[0].contains("`{repository}` is a name, which GitHub recycles"));
    assert!(
        got[1].contains(
            "`{job_workflow_ref}` is not one of the claims a GitHub identity is built from"
        )
    );
    assert!(got[2].contains("`{actor}` is not one of the claims"));
    assert!(got[3].contains("name the repository by `{repository_id}`"));
    // The same claims spelled as JSON pointers are the same claims.
    let text = github("").replace("{environment}", "{/repository}");
    assert_says(&problems(&text), "`{repository}` is a name");
    let text = github("").replace("{environment}", "{/job~1workflow}");
    assert_says(
        &problems(&text),
        "`{/job~1workflow}` is not one of the claims",
    );
    // An org-wide identity without the repository's id is refused.
    let text = github("").replace("/{repository_id}", "");
    assert_says(&problems(&text), "name the repository by `{repository_id}`");
    // Review of issue 24: an event, a ref, a public reusable workflow or a
    // recycled name does not keep the rest of GitHub out; an id does.
    for only in [
        "event_name = \"push\"",
        "job_workflow_ref = \"acme/wf/.github/workflows/d.yml@refs/heads/main\"",
        "repository_owner = \"acme\"",
    ] {
        let text = github("").replace("repository_owner_id = \"1234567\"", only);
        assert_says(
            &problems(&text),
            "require: bind repository_owner_id or repository_id",
        );
    }
    let text = github("").replace(
        "repository_owner_id = \"1234567\"",
        "repository_id = [\"4242\", \"4343\"]",
    );
    assert_eq!(
        Policy::parse(&text).unwrap().issuers["github"].require["repository_id"],
        ["4242", "4343"]
    );
    // GitHub Enterprise Cloud's issuer (with the enterprise's slug) is
    // GitHub's too.
    let text = github("")
        .replace(
            "https://token.actions.githubusercontent.com",
            "https://token.actions.githubusercontent.com/acme-corp",
        )
        .replace("kind = \"github\"", "kind = \"generic\"");
    assert_says(&problems(&text), "GitHub's issuer is kind = \"github\"");
}

#[test]
fn a_bound_claim_is_not_the_audience_under_another_spelling_nor_empty() {
    let text = github("").replace(
        "require = { repository_owner_id = \"1234567\" }",
        "require = { \"/aud\" = \"https://broker.example.org\", repository_owner_id = \"\" }",
    );
    let got = problems(&text);
    assert_says(&got, "require: `aud` is checked by the broker itself");
    assert_says(&got, "require: `repository_owner_id` is empty");
    let text = github("").replace(
        "require = { repository_owner_id = \"1234567\" }",
        "require = { \"/a~2\" = \"x\" }",
    );
    assert_says(&problems(&text), "`~` is written `~0`");
}

#[test]
fn urls_are_https_or_loopback_http_without_user_information() {
    use super::safe_url;
    for ok in [
        "https://token.actions.githubusercontent.com",
        "HTTPS://issuer.example.org/x",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9/jwks",
    ] {
        assert!(safe_url(ok), "{ok}");
    }
    for bad in [
        "http://issuer.example.org",
        "http://127.0.0.1:80@evil.example/jwks",
        "http://localhost:x@evil.example/",
        "https://user@issuer.example.org",
        "http://localhost.evil.example/",
        "ftp://issuer.example.org",
        "issuer.example.org",
    ] {
        assert!(!safe_url(bad), "{bad}");
    }
}

#[test]
fn two_issuers_may_not_share_an_iss_and_a_leeway_may_be_zero() {
    let second = github("").replace("name = \"github\"", "name = \"github_two\"");
    let second = second.replace("github.example.org", "github-two.example.org");
    let got = problems(&format!("{}{second}", github("")));
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].contains("is also issuer `github`'s: a token's `iss` must choose one entry"));
    assert!(problems(&github("leeway = \"0s\"\n")).is_empty());
    assert_says(
        &problems(&github("leeway = \"6m\"\n")),
        "leeway: at most 5m",
    );
}

#[test]
fn an_approval_scope_open_to_github_needs_an_environment_or_a_pinned_workflow() {
    let scope = r#"
[groups]
approvers = ["spiffe://people.example.org/human/alice"]
[[scope]]
name = "deploy.prod"
tier = "approval"
approvers = ["approvers"]
workloads = ["spiffe://github.example.org/1234567/*"]
"#;
    let no_env = github(scope).replace("/env/{environment}", "");
    let got = problems(&no_env);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].contains("approval-tier scope `deploy.prod` is open to its identities"),
        "{got:#?}"
    );
    assert!(problems(&github(scope)).is_empty(), "with {{environment}}");
    let pinned = no_env.replace(
        "require = { repository_owner_id = \"1234567\" }",
        "require = { repository_owner_id = \"1234567\", job_workflow_ref = \"acme/workflows/.github/workflows/deploy.yml@refs/tags/v3\" }",
    );
    assert!(problems(&pinned).is_empty(), "{:?}", problems(&pinned));
}

#[test]
fn trust_domains_belong_to_one_issuer_and_never_hold_named_identities() {
    let second = github("").replace("name = \"github\"", "name = \"github_two\"");
    let second = second.replace(
        "https://token.actions.githubusercontent.com",
        "https://ghe.example.org/_services/token",
    );
    let got = problems(&format!("{}{second}", github("")));
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].contains("trust domain `github.example.org` is also issuer `github`'s"));
    let admin = github("[groups]\nadmins = [\"spiffe://github.example.org/human/root\"]\n");
    let got = problems(&admin);
    assert_says(&got, "holds identities the policy names");
}

#[test]
fn a_template_fills_whole_segments_in_a_written_out_trust_domain() {
    use super::template;
    assert_eq!(
        template("spiffe://k8s.example.org/prod/{/kubernetes.io/namespace}/{/kubernetes.io/serviceaccount/name}")
            .unwrap(),
        (
            vec![
                "/kubernetes.io/namespace".to_owned(),
                "/kubernetes.io/serviceaccount/name".to_owned()
            ],
            "k8s.example.org".to_owned()
        )
    );
    for (bad, why) in [
        ("https://x/{a}", "must start with `spiffe://`"),
        (
            "spiffe://{org}.example.org/{a}",
            "its trust domain must be written out",
        ),
        (
            "spiffe://ci.example.org/env-{environment}",
            "a placeholder fills a whole path segment",
        ),
        ("spiffe://ci.example.org/{a b}", "name a claim"),
        (
            "spiffe://ci.example.org/{}",
            "a placeholder fills a whole path segment",
        ),
        ("spiffe://Bad_Domain/{a}", "not a spiffe://"),
        ("spiffe://example.org./{a}", "is not a trust domain"),
        ("spiffe://ci.example.org/{/a//b}", "an empty step"),
        ("spiffe://ci.example.org/{a", "an unclosed `{`"),
    ] {
        let e = template(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
    assert_eq!(super::canonical("/repository").unwrap(), "repository");
    assert_eq!(super::canonical("/a~1b/c~0").unwrap(), "/a~1b/c~0");
}

#[test]
fn kubernetes_binds_namespace_and_account_uid() {
    let k8s = r#"[[issuer]]
name = "prod_eu"
kind = "kubernetes"
issuer = "https://oidc.prod-eu.example.org"
jwks_file = "/etc/portcullis/prod-eu.jwks"
audience = "portcullis"
require = { "/kubernetes.io/namespace" = "payments" }
identity = "spiffe://k8s.example.org/prod-eu/{/kubernetes.io/namespace}/{/kubernetes.io/serviceaccount/name}"
"#;
    let got = problems(k8s);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(got[0].contains("the service account's uid"), "{got:#?}");
    let bound = k8s.replace(
        "require = { \"/kubernetes.io/namespace\" = \"payments\" }",
        "require = { \"/kubernetes.io/namespace\" = \"payments\", \"/kubernetes.io/serviceaccount/uid\" = \"0d1b…\" }",
    );
    let p = Policy::parse(&bound).unwrap();
    assert_eq!(p.issuers["prod_eu"].single_use, SingleUse::Bounded);
    let long = bound.replace(
        "audience = \"portcullis\"",
        "audience = \"portcullis\"\nmax_age = \"2h\"",
    );
    assert_says(&problems(&long), "at most 1h when single_use is `bounded`");
    // The namespace is bound in `require`, not only mapped; several
    // namespaces of one cluster are bound as a list.
    let mapped_only = bound.replace("\"/kubernetes.io/namespace\" = \"payments\", ", "");
    assert_says(&problems(&mapped_only), "require: bind the namespace");
    let several = bound.replace("\"payments\"", "[\"payments\", \"orders\"]");
    let p = Policy::parse(&several).unwrap();
    assert_eq!(
        p.issuers["prod_eu"].require["/kubernetes.io/namespace"],
        ["payments", "orders"]
    );
    let empty = bound.replace("\"payments\"", "[]");
    assert_says(&problems(&empty), "is empty");
}

#[test]
fn jwt_svids_are_bound_to_their_trust_domains() {
    let svid = r#"[[issuer]]
name = "spire"
kind = "jwt-svid"
jwks_file = "/etc/spire/bundle.jwks"
audience = "portcullis"
trust_domains = ["prod.example.org"]
"#;
    let p = Policy::parse(svid).unwrap();
    let i = &p.issuers["spire"];
    assert_eq!((i.issuer.as_deref(), i.identity.as_deref()), (None, None));
    assert_eq!(
        (i.max_age.as_secs(), i.single_use),
        (300, SingleUse::Bounded)
    );
    let got = problems(&svid.replace("trust_domains = [\"prod.example.org\"]\n", ""));
    assert_says(&got, "trust_domains: name exactly one");
    let two = svid.replace(
        "[\"prod.example.org\"]",
        "[\"prod.example.org\", \"dev.example.org\"]",
    );
    assert_says(&problems(&two), "trust_domains: name exactly one");
    let path = svid.replace("[\"prod.example.org\"]", "[\"prod.example.org/human\"]");
    assert_says(
        &problems(&path),
        "`prod.example.org/human` is not a trust domain",
    );
    let long = svid.replace(
        "audience = \"portcullis\"",
        "audience = \"portcullis\"\nmax_age = \"10m\"",
    );
    assert_says(&problems(&long), "at most 5m for JWT-SVIDs");
}

#[test]
fn inline_keys_are_a_jwk_set_without_shared_secrets() {
    let with = |jwks: &str| github("").replace("discovery = true", &format!("jwks = '{jwks}'"));
    let ec = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis","y":"y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}]}"#;
    assert!(problems(&with(ec)).is_empty(), "{:?}", problems(&with(ec)));
    let oct = r#"{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0"}]}"#;
    assert_says(&problems(&with(oct)), "holds a private or secret key part");
    let private = ec.replace("\"kid\":\"k1\"", "\"kid\":\"k1\",\"d\":\"c2VjcmV0\"");
    assert_says(
        &problems(&with(&private)),
        "holds a private or secret key part",
    );
    assert_says(&problems(&with("{}")), "not a JWK Set");
}

#[test]
fn an_unknown_key_in_an_issuer_is_named_with_its_line() {
    let got = problems(&github("jwks_uri = \"https://x\"\n"));
    assert_says(&got, "line 9: unknown key `issuer.jwks_uri`");
}

/// Review of issue 24: GitHub's tokens are used once; a delegation may not
/// hand tokens to an issuer's workloads (a certificate holder would mint
/// tokens naming them).
#[test]
fn github_tokens_are_single_use_and_no_delegation_names_an_issuers_workloads() {
    assert_says(
        &problems(&github("single_use = \"bounded\"\n")),
        "GitHub's tokens carry a jti",
    );
    let delegation = r#"
[[delegation]]
from = ["spiffe://example.org/ns/ci/*"]
to = ["spiffe://github.example.org/1234567/*"]
scopes = ["orders.read"]
[[scope]]
name = "orders.read"
tier = "auto"
workloads = ["spiffe://example.org/ns/ci/*"]
"#;
    assert_says(
        &problems(&github(delegation)),
        "delegation: to: `spiffe://github.example.org/1234567/*` is in a trust domain of issuer `github`",
    );
}

//! Issue 24: workloads without a client certificate sign in with their
//! platform's token. A real HTTPS issuer (tests/common/issuer.rs) serves
//! discovery and JWKS like GitHub's and a cluster's and counts its
//! fetches; tokens shaped like GitHub Actions' and Kubernetes' are signed
//! with ring or the `openssl` command, never with portcullis code; the
//! broker is the real server, spoken to over gRPC on its federation
//! listener (server TLS only) and its mTLS listener.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::sync::atomic::Ordering;

use common::issuer::{EsKey, RsKey, TestIssuer, github_claims, k8s_claims};
use common::{Harness, export, part};
use portcullis::client::ClientOpts;
use portcullis::clock::Clock as _;
use portcullis::dev::{As, DevCa};
use portcullis::pb;
use portcullis::pb::broker_client::BrokerClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

const WORKLOADS: &str =
    r#"["spiffe://github.test/*", "spiffe://k8s.test/*", "spiffe://portcullis.dev/ns/demo/*"]"#;

fn policy(issuer: &str, ca_file: &str) -> String {
    format!(
        r#"[broker]
default_audience = "portcullis-test"
admins = ["admins"]

[groups]
approvers = ["spiffe://portcullis.dev/human/alice"]
admins = ["spiffe://portcullis.dev/human/root-oncall"]

[[scope]]
name = "orders.read"
tier = "auto"
workloads = {WORKLOADS}
default_ttl = "5m"
max_ttl = "1h"

[[scope]]
name = "orders.write"
tier = "auto"
workloads = {WORKLOADS}
bind = "mtls"

[[scope]]
name = "orders.admin"
tier = "approval"
workloads = ["spiffe://github.test/*"]
approvers = ["approvers"]
approvals_required = 1
require_justification = false

[[issuer]]
name = "github"
kind = "github"
issuer = "{issuer}"
discovery = true
ca_file = "{ca_file}"
audience = "https://broker.test"
require = {{ repository_owner_id = "1001" }}
identity = "spiffe://github.test/{{repository_owner_id}}/{{repository_id}}/env/{{environment}}"

[[issuer]]
name = "prod_eu"
kind = "kubernetes"
issuer = "{issuer}/k8s"
jwks_url = "{issuer}/k8s/jwks"
ca_file = "{ca_file}"
audience = "https://broker.test"
require = {{ "/kubernetes.io/namespace" = "payments", "/kubernetes.io/serviceaccount/uid" = "sa-uid-1" }}
identity = "spiffe://k8s.test/prod-eu/{{/kubernetes.io/namespace}}/{{/kubernetes.io/serviceaccount/name}}"
"#
    )
}

struct World {
    h: Harness,
    issuer: TestIssuer,
    key: EsKey,
    k8s_key: EsKey,
    _ca_dir: tempfile::TempDir,
}

impl World {
    async fn start() -> Self {
        Self::start_with(vec![]).await
    }

    /// With `more` keys served beside the issuers' own from the start.
    async fn start_with(more: Vec<Value>) -> Self {
        // The issuer's certificate comes from a CA of its own, trusted for
        // this issuer only (`ca_file`).
        let ca = DevCa::new("test issuer CA").unwrap();
        let ca_dir = tempfile::tempdir().unwrap();
        let ca_file = ca_dir.path().join("issuer-ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let issuer = TestIssuer::start(&ca).await;
        let (key, k8s_key) = (EsKey::new("gh-1"), EsKey::new("k8s-1"));
        issuer.set_keys([vec![key.jwk()], more].concat());
        issuer.set_k8s_keys(vec![k8s_key.jwk()]);
        let text = policy(&issuer.url, ca_file.to_str().unwrap());
        let mut h = Harness::prepare(Some(&text));
        h.federation = true;
        h.boot().await;
        Self {
            h,
            issuer,
            key,
            k8s_key,
            _ca_dir: ca_dir,
        }
    }

    fn now(&self) -> u64 {
        self.h.clock.now() / 1000
    }

    fn github(&self) -> Value {
        github_claims(&self.issuer.url, self.now())
    }

    /// A client of the federation listener: no certificate.
    async fn federated(&self) -> BrokerClient<Channel> {
        let opts = ClientOpts {
            federation_server: Some(self.h.running().federation_addr.unwrap().to_string()),
            ..self.h.opts(As::Workload)
        };
        BrokerClient::new(opts.connect_federation().await.unwrap())
    }
}

fn exchange(token: &str, scopes: &[&str]) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        subject_token: token.into(),
        subject_token_type: pb::JWT_TOKEN_TYPE.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn granted(r: pb::RequestTokenResponse) -> pb::Grant {
    match r.outcome {
        Some(pb::request_token_response::Outcome::Granted(g)) => g,
        other => panic!("not granted: {other:?}"),
    }
}

fn with(mut v: Value, name: &str, value: Value) -> Value {
    v[name] = value;
    v
}

/// The records of `action` in the trail, as text.
async fn records(h: &Harness, action: &str) -> Vec<pb::AuditRecord> {
    h.running().engine.settled().await.unwrap();
    export(h)
        .await
        .into_iter()
        .filter(|r| r.action == action)
        .collect()
}

#[tokio::test]
async fn a_github_job_signs_in_once_and_its_sign_in_is_recorded_with_the_grant() {
    let w = World::start().await;
    let mut f = w.federated().await;
    let token = w.key.sign(&w.github());
    let g = granted(
        f.exchange_token(exchange(&token, &["orders.read"]))
            .await
            .unwrap()
            .into_inner(),
    );
    let lease = g.lease.clone().unwrap();
    assert_eq!(lease.subject, "spiffe://github.test/1001/4242/env/prod");
    assert_eq!(
        part(&g.token, 1)["sub"],
        "spiffe://github.test/1001/4242/env/prod"
    );
    assert!(part(&g.token, 1).get("cnf").is_none());
    // The same token again is a replay.
    let e = f
        .exchange_token(exchange(&token, &["orders.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(e.message(), "not signed in");
    let signed = records(&w.h, "federation.signed_in").await;
    assert_eq!(signed.len(), 1, "{signed:?}");
    assert_eq!(signed[0].actor, lease.subject);
    assert_eq!(signed[0].target, lease.id);
    assert!(
        signed[0]
            .reason
            .contains("issuer github; sub repo:acme/deploy:environment:prod; jti ")
    );
    assert!(signed[0].reason.contains("claims sha256:"));
    let refused = records(&w.h, "federation.refused").await;
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0].reason.starts_with("issuer github: replay;"),
        "{refused:?}"
    );
    // No record holds the token or its signature.
    let sig = token.rsplit('.').next().unwrap();
    for r in export(&w.h).await {
        assert!(!format!("{r:?}").contains(sig), "{r:?}");
    }
    // Not even a retry with the first call's client_request_id mints a
    // second credential from one token: a lost answer costs a new token.
    let t2 = w.key.sign(&w.github());
    let ask = pb::ExchangeTokenRequest {
        client_request_id: "deploy-81234".into(),
        ..exchange(&t2, &["orders.read"])
    };
    granted(f.exchange_token(ask.clone()).await.unwrap().into_inner());
    assert_eq!(
        f.exchange_token(ask).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // A token replayed again and again is recorded once (then counted):
    // whoever holds a used token cannot fill the trail with it.
    for _ in 0..5 {
        let e = f.exchange_token(exchange(&token, &["orders.read"])).await;
        assert_eq!(e.unwrap_err().code(), Code::Unauthenticated);
    }
    assert_eq!(records(&w.h, "federation.refused").await.len(), 2);
    w.h.stop().await;
}

#[tokio::test]
async fn every_bad_token_is_refused_and_named_in_the_trail_after_its_signature() {
    let w = World::start().await;
    let mut f = w.federated().await;
    let now = w.now();
    let c = w.github();
    let hs256 = w.key.sign_with(&json!({"alg": "HS256", "kid": "gh-1"}), &c);
    let unsigned = {
        let t = w.key.sign_with(&json!({"alg": "none", "kid": "gh-1"}), &c);
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[2] = "";
        parts.join(".")
    };
    let stranger = EsKey::new("gh-1");
    // (token, the check the trail names, or None: refused before the
    // signature, so only counted)
    let cases: Vec<(String, Option<&str>)> = vec![
        (
            w.key
                .sign(&with(c.clone(), "iss", json!("https://elsewhere.test"))),
            None,
        ),
        (unsigned, None),
        (hs256, None),
        (stranger.sign(&w.github()), None),
        (
            w.key
                .sign(&with(c.clone(), "aud", json!("https://other.test"))),
            // Any tenant of the issuer can mint these: counted, not recorded.
            None,
        ),
        (
            w.key.sign(&with(
                with(c.clone(), "exp", json!(now - 120)),
                "iat",
                json!(now - 400),
            )),
            Some("expired"),
        ),
        (
            w.key.sign(&with(
                with(c.clone(), "iat", json!(now - 7200)),
                "exp",
                json!(now + 60),
            )),
            Some("age"),
        ),
        (
            w.key
                .sign(&with(c.clone(), "repository_owner_id", json!("666"))),
            None,
        ),
        (
            w.key.sign(&with(c.clone(), "environment", json!("prod/x"))),
            Some("mapping"),
        ),
    ];
    for (token, check) in &cases {
        let e = f
            .exchange_token(exchange(token, &["orders.read"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{check:?}: {e:?}");
        assert_eq!(e.message(), "not signed in");
    }
    let refused = records(&w.h, "federation.refused").await;
    let named: Vec<&str> = cases.iter().filter_map(|(_, c)| *c).collect();
    assert_eq!(refused.len(), named.len(), "{refused:?}");
    for (r, check) in refused.iter().zip(named) {
        assert!(
            r.reason.starts_with(&format!("issuer github: {check};")),
            "{check}: {}",
            r.reason
        );
    }
    assert!(records(&w.h, "federation.signed_in").await.is_empty());
    assert!(records(&w.h, "token.granted").await.is_empty());
    // Every refusal is counted by issuer and check.
    let metrics = w.h.running().engine.render_metrics();
    for outcome in [
        "audience",
        "bound claim",
        "expired",
        "age",
        "mapping",
        "signature",
        "algorithm",
        "issuer",
    ] {
        assert!(
            metrics.contains(&format!("outcome=\"{outcome}\"")),
            "{outcome}: {metrics}"
        );
    }
    w.h.stop().await;
}

/// GitHub recycles repository names; ids stay. A renamed repository keeps
/// its identity, and a new repository under the old name gets another.
#[tokio::test]
async fn a_renamed_repository_keeps_its_identity_and_its_old_name_gives_nothing() {
    let w = World::start().await;
    let mut f = w.federated().await;
    let renamed = with(w.github(), "repository", json!("acme/shipit"));
    let g = granted(
        f.exchange_token(exchange(&w.key.sign(&renamed), &["orders.read"]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        g.lease.unwrap().subject,
        "spiffe://github.test/1001/4242/env/prod"
    );
    let squatter = with(w.github(), "repository_id", json!("9999"));
    let g = granted(
        f.exchange_token(exchange(&w.key.sign(&squatter), &["orders.read"]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        g.lease.unwrap().subject,
        "spiffe://github.test/1001/9999/env/prod"
    );
    w.h.stop().await;
}

#[tokio::test]
async fn a_github_token_signed_rs256_by_openssl_is_accepted() {
    let Some(rsa) = RsKey::new("gh-rsa") else {
        eprintln!(
            "SKIPPED: a_github_token_signed_rs256_by_openssl_is_accepted needs the `openssl` command"
        );
        return;
    };
    let w = World::start_with(vec![rsa.jwk()]).await;
    let mut f = w.federated().await;
    let token = rsa.sign(&w.github());
    let answer = f.exchange_token(exchange(&token, &["orders.read"])).await;
    let g = granted(answer.unwrap().into_inner());
    assert_eq!(
        g.lease.unwrap().subject,
        "spiffe://github.test/1001/4242/env/prod"
    );
    w.h.stop().await;
}

/// Issue 24: no request can make the broker fetch in a loop. 10,000
/// tokens, each with a random unknown `kid`, sent over 31 s: one fetch in
/// all (the one the first miss past 30 s since the last fetch is owed).
#[tokio::test]
async fn ten_thousand_random_unknown_kids_cost_one_fetch_per_30_seconds() {
    let w = World::start().await;
    let f = w.federated().await;
    // The start's own fetch has happened once a known token passes.
    let mut g = f.clone();
    granted(
        g.exchange_token(exchange(&w.key.sign(&w.github()), &["orders.read"]))
            .await
            .unwrap()
            .into_inner(),
    );
    let before = w.issuer.jwks_fetches.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    storm(&w, &f, 0..10).await;
    let first_half = w.issuer.jwks_fetches.load(Ordering::SeqCst) - before;
    tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    storm(&w, &f, 10..20).await;
    let fetches = w.issuer.jwks_fetches.load(Ordering::SeqCst) - before;
    eprintln!(
        "fetch storm: {fetches} JWKS fetches for 10000 tokens with random unknown kids over {:?} ({first_half} in the first 5000)",
        started.elapsed()
    );
    assert_eq!(first_half, 0, "inside 30 s of the last fetch");
    assert_eq!(fetches, 1, "one fetch once 30 s had passed");
    // None of them reached the trail (refused before a signature).
    assert!(records(&w.h, "federation.refused").await.is_empty());
    w.h.stop().await;
}

/// 500 tokens with random unknown `kid`s from each of `batches`, at once.
async fn storm(w: &World, f: &BrokerClient<Channel>, batches: std::ops::Range<usize>) {
    let mut tasks = Vec::new();
    for batch in batches {
        let mut f = f.clone();
        let key = EsKey::new("x");
        let claims = w.github();
        tasks.push(tokio::spawn(async move {
            for i in 0..500 {
                let kid = format!("random-{batch}-{i}-{}", rand_hex());
                let t = key.sign_with(&json!({"alg": "ES256", "kid": kid}), &claims);
                let e = f
                    .exchange_token(exchange(&t, &["orders.read"]))
                    .await
                    .unwrap_err();
                assert_eq!(e.code(), Code::Unauthenticated);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn rand_hex() -> String {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn an_approval_scope_parks_and_the_job_collects_it_with_its_claim_secret() {
    let w = World::start().await;
    let mut f = w.federated().await;
    let resp = f
        .exchange_token(pb::ExchangeTokenRequest {
            justification: "migrate the orders schema".into(),
            ..exchange(&w.key.sign(&w.github()), &["orders.admin"])
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::request_token_response::Outcome::Pending(req)) = resp.outcome.clone() else {
        panic!("not parked: {resp:?}");
    };
    assert!(resp.claim_secret.len() >= 43, "{resp:?}");
    // The approver sees which run asks.
    let mut approver = pb::approvals_client::ApprovalsClient::new(w.h.channel(As::Approver).await);
    let seen = approver
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    let si = seen.sign_in.unwrap();
    assert_eq!(si.issuer, "github");
    assert_eq!(si.evidence["run_id"], "81234");
    assert_eq!(si.evidence["repository"], "acme/deploy");
    assert_eq!(si.evidence["sha"], "9f1c0a2e");
    approver
        .approve(pb::ApproveRequest {
            request_id: req.id.clone(),
            reason: "ticket 42".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Without the secret, or with another, the request is not there.
    let get = |secret: Option<&str>| {
        let mut r = tonic::Request::new(pb::GetRequestRequest {
            request_id: req.id.clone(),
        });
        if let Some(s) = secret {
            r.metadata_mut()
                .insert(pb::CLAIM_SECRET_METADATA, s.parse().unwrap());
        }
        r
    };
    assert_eq!(
        f.get_request(get(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let wrong = "A".repeat(43);
    assert_eq!(
        f.get_request(get(Some(&wrong))).await.unwrap_err().code(),
        Code::NotFound
    );
    let got = f
        .get_request(get(Some(&resp.claim_secret)))
        .await
        .unwrap()
        .into_inner();
    let g = got.grant.unwrap();
    assert_eq!(
        g.lease.unwrap().subject,
        "spiffe://github.test/1001/4242/env/prod"
    );
    // Exactly once.
    let again = f
        .get_request(get(Some(&resp.claim_secret)))
        .await
        .unwrap()
        .into_inner();
    assert!(again.grant.is_none());
    assert_eq!(
        records(&w.h, "federation.signed_in").await[0].target,
        req.id
    );
    w.h.stop().await;
}

#[tokio::test]
async fn a_kubernetes_pod_signs_in_and_a_recreated_account_does_not() {
    let w = World::start().await;
    let mut f = w.federated().await;
    let iss = format!("{}/k8s", w.issuer.url);
    let claims = k8s_claims(&iss, w.now());
    let g = granted(
        f.exchange_token(exchange(&w.k8s_key.sign(&claims), &["orders.read"]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        g.lease.unwrap().subject,
        "spiffe://k8s.test/prod-eu/payments/api"
    );
    // Kubernetes hands a pod the same token for most of its life (recent
    // clusters put a `jti` in it): bounded single use lets it sign in again.
    let mut claims = claims;
    claims["jti"] = json!("4f3a9c2e-k8s");
    granted(
        f.exchange_token(exchange(&w.k8s_key.sign(&claims), &["orders.read"]))
            .await
            .unwrap()
            .into_inner(),
    );
    granted(
        f.exchange_token(exchange(&w.k8s_key.sign(&claims), &["orders.read"]))
            .await
            .unwrap()
            .into_inner(),
    );
    let mut recreated = claims.clone();
    recreated["kubernetes.io"]["serviceaccount"]["uid"] = json!("sa-uid-2");
    let e = f
        .exchange_token(exchange(&w.k8s_key.sign(&recreated), &["orders.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // A bound claim refused: counted by issuer and check, not recorded.
    let metrics = w.h.running().engine.render_metrics();
    assert!(
        metrics.contains(
            "portcullis_federation_sign_ins_total{issuer=\"prod_eu\",outcome=\"bound claim\"} 1"
        ),
        "{metrics}"
    );
    assert!(records(&w.h, "federation.refused").await.is_empty());
    w.h.stop().await;
}

#[tokio::test]
async fn a_federated_caller_gets_no_mtls_bound_scope_and_no_other_call() {
    let w = World::start().await;
    let mut f = w.federated().await;
    let e = f
        .exchange_token(exchange(&w.key.sign(&w.github()), &["orders.write"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("orders.write") && e.message().contains("mtls"),
        "{e:?}"
    );
    let e = f
        .request_token(common::ask(&["orders.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = f
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Fields of the exchange itself, named.
    let t = w.key.sign(&w.github());
    for (ask, field) in [
        (
            pb::ExchangeTokenRequest {
                subject_token_type: String::new(),
                ..exchange(&t, &["orders.read"])
            },
            "subject_token_type",
        ),
        (
            pb::ExchangeTokenRequest {
                for_identity: "spiffe://portcullis.dev/ns/demo/sa/app".into(),
                ..exchange(&t, &["orders.read"])
            },
            "for_identity",
        ),
        (exchange(&t, &[]), "scopes"),
    ] {
        let e = f.exchange_token(ask).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{e:?}");
    }
    // No certificate may take an identity of an issuer's trust domain.
    let (cert, key) = w.h.foreign_identity(
        &w.h.ca,
        "spiffe://github.test/1001/4242/env/prod",
        false,
        "gh-impostor",
    );
    let impostor = ClientOpts {
        cert: Some(cert),
        key: Some(key),
        ..w.h.opts(As::Workload)
    };
    let mut i = BrokerClient::new(impostor.connect().await.unwrap());
    let e = i
        .request_token(common::ask(&["orders.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Nor may a certificate holder delegate to such an identity.
    let mut m = w.h.broker(As::Workload).await;
    let parent = common::grant(&mut m, common::ask(&["orders.read"])).await;
    let e = m
        .exchange_token(pb::ExchangeTokenRequest {
            subject_token: parent.token,
            for_identity: "spiffe://github.test/1001/4242/env/prod".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("trust domain of issuer `github`"),
        "{e:?}"
    );
    // A platform token is not taken on the mTLS listener.
    let mut m = w.h.broker(As::Workload).await;
    let e = m
        .exchange_token(exchange(&t, &["orders.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("subject_token_type"), "{e:?}");
    w.h.stop().await;
}

/// `agent --id-token-file`: a pod's agent keeps a token fresh by signing in
/// again with the file's current token (the kubelet rewrites it) for each
/// new lease; a lease from a platform token is never renewed.
#[tokio::test]
async fn the_agent_signs_in_again_with_the_files_current_token_for_each_lease() {
    let w = World::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (id_file, out) = (dir.path().join("sa-token"), dir.path().join("token"));
    let iss = format!("{}/k8s", w.issuer.url);
    std::fs::write(&id_file, w.k8s_key.sign(&k8s_claims(&iss, w.now()))).unwrap();
    let cfg = portcullis::agent::AgentConfig {
        scopes: vec!["orders.read".into()],
        audience: String::new(),
        ttl: Some(std::time::Duration::from_secs(3)),
        out: Some(out.clone()),
        env_file: None,
        reason: String::new(),
        from_token: None,
        for_identity: String::new(),
        id_token: Some(id_file.clone()),
    };
    let opts = ClientOpts {
        federation_server: Some(w.h.running().federation_addr.unwrap().to_string()),
        ..w.h.opts(As::Workload)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(portcullis::agent::run(opts, cfg, async {
        let _ = stopped.await;
    }));
    let read = |not: String| {
        let out = out.clone();
        async move {
            for _ in 0..200 {
                if let Ok(t) = std::fs::read_to_string(&out)
                    && !t.is_empty()
                    && t != not
                {
                    return t;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("no new token in {}", out.display());
        }
    };
    let first = read(String::new()).await;
    // The kubelet rewrites the file with a fresh token.
    std::fs::write(&id_file, w.k8s_key.sign(&k8s_claims(&iss, w.now() + 1))).unwrap();
    let second = read(first.clone()).await;
    let (a, b) = (part(&first, 1), part(&second, 1));
    assert_ne!(a["jti"], b["jti"], "a new lease, not a renewal");
    assert_eq!(b["sub"], "spiffe://k8s.test/prod-eu/payments/api");
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    assert_eq!(records(&w.h, "federation.signed_in").await.len(), 2);
    assert!(records(&w.h, "lease.renewed").await.is_empty());
    w.h.stop().await;
}

/// Issue 24, item 6 (docs/federation-clouds.md): what AWS STS, Google's
/// workload identity federation and Entra ask of an issuer's tokens — a
/// discovery document naming the `iss` and its JWKS, EC keys without
/// certificate chains, the audience the workload asked for, the
/// workload's stable SPIFFE ID as `sub`, a life well under a day.
#[tokio::test]
async fn our_tokens_carry_what_the_clouds_ask_of_an_issuers_tokens() {
    let w = World::start().await;
    let http = w.h.running().http_addr.unwrap();
    let disco: Value =
        serde_json::from_str(&common::http_get(http, "/.well-known/openid-configuration").await)
            .unwrap();
    let jwks: Value =
        serde_json::from_str(&common::http_get(http, "/.well-known/jwks.json").await).unwrap();
    let mut c = w.h.broker(As::Workload).await;
    let ask = pb::RequestTokenRequest {
        audience: "sts.amazonaws.com".into(),
        ..common::ask(&["orders.read"])
    };
    let g = common::grant(&mut c, ask).await;
    let (head, claims) = (part(&g.token, 0), part(&g.token, 1));
    assert_eq!(disco["issuer"], claims["iss"]);
    assert_eq!(
        disco["jwks_uri"],
        format!("{}/.well-known/jwks.json", claims["iss"].as_str().unwrap())
    );
    assert!(
        disco["id_token_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("ES256"))
    );
    assert_eq!(head["alg"], "ES256");
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == head["kid"])
        .unwrap();
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    for k in jwks["keys"].as_array().unwrap() {
        assert!(k.get("x5c").is_none() && k.get("x5t").is_none(), "{k}");
    }
    assert_eq!(claims["aud"], "sts.amazonaws.com");
    assert_eq!(claims["sub"], "spiffe://portcullis.dev/ns/demo/sa/app");
    let life = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(life <= 3600, "{life}");
    w.h.stop().await;
}

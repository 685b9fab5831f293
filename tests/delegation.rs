//! Delegation over real mTLS (issue 12): token exchange, attenuation,
//! certificate binding checked against the real client certificates,
//! cascade revocation across a restart, and the `act`/`cnf` claims
//! verified by PyJWT from the published JWKS.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use portcullis::pb;
use portcullis::pb::broker_client::BrokerClient;
use portcullis::pb::request_token_response::Outcome;
use tonic::Code;
use tonic::transport::Channel;

const AGENT: &str = "spiffe://example.org/agent/planner";
const TOOL: &str = "spiffe://example.org/tool/search";
const OTHER_TOOL: &str = "spiffe://example.org/tool/fetch";

const POLICY: &str = r#"
[broker]
default_audience = "portcullis"
admins = ["admins"]
[groups]
admins = ["spiffe://example.org/human/root-oncall"]
approvers = ["spiffe://example.org/human/alice"]
[[scope]]
name = "orders.read"
tier = "auto"
workloads = ["spiffe://example.org/agent/*"]
default_ttl = "10m"
max_ttl = "1h"
[[scope]]
name = "orders.write"
tier = "auto"
workloads = ["spiffe://example.org/agent/*"]
default_ttl = "10m"
bind = "mtls"
[[delegation]]
from = ["spiffe://example.org/agent/*"]
to = ["spiffe://example.org/tool/*"]
scopes = ["orders.read", "orders.write"]
max_depth = 2
audiences = ["orders-api"]
[[delegation]]
from = ["spiffe://example.org/tool/*"]
to = ["spiffe://example.org/tool/*"]
scopes = ["orders.read"]
max_depth = 2
"#;

/// A client as `uri`, and the PEM file of its certificate.
async fn client(h: &Harness, uri: &str) -> (BrokerClient<Channel>, PathBuf) {
    let name = uri.rsplit('/').next().unwrap();
    let cert = h.dir.path().join(format!("id-{name}.pem"));
    let channel = h.channel_for(uri).await;
    (BrokerClient::new(channel), cert)
}

/// RFC 8705 thumbprint of the certificate in `pem`.
fn x5t(pem: &Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    portcullis::identity::thumbprint(&CertificateDer::from_pem_file(pem).unwrap())
}

fn exchange(token: &str, scopes: &[&str], to: &str) -> pb::ExchangeTokenRequest {
    pb::ExchangeTokenRequest {
        subject_token: token.to_owned(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        for_identity: to.to_owned(),
        ..Default::default()
    }
}

async fn exchanged(c: &mut BrokerClient<Channel>, req: pb::ExchangeTokenRequest) -> Outcome {
    c.exchange_token(req)
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
}

async fn granted(c: &mut BrokerClient<Channel>, req: pb::ExchangeTokenRequest) -> pb::Grant {
    match exchanged(c, req).await {
        Outcome::Granted(g) => g,
        Outcome::Pending(r) => panic!("parked: {r:?}"),
    }
}

async fn introspect(
    c: &mut BrokerClient<Channel>,
    token: &str,
    x5t: &str,
) -> pb::IntrospectResponse {
    c.introspect(pb::IntrospectRequest {
        token: token.to_owned(),
        cnf_x5t_s256: x5t.to_owned(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn children(c: &mut BrokerClient<Channel>, parent: &str) -> Vec<String> {
    c.list_leases(pb::ListLeasesRequest {
        parent_id: parent.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .leases
    .into_iter()
    .map(|l| l.id)
    .collect()
}

#[tokio::test]
async fn a_bound_parent_is_narrowed_for_a_tool_that_collects_its_child_with_its_own_certificate() {
    let h = Harness::start_with(Some(POLICY)).await;
    let (mut agent, agent_pem) = client(&h, AGENT).await;
    let (mut tool, tool_pem) = client(&h, TOOL).await;
    let parent = grant(&mut agent, ask(&["orders.read", "orders.write"])).await;
    let lease = parent.lease.clone().unwrap();
    assert_eq!(lease.cnf_x5t_s256, x5t(&agent_pem), "bound to the agent");
    assert_eq!(part(&parent.token, 1)["cnf"]["x5t#S256"], x5t(&agent_pem));

    // A relying party that checks the binding: only the agent's
    // certificate makes the token active.
    let seen = introspect(&mut tool, &parent.token, &x5t(&tool_pem)).await;
    assert!(!seen.active, "presented with another certificate");
    let seen = introspect(&mut tool, &parent.token, &x5t(&agent_pem)).await;
    assert!(seen.active && seen.cnf_checked);
    // The tool cannot exchange a token it does not hold.
    let e = tool
        .exchange_token(exchange(&parent.token, &["orders.read"], ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("subject_token"), "{}", e.message());

    // Read-only for the tool: a bearer child, handed over by the agent.
    let read = granted(
        &mut agent,
        pb::ExchangeTokenRequest {
            audience: "orders-api".into(),
            ..exchange(&parent.token, &["orders.read"], TOOL)
        },
    )
    .await;
    let child = read.lease.clone().unwrap();
    assert_eq!(
        (
            child.parent_id.as_str(),
            child.depth,
            child.subject.as_str()
        ),
        (lease.id.as_str(), 1, TOOL)
    );
    assert_eq!(child.actors, [AGENT]);
    let seen = introspect(&mut tool, &read.token, "").await;
    assert!(seen.active);
    assert_eq!(seen.actors, [AGENT]);
    assert_eq!(seen.aud, ["orders-api"]);

    // Writes bind: the child waits for the tool, which collects it over
    // its own mTLS and gets it bound to its own certificate.
    let Outcome::Pending(r) =
        exchanged(&mut agent, exchange(&parent.token, &["orders.write"], TOOL)).await
    else {
        panic!("a bound child for another identity was handed to the delegator")
    };
    assert_eq!(r.state, pb::RequestState::Approved as i32);
    assert_eq!(
        (r.parent_id.as_str(), r.actors.as_slice()),
        (lease.id.as_str(), &[AGENT.to_owned()][..])
    );
    let got = tool
        .get_request(pb::GetRequestRequest {
            request_id: r.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let write = got.grant.expect("collected by the tool");
    let wl = write.lease.unwrap();
    assert_eq!(wl.cnf_x5t_s256, x5t(&tool_pem));
    assert_eq!(wl.parent_id, lease.id);
    assert!(
        !introspect(&mut agent, &write.token, &x5t(&agent_pem))
            .await
            .active
    );
    assert!(
        introspect(&mut agent, &write.token, &x5t(&tool_pem))
            .await
            .active
    );

    let mut kids = children(&mut agent, &lease.id).await;
    kids.sort();
    let mut want = vec![child.id.clone(), wl.id.clone()];
    want.sort();
    assert_eq!(kids, want, "the agent sees what it delegated");

    // Revoking the parent ends both children at once.
    agent
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.id.clone(),
            reason: "task finished".into(),
        })
        .await
        .unwrap();
    for t in [&read.token, &write.token] {
        assert!(!introspect(&mut tool, t, "").await.active);
    }
    h.stop().await;
}

#[tokio::test]
async fn widening_a_child_is_refused_with_the_field_and_nothing_is_written() {
    let h = Harness::start_with(Some(POLICY)).await;
    let (mut agent, _) = client(&h, AGENT).await;
    let parent = grant(
        &mut agent,
        pb::RequestTokenRequest {
            ttl: secs(300),
            ..ask(&["orders.read"])
        },
    )
    .await;
    let id = parent.lease.unwrap().id;
    let cases = [
        (
            exchange(&parent.token, &["orders.write"], TOOL),
            Code::InvalidArgument,
            "scopes",
        ),
        (
            pb::ExchangeTokenRequest {
                ttl: secs(3600),
                ..exchange(&parent.token, &[], TOOL)
            },
            Code::InvalidArgument,
            "ttl",
        ),
        (
            pb::ExchangeTokenRequest {
                audience: "billing-api".into(),
                ..exchange(&parent.token, &[], TOOL)
            },
            Code::PermissionDenied,
            "policy line",
        ),
        (
            exchange(&parent.token, &[], "spiffe://example.org/human/alice"),
            Code::PermissionDenied,
            "no delegation rule",
        ),
        (
            exchange(&parent.token, &[], "not-an-id"),
            Code::InvalidArgument,
            "for_identity",
        ),
        (
            exchange("x.y.z", &[], TOOL),
            Code::InvalidArgument,
            "subject_token",
        ),
    ];
    for (req, code, says) in cases {
        let e = agent.exchange_token(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
    assert!(
        children(&mut agent, &id).await.is_empty(),
        "nothing written"
    );

    // Depth: agent -> search -> fetch is two links; a third is refused.
    let (mut search, _) = client(&h, TOOL).await;
    let (mut fetch, _) = client(&h, OTHER_TOOL).await;
    let one = granted(&mut agent, exchange(&parent.token, &[], TOOL)).await;
    let two = granted(&mut search, exchange(&one.token, &[], OTHER_TOOL)).await;
    let e = fetch
        .exchange_token(exchange(&two.token, &[], TOOL))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("loop"), "{}", e.message());
    let metrics = http_get(h.running().http_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("portcullis_token_exchanges_total{outcome=\"granted\"} 2"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_cascade_holds_across_a_restart() {
    let mut h = Harness::start_with(Some(POLICY)).await;
    let (mut agent, _) = client(&h, AGENT).await;
    let parent = grant(&mut agent, ask(&["orders.read"])).await;
    let root = parent.lease.unwrap().id;
    let (mut search, _) = client(&h, TOOL).await;
    let one = granted(&mut agent, exchange(&parent.token, &[], TOOL)).await;
    let two = granted(&mut search, exchange(&one.token, &[], OTHER_TOOL)).await;

    // The tree is durable: after a restart it is still there and live.
    h.restart().await;
    let (mut agent, _) = client(&h, AGENT).await;
    assert_eq!(
        children(&mut agent, &root).await,
        [one.lease.clone().unwrap().id]
    );
    assert!(introspect(&mut agent, &two.token, "").await.active);
    agent
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: root.clone(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    // ... and so is its end.
    h.restart().await;
    let (mut agent, _) = client(&h, AGENT).await;
    for g in [&one, &two] {
        assert!(!introspect(&mut agent, &g.token, "").await.active);
        let l = agent
            .get_lease(pb::GetLeaseRequest {
                lease_id: g.lease.clone().unwrap().id,
            })
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap();
        assert_eq!(l.state, pb::LeaseState::Revoked as i32);
        assert!(l.revoke_reason.contains(&root), "{}", l.revoke_reason);
    }
    h.stop().await;
}

/// PyJWT (`PORTCULLIS_TEST_PYTHON`, a Python with `pyjwt[crypto]`, which
/// `.ci/test` makes) verifies a delegated, bound token from the JWKS.
#[tokio::test]
async fn pyjwt_verifies_the_act_chain_and_the_binding_from_the_jwks() {
    let Ok(python) = std::env::var("PORTCULLIS_TEST_PYTHON") else {
        eprintln!(
            "SKIPPED: pyjwt_verifies_the_act_chain_and_the_binding_from_the_jwks needs PORTCULLIS_TEST_PYTHON (a Python with pyjwt[crypto]; `.ci/test` makes one)"
        );
        return;
    };
    let h = Harness::start_with(Some(POLICY)).await;
    let (mut agent, _) = client(&h, AGENT).await;
    let (mut search, search_pem) = client(&h, TOOL).await;
    let parent = grant(&mut agent, ask(&["orders.read", "orders.write"])).await;
    let one = granted(&mut agent, exchange(&parent.token, &["orders.read"], TOOL)).await;
    // The tool narrows its own token for itself: bound scopes need none.
    let two = granted(&mut search, exchange(&one.token, &[], "")).await;
    let Outcome::Pending(r) =
        exchanged(&mut agent, exchange(&parent.token, &["orders.write"], TOOL)).await
    else {
        panic!("pickup expected")
    };
    let bound = search
        .get_request(pb::GetRequestRequest { request_id: r.id })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();

    let addr = h.running().http_addr.unwrap();
    let jwks = h.dir.path().join("jwks.json");
    std::fs::write(&jwks, http_get(addr, "/.well-known/jwks.json").await).unwrap();
    let issuer = h.running().engine.issuer().to_owned();
    let verify = |token: &str, aud: &str| {
        let out = std::process::Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/verify_jwt.py"))
            .args([
                jwks.to_str().unwrap(),
                token,
                &issuer,
                aud,
                search_pem.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = verify(&two.token, "portcullis");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["claims"]["sub"], TOOL);
    assert_eq!(v["claims"]["act"]["sub"], TOOL);
    assert_eq!(v["claims"]["act"]["act"]["sub"], AGENT);
    assert!(v["claims"]["act"]["act"].get("act").is_none());

    let (ok, out, err) = verify(&bound.token, "portcullis");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["claims"]["act"]["sub"], AGENT);
    assert_eq!(
        v["claims"]["cnf"]["x5t#S256"], v["cert_x5t_s256"],
        "bound to the certificate the tool presented, as Python computes it"
    );

    // The same library refuses a token whose claims were changed.
    let mut parts: Vec<String> = bound.token.split('.').map(str::to_owned).collect();
    let mut claims = part(&bound.token, 1);
    claims["cnf"]["x5t#S256"] = "forged".into();
    use base64::Engine as _;
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&claims).unwrap());
    let (ok, _, err) = verify(&parts.join("."), "portcullis");
    assert!(!ok && err.contains("InvalidSignatureError"), "{err}");
    h.stop().await;
}

/// Issue 21, finding 3, on a real broker: children waiting for their
/// recipient count against the holder who asked, so one holder cannot fill
/// a recipient's open-request quota; a lease has at most
/// `children_per_lease` children.
#[tokio::test]
async fn i21_03_a_holder_fills_only_its_own_quota_and_children_are_bounded() {
    let policy = format!(
        "{POLICY}
[[scope]]
name = \"tools.admin\"
tier = \"approval\"
workloads = [\"spiffe://example.org/tool/*\"]
approvers = [\"approvers\"]
default_ttl = \"5m\"
"
    );
    let mut h = Harness::start_with(Some(&policy)).await;
    h.restart_with(|cfg| {
        cfg.limits.open_requests_per_identity = 2;
        cfg.limits.children_per_lease = 3;
    })
    .await;
    let (mut agent, _) = client(&h, AGENT).await;
    let (mut tool, _) = client(&h, TOOL).await;
    // Bound children for the tool wait for it to collect them: open
    // requests the agent made.
    let parent = grant(&mut agent, ask(&["orders.write"])).await;
    for _ in 0..2 {
        let out = exchanged(&mut agent, exchange(&parent.token, &["orders.write"], TOOL)).await;
        assert!(matches!(out, Outcome::Pending(_)), "{out:?}");
    }
    let e = agent
        .exchange_token(exchange(&parent.token, &["orders.write"], TOOL))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // ...and not the tool's: its own request still parks.
    let own = tool.request_token(ask(&["tools.admin"])).await.unwrap();
    assert!(
        matches!(
            own.into_inner().outcome,
            Some(Outcome::Pending(ref r)) if r.state == pb::RequestState::Pending as i32
        ),
        "the recipient's quota was filled by the holder"
    );

    // At most three children per lease, the fourth refused naming the bound.
    let parent = grant(&mut agent, ask(&["orders.read"])).await;
    for _ in 0..3 {
        granted(&mut agent, exchange(&parent.token, &["orders.read"], TOOL)).await;
    }
    let e = agent
        .exchange_token(exchange(&parent.token, &["orders.read"], TOOL))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("delegated leases"), "{}", e.message());
    let id = parent.lease.unwrap().id;
    assert_eq!(children(&mut agent, &id).await.len(), 3);
    h.stop().await;
}

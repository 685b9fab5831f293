// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
//! Unit tests of `engine::exchange`.

use std::time::Duration;

use super::super::testing::{T0, id, rig};
use super::super::{EngineError, Holder, Outcome, TokenAsk};
use super::ExchangeAsk;
use crate::model::{LeaseState, RequestState};
use crate::token;

const POLICY: &str = r#"
[broker]
admins = ["admins"]
[groups]
owners = ["spiffe://t/human/alice", "spiffe://t/human/bob", "spiffe://t/agent/a"]
admins = ["spiffe://t/human/root"]
[[scope]]
name = "read"
tier = "auto"
workloads = ["spiffe://t/agent/*"]
default_ttl = "5m"
max_ttl = "1h"
[[scope]]
name = "write"
tier = "auto"
workloads = ["spiffe://t/agent/*"]
bind = "mtls"
[[scope]]
name = "admin"
tier = "approval"
workloads = ["spiffe://t/agent/*"]
approvers = ["owners"]
max_ttl = "15m"
break_glass = { allowed = true, max_ttl = "5m" }
[[scope]]
name = "deploy"
tier = "approval"
workloads = ["spiffe://t/agent/*"]
approvers = ["owners"]
[[delegation]]
from = ["spiffe://t/agent/*"]
to = ["spiffe://t/tool/*", "spiffe://t/agent/*"]
scopes = ["read", "write", "admin"]
max_depth = 2
audiences = ["orders-api"]
[[delegation]]
from = ["spiffe://t/tool/*"]
to = ["spiffe://t/tool/*", "spiffe://t/agent/*"]
scopes = ["read"]
max_depth = 2
[[delegation]]
from = ["spiffe://t/agent/*"]
to = ["spiffe://t/tool/*"]
scopes = ["deploy"]
approval = "again"
"#;

fn holder(who: &str, cert: &str) -> Holder {
    Holder {
        who: id(who),
        x5t: Some(cert.to_owned()),
    }
}

fn agent() -> Holder {
    holder("spiffe://t/agent/a", "AGENT-CERT")
}

fn tool() -> Holder {
    holder("spiffe://t/tool/t", "TOOL-CERT")
}

/// The agent's token and lease for `scopes` (granted at once).
async fn root(r: &super::super::testing::Rig, scopes: &[&str]) -> (String, crate::model::Lease) {
    let ask = TokenAsk {
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl: Some(Duration::from_secs(600)),
        x5t: agent().x5t,
        break_glass: scopes.contains(&"admin"),
        justification: "incident 7".into(),
        ..Default::default()
    };
    match r.engine.request_token(&agent().who, ask).await.unwrap() {
        Outcome::Granted { token, lease, .. } => (token, lease),
        Outcome::Parked(_) => panic!("parked"),
    }
}

/// The agent's `deploy` token and lease: parked, approved by alice, claimed.
async fn approved_deploy(r: &super::super::testing::Rig) -> (String, crate::model::Lease) {
    let ask = TokenAsk {
        scopes: vec!["deploy".into()],
        justification: "release 7".into(),
        ..Default::default()
    };
    let Outcome::Parked(req) = r.engine.request_token(&agent().who, ask).await.unwrap() else {
        panic!("granted")
    };
    let alice = id("spiffe://t/human/alice");
    r.engine
        .approve(&alice, &req.id, "", None, "")
        .await
        .unwrap();
    let (_, got) = r.engine.read_and_claim(&agent(), &req.id).await.unwrap();
    let (token, lease, _) = got.unwrap();
    (token, lease)
}

fn exchange(tok: &str, scopes: &[&str], for_identity: &str) -> ExchangeAsk {
    ExchangeAsk {
        subject_token: tok.to_owned(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        for_identity: for_identity.to_owned(),
        // What a parked exchange tells its approvers.
        justification: "task 7".into(),
        ..Default::default()
    }
}

fn granted(o: Outcome) -> (String, crate::model::Lease) {
    match o {
        Outcome::Granted { token, lease, .. } => (token, lease),
        Outcome::Parked(r) => panic!("parked: {r:?}"),
    }
}

fn field_of(e: &EngineError) -> &'static str {
    match e {
        EngineError::Invalid(f) => f.field,
        other => panic!("not a field error: {other}"),
    }
}

#[tokio::test]
async fn a_child_is_narrower_shorter_and_carries_the_chain() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["read", "write"]).await;
    r.clock.advance(Duration::from_secs(60));
    let ask = ExchangeAsk {
        ttl: Some(Duration::from_secs(120)),
        audience: "orders-api".into(),
        ..exchange(&tok, &["read"], "spiffe://t/tool/t")
    };
    let (child_tok, child) = granted(r.engine.exchange(&agent(), ask).await.unwrap());
    assert_eq!(child.subject, "spiffe://t/tool/t");
    assert_eq!(child.client_id, "spiffe://t/agent/a");
    assert_eq!(child.scopes, ["read"]);
    assert_eq!(child.audience, "orders-api");
    assert_eq!(child.expires_at, T0 + 180_000);
    assert!(child.max_expires_at <= parent.max_expires_at);
    let d = child.delegation.clone().unwrap();
    assert_eq!((d.parent_id.as_str(), d.depth), (parent.id.as_str(), 1));
    assert_eq!(d.actors, ["spiffe://t/agent/a"]);
    assert_eq!(child.cnf, None, "read does not bind");
    assert_eq!(
        r.store.children(&parent.id, None, 10).await.unwrap(),
        std::slice::from_ref(&child.id)
    );
    let claims = token::unverified_claims(&child_tok).unwrap();
    assert_eq!(claims.act.unwrap().flatten(), ["spiffe://t/agent/a"]);
    assert!(r.engine.introspect(&child_tok).await.unwrap().is_some());

    // The tool hands a part on again: the chain grows, nearest first.
    let (grand_tok, grand) = granted(
        r.engine
            .exchange(&tool(), exchange(&child_tok, &[], "spiffe://t/tool/u"))
            .await
            .unwrap(),
    );
    let d = grand.delegation.unwrap();
    assert_eq!(d.depth, 2);
    assert_eq!(d.actors, ["spiffe://t/tool/t", "spiffe://t/agent/a"]);
    assert_eq!(grand.expires_at, child.expires_at, "never past its parent");
    let act = token::unverified_claims(&grand_tok).unwrap().act.unwrap();
    assert_eq!(act.sub, "spiffe://t/tool/t");
    assert_eq!(act.act.unwrap().sub, "spiffe://t/agent/a");

    // Ending the root ends the tree; introspection says so at once.
    r.engine
        .revoke(&agent().who, &parent.id, "task done")
        .await
        .unwrap();
    for t in [&child_tok, &grand_tok] {
        assert!(r.engine.introspect(t).await.unwrap().is_none());
    }
    assert_eq!(
        r.store.lease(&grand.id).await.unwrap().unwrap().state,
        LeaseState::Revoked
    );
}

#[tokio::test]
async fn every_widening_and_every_bad_subject_is_refused_naming_the_field() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["read"]).await;
    let to = "spiffe://t/tool/t";
    let leases_before = r.store.leases_of(to, None, 100).await.unwrap().len();
    let cases: Vec<(ExchangeAsk, Holder, &str)> = vec![
        (exchange(&tok, &["write"], to), agent(), "scopes"),
        (
            ExchangeAsk {
                ttl: Some(Duration::from_secs(601)),
                ..exchange(&tok, &[], to)
            },
            agent(),
            "ttl",
        ),
        (exchange(&tok, &[], to), tool(), "subject_token"),
        (exchange("", &[], to), agent(), "subject_token"),
        (exchange("a.b.c", &[], to), agent(), "subject_token"),
        (exchange(&tok, &[], "https://t/x"), agent(), "for_identity"),
        (exchange(&tok, &["bad scope"], to), agent(), "scopes"),
    ];
    for (ask, who, field) in cases {
        let e = r.engine.exchange(&who, ask).await.unwrap_err();
        assert_eq!(field_of(&e), field, "{e}");
    }
    assert_eq!(
        r.store.leases_of(to, None, 100).await.unwrap().len(),
        leases_before,
        "nothing was written"
    );
    assert!(
        r.store
            .children(&parent.id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A revoked or expired subject token is not active.
    r.clock.advance(Duration::from_secs(601));
    let e = r
        .engine
        .exchange(&agent(), exchange(&tok, &[], to))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "subject_token");
}

#[tokio::test]
async fn policy_refusals_name_the_rule_and_write_nothing() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["read"]).await;
    let to = "spiffe://t/tool/t";
    let e = r
        .engine
        .exchange(
            &agent(),
            ExchangeAsk {
                audience: "elsewhere".into(),
                ..exchange(&tok, &[], to)
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::Refused(f) if f.reason.contains("policy line")),
        "{e}"
    );
    let e = r
        .engine
        .exchange(&agent(), exchange(&tok, &[], "spiffe://t/other/x"))
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::Refused(_)), "{e}");
    assert!(r.store.leases_of(to, None, 100).await.unwrap().is_empty());
    assert!(
        r.store
            .children(&parent.id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let refused = super::super::testing::actions(r.store.as_ref())
        .await
        .iter()
        .filter(|a| a.as_str() == "token.exchange_refused")
        .count();
    assert_eq!(refused, 2, "each refusal is in the trail");
}

#[tokio::test]
async fn chains_stop_at_their_depth_and_never_loop() {
    let r = rig(POLICY).await;
    let (tok, _) = root(&r, &["read"]).await;
    let (t1, _) = granted(
        r.engine
            .exchange(&agent(), exchange(&tok, &[], "spiffe://t/tool/t"))
            .await
            .unwrap(),
    );
    // Back to the agent it came from: a loop.
    let e = r
        .engine
        .exchange(&tool(), exchange(&t1, &[], "spiffe://t/agent/a"))
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "for_identity");
    let (t2, _) = granted(
        r.engine
            .exchange(&tool(), exchange(&t1, &[], "spiffe://t/tool/u"))
            .await
            .unwrap(),
    );
    let e = r
        .engine
        .exchange(
            &holder("spiffe://t/tool/u", "U"),
            exchange(&t2, &[], "spiffe://t/tool/v"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::Refused(f) if f.reason.contains("chain of 3")),
        "{e}"
    );
}

#[tokio::test]
async fn a_bound_token_moves_only_with_its_certificate_and_children_bind_to_theirs() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["read", "write"]).await;
    assert_eq!(parent.cnf.as_deref(), Some("AGENT-CERT"));
    let claims = token::unverified_claims(&tok).unwrap();
    assert_eq!(claims.cnf.unwrap().x5t_s256, "AGENT-CERT");

    // The same identity with another certificate: refused.
    let e = r
        .engine
        .exchange(
            &holder("spiffe://t/agent/a", "STOLEN"),
            exchange(&tok, &[], ""),
        )
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "subject_token");

    // For itself: bound to its own certificate at once.
    let (_, mine) = granted(
        r.engine
            .exchange(&agent(), exchange(&tok, &["write"], ""))
            .await
            .unwrap(),
    );
    assert_eq!(mine.cnf.as_deref(), Some("AGENT-CERT"));

    // For the tool: left for the tool to collect with its own certificate.
    let out = r
        .engine
        .exchange(&agent(), exchange(&tok, &["write"], "spiffe://t/tool/t"))
        .await
        .unwrap();
    let Outcome::Parked(req) = out else {
        panic!("granted without the tool's certificate")
    };
    assert_eq!(req.state, RequestState::Approved);
    assert_eq!(req.requester, "spiffe://t/tool/t");
    // The agent follows it but cannot collect it.
    let (seen, none) = r.engine.read_and_claim(&agent(), &req.id).await.unwrap();
    assert_eq!(seen.id, req.id);
    assert!(none.is_none());
    let (_, got) = r.engine.read_and_claim(&tool(), &req.id).await.unwrap();
    let (tool_tok, lease, _) = got.unwrap();
    assert_eq!(lease.cnf.as_deref(), Some("TOOL-CERT"));
    assert_eq!(lease.delegation.as_ref().unwrap().parent_id, parent.id);
    assert!(lease.expires_at <= parent.expires_at);
    let act = token::unverified_claims(&tool_tok).unwrap().act.unwrap();
    assert_eq!(act.sub, "spiffe://t/agent/a");
    assert_eq!(
        r.store.children(&parent.id, None, 10).await.unwrap().len(),
        2,
        "both children hang from the parent"
    );
}

#[tokio::test]
async fn a_rule_that_asks_again_parks_the_exchange_for_approvers() {
    let r = rig(POLICY).await;
    // The agent's own deploy token, approved by alice.
    let (tok, parent) = approved_deploy(&r).await;

    let parked = |e: Result<Outcome, EngineError>| match e.unwrap() {
        Outcome::Parked(r) => r,
        Outcome::Granted { .. } => panic!("granted without approval"),
    };
    let to = "spiffe://t/tool/t";
    let req = parked(r.engine.exchange(&agent(), exchange(&tok, &[], to)).await);
    assert_eq!(req.state, RequestState::Pending);
    assert_eq!(
        req.delegation.as_ref().unwrap().actors,
        ["spiffe://t/agent/a"]
    );
    // The agent is an owner, but acts in the chain: it cannot approve.
    let e = r
        .engine
        .approve(&agent().who, &req.id, "", None, "")
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::NotAllowed(_)), "{e}");
    let bob = id("spiffe://t/human/bob");
    r.engine
        .approve(&bob, &req.id, "ok", None, "")
        .await
        .unwrap();
    let (_, got) = r.engine.read_and_claim(&tool(), &req.id).await.unwrap();
    let (_, child, _) = got.unwrap();
    assert_eq!(child.approved_by, ["spiffe://t/human/bob"]);
    assert_eq!(child.delegation.unwrap().parent_id, parent.id);

    // Denied: nothing is issued.
    let req = parked(r.engine.exchange(&agent(), exchange(&tok, &[], to)).await);
    r.engine.deny(&bob, &req.id, "not today").await.unwrap();
    let (seen, got) = r.engine.read_and_claim(&tool(), &req.id).await.unwrap();
    assert_eq!(seen.state, RequestState::Denied);
    assert!(got.is_none());
    assert_eq!(
        r.store.children(&parent.id, None, 10).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn a_break_glass_child_stays_break_glass_and_within_the_grant() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["admin"]).await;
    assert!(parent.break_glass);
    let ask = ExchangeAsk {
        ttl: Some(Duration::from_secs(3600)),
        ..exchange(&tok, &[], "spiffe://t/tool/t")
    };
    let e = r.engine.exchange(&agent(), ask).await.unwrap_err();
    assert_eq!(field_of(&e), "ttl", "no longer than the capped grant");
    let (child_tok, child) = granted(
        r.engine
            .exchange(&agent(), exchange(&tok, &[], "spiffe://t/tool/t"))
            .await
            .unwrap(),
    );
    assert!(child.break_glass);
    assert!(child.expires_at <= parent.expires_at);
    assert!(token::unverified_claims(&child_tok).unwrap().break_glass);
}

#[tokio::test]
async fn a_child_renews_only_within_its_parent_and_retries_are_idempotent() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["read"]).await;
    let ask = ExchangeAsk {
        client_request_id: "job-1".into(),
        ttl: Some(Duration::from_secs(60)),
        ..exchange(&tok, &[], "spiffe://t/tool/t")
    };
    let (_, first) = granted(r.engine.exchange(&agent(), ask.clone()).await.unwrap());
    let (_, again) = granted(r.engine.exchange(&agent(), ask.clone()).await.unwrap());
    assert_eq!(first.id, again.id, "one lease for one key");
    let other = ExchangeAsk {
        scopes: vec!["read".into()],
        ttl: Some(Duration::from_secs(30)),
        ..ask
    };
    let e = r.engine.exchange(&agent(), other).await.unwrap_err();
    assert!(matches!(e, EngineError::IdempotencyConflict), "{e}");

    r.clock.advance(Duration::from_secs(30));
    let (_, renewed) = r
        .engine
        .renew(&tool().who, &first.id, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(
        renewed.expires_at, parent.expires_at,
        "capped by the parent"
    );
}

#[tokio::test]
async fn a_break_glass_review_that_revokes_ends_what_was_delegated_from_it() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["admin"]).await;
    let (child_tok, child) = granted(
        r.engine
            .exchange(&agent(), exchange(&tok, &[], "spiffe://t/tool/t"))
            .await
            .unwrap(),
    );
    let alice = id("spiffe://t/human/alice");
    r.engine
        .acknowledge(
            &alice,
            parent.request_id.as_deref().unwrap(),
            "not an incident",
            true,
        )
        .await
        .unwrap();
    let after = r.store.lease(&child.id).await.unwrap().unwrap();
    assert_eq!(after.state, LeaseState::Revoked);
    assert!(r.engine.introspect(&child_tok).await.unwrap().is_none());
    assert!(r.engine.introspect(&tok).await.unwrap().is_none());
}

#[tokio::test]
async fn a_parent_that_ends_first_leaves_no_child_running() {
    let r = rig(POLICY).await;
    let (tok, parent) = root(&r, &["read"]).await;
    let ask = ExchangeAsk {
        ttl: Some(Duration::from_secs(300)),
        ..exchange(&tok, &[], "spiffe://t/tool/t")
    };
    let (child_tok, child) = granted(r.engine.exchange(&agent(), ask).await.unwrap());
    // The agent renews its own lease shorter than the child it handed on.
    let (_, short) = r
        .engine
        .renew(&agent().who, &parent.id, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(short.expires_at < child.expires_at);
    r.clock.advance(Duration::from_secs(61));

    // Before the expiry sweep runs, the orphan is already inactive and
    // cannot be renewed.
    assert!(r.engine.introspect(&child_tok).await.unwrap().is_none());
    let e = r
        .engine
        .renew(&tool().who, &child.id, None)
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::WrongState(_)), "{e}");

    // The sweep expires the parent and revokes the child in the same batch.
    r.engine.expire_due(T0 + 61_000).await.unwrap();
    assert_eq!(
        r.store.lease(&parent.id).await.unwrap().unwrap().state,
        LeaseState::Expired
    );
    let after = r.store.lease(&child.id).await.unwrap().unwrap();
    assert_eq!(after.state, LeaseState::Revoked);
    assert!(
        after
            .revoke_reason
            .as_deref()
            .unwrap_or("")
            .contains("expired"),
        "{after:?}"
    );
}

/// Issue 21, finding 3: parked exchanges count against the holder who asks
/// for them, not the recipient: one holder cannot fill another identity's
/// open-request quota.
#[tokio::test]
async fn parked_exchanges_count_against_the_holder_not_the_recipient() {
    const QUOTA: &str = r#"
[groups]
owners = ["spiffe://t/human/alice"]
[[scope]]
name = "deploy"
tier = "approval"
workloads = ["spiffe://t/agent/*"]
approvers = ["owners"]
[[delegation]]
from = ["spiffe://t/agent/*"]
to = ["spiffe://t/agent/*"]
scopes = ["deploy"]
approval = "again"
"#;
    let r = rig(QUOTA).await;
    let (tok, _) = approved_deploy(&r).await;
    let victim = "spiffe://t/agent/victim";
    let limit = super::super::Limits::default().open_requests_per_identity;
    for _ in 0..limit {
        let out = r
            .engine
            .exchange(&agent(), exchange(&tok, &[], victim))
            .await;
        assert!(matches!(out, Ok(Outcome::Parked(_))), "{out:?}");
    }
    let over = r
        .engine
        .exchange(&agent(), exchange(&tok, &[], victim))
        .await;
    assert!(matches!(over, Err(EngineError::Exhausted(_))), "{over:?}");
    // The recipient's own request is not refused for the holder's.
    let deploy = TokenAsk {
        scopes: vec!["deploy".into()],
        justification: "release 8".into(),
        ..Default::default()
    };
    let own = r.engine.request_token(&id(victim), deploy).await;
    assert!(matches!(own, Ok(Outcome::Parked(_))), "{own:?}");
}

/// Issue 21, finding 3: one identity's exchanges are rate-limited, and one
/// lease has a bounded number of children over its life.
#[tokio::test]
async fn exchanges_are_rate_limited_and_children_per_lease_bounded() {
    let limits = super::super::Limits {
        exchanges: super::super::Rate {
            burst: 3,
            per_minute: 60,
        },
        children_per_lease: 4,
        ..Default::default()
    };
    let store = std::sync::Arc::new(crate::store::mem::MemStore::new());
    let r = super::super::testing::rig_limited(store, POLICY, limits).await;
    let (tok, parent) = root(&r, &["read"]).await;
    let ask = || exchange(&tok, &["read"], "spiffe://t/tool/t");
    for _ in 0..3 {
        granted(r.engine.exchange(&agent(), ask()).await.unwrap());
    }
    let e = r.engine.exchange(&agent(), ask()).await.unwrap_err();
    assert!(matches!(e, EngineError::Exhausted(_)), "{e:?}");
    assert!(e.to_string().contains("try again in 1 s"), "{e}");
    // A second later, one more.
    r.clock.advance(Duration::from_secs(1));
    granted(r.engine.exchange(&agent(), ask()).await.unwrap());
    // Four children had: the fifth is refused, however slowly asked.
    r.clock.advance(Duration::from_secs(60));
    let e = r.engine.exchange(&agent(), ask()).await.unwrap_err();
    assert!(matches!(e, EngineError::Exhausted(_)), "{e:?}");
    assert!(e.to_string().contains(&parent.id), "{e}");
    // Another lease of the same holder has its own.
    let (other, _) = root(&r, &["read"]).await;
    granted(
        r.engine
            .exchange(&agent(), exchange(&other, &["read"], "spiffe://t/tool/t"))
            .await
            .unwrap(),
    );
}

// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
//! Unit tests of `engine::approvals`.

use super::*;
use crate::engine::Outcome;
use crate::engine::testing::{POLICY, actions, ask, id, parked, rig, workload};
use crate::model::LeaseState;

#[tokio::test]
async fn two_distinct_approvers_then_exactly_one_claim() {
    let r = rig(POLICY).await;
    let req = parked(&r, &["admin"]).await;
    let (alice, bob) = (id("spiffe://t/human/alice"), id("spiffe://t/human/bob"));
    let one = r
        .engine
        .approve(&alice, &req.id, "", None, "")
        .await
        .unwrap();
    assert_eq!(one.state, RequestState::Pending);
    let err = r
        .engine
        .approve(&alice, &req.id, "", None, "")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Duplicate(_)), "{err}");
    let err = r
        .engine
        .approve(&workload(), &req.id, "", None, "")
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::NotAllowed(_)),
        "self-approval: {err}"
    );
    let two = r
        .engine
        .approve(&bob, &req.id, "", Some(Duration::from_secs(60)), "")
        .await
        .unwrap();
    assert_eq!(two.state, RequestState::Approved);
    let w = workload();
    let claim = |who| r.engine.claim(who, None, &req.id);
    assert!(claim(&bob).await.unwrap().is_none(), "not the requester");
    let (_, lease, issued, _) = claim(&w).await.unwrap().unwrap();
    assert_eq!(issued.state, RequestState::Issued);
    assert_eq!(lease.ttl_ms, 60_000, "the shortest approved TTL");
    assert_eq!(
        lease.approved_by,
        ["spiffe://t/human/alice", "spiffe://t/human/bob"]
    );
    assert!(claim(&w).await.unwrap().is_none(), "only once");
    assert_eq!(
        actions(r.store.as_ref()).await,
        [
            "request.parked",
            "request.approval",
            // the requester's attempt on its own request (issue 27, item 6)
            "request.decision_refused",
            "request.approved",
            "request.issued"
        ]
    );
}

#[tokio::test]
async fn a_digest_mismatch_or_a_stranger_changes_nothing() {
    let r = rig(POLICY).await;
    let req = parked(&r, &["admin"]).await;
    let alice = id("spiffe://t/human/alice");
    let err = r
        .engine
        .approve(&alice, &req.id, "", None, "bad")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongState(_)));
    let err = r
        .engine
        .deny(&id("spiffe://t/human/eve"), &req.id, "no")
        .await
        .unwrap_err();
    // Someone who may not see it is told it does not exist (issue 9).
    assert!(matches!(err, EngineError::NotFound { .. }), "{err}");
    let root = id("spiffe://t/human/root");
    let err = r.engine.deny(&root, &req.id, "no").await.unwrap_err();
    assert!(
        matches!(err, EngineError::NotAllowed(_)),
        "an admin sees it: {err}"
    );
    let err = r.engine.deny(&alice, &req.id, " ").await.unwrap_err();
    assert!(matches!(err, EngineError::Invalid(ref f) if f.field == "reason"));
    assert_eq!(r.store.request(&req.id).await.unwrap().unwrap(), req);
    let denied = r.engine.deny(&alice, &req.id, "no").await.unwrap();
    assert_eq!(denied.state, RequestState::Denied);
}

#[tokio::test]
async fn acknowledging_break_glass_can_revoke_and_needs_a_review_pending() {
    let r = rig(POLICY).await;
    let mut a = ask(&["admin"]);
    a.break_glass = true;
    a.justification = "pager".into();
    let Outcome::Granted { lease, .. } = r.engine.request_token(&workload(), a).await.unwrap()
    else {
        panic!()
    };
    let rid = lease.request_id.clone().unwrap();
    let alice = id("spiffe://t/human/alice");
    let parked = parked(&r, &["admin"]).await;
    let err = r
        .engine
        .acknowledge(&alice, &parked.id, "x", true)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongState(_)));
    let (pending, _) = r.engine.list_pending(&alice, 0, "").await.unwrap();
    assert_eq!(pending.len(), 2, "the parked request and the review");
    let reviewed = r
        .engine
        .acknowledge(&alice, &rid, "misuse", true)
        .await
        .unwrap();
    assert!(!reviewed.review_pending);
    assert_eq!(
        r.store.lease(&lease.id).await.unwrap().unwrap().state,
        LeaseState::Revoked
    );
}

#[tokio::test]
async fn decisions_after_the_deadline_are_refused_without_the_sweep() {
    let r = rig(POLICY).await;
    let req = parked(&r, &["admin"]).await;
    // No expiry task runs in a rig: only the decision-time check stands.
    r.clock.advance(std::time::Duration::from_millis(
        req.deadline - r.store.request(&req.id).await.unwrap().unwrap().created_at,
    ));
    let alice = id("spiffe://t/human/alice");
    let err = r
        .engine
        .approve(&alice, &req.id, "", None, "")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongState(_)), "{err}");
    let err = r.engine.deny(&alice, &req.id, "late").await.unwrap_err();
    assert!(matches!(err, EngineError::WrongState(_)), "{err}");
    let err = r
        .engine
        .withdraw_request(&workload(), &req.id, "")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongState(_)), "{err}");
    assert_eq!(
        r.store.request(&req.id).await.unwrap().unwrap(),
        req,
        "nothing changed"
    );
}

/// Issue 13 review: a person with a certificate and a console sign-in is
/// one approver — never two of a two-person rule, never their own.
#[tokio::test]
async fn one_person_with_two_identities_is_one_approver() {
    let policy = POLICY
        .replace(
            r#"owners = ["spiffe://t/human/alice", "spiffe://t/human/bob", "spiffe://t/w"]"#,
            r#"owners = ["spiffe://t/human/alice", "oidc:alice@example.org", "oidc:w@example.org", "spiffe://t/human/bob"]"#,
        )
        .replacen(
            "[[scope]]",
            "[people]\nalice = [\"spiffe://t/human/alice\", \"oidc:alice@example.org\"]\nw = [\"spiffe://t/w\", \"oidc:w@example.org\"]\n[[scope]]",
            1,
        );
    let r = rig(&policy).await;
    let req = parked(&r, &["admin"]).await;
    let alice_cert = id("spiffe://t/human/alice");
    let alice_sso = crate::identity::Identity::person("alice@example.org").unwrap();
    let w_sso = crate::identity::Identity::person("w@example.org").unwrap();
    // The requester, signed in another way, may not decide or even see it
    // in the list of what it may decide.
    let (mine, _) = r.engine.list_pending(&w_sso, 50, "").await.unwrap();
    assert!(mine.is_empty());
    let err = r
        .engine
        .approve(&w_sso, &req.id, "", None, "")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::NotAllowed(_)), "{err}");
    // Alice counts once, however she signs in.
    r.engine
        .approve(&alice_cert, &req.id, "", None, "")
        .await
        .unwrap();
    let (left, _) = r.engine.list_pending(&alice_sso, 50, "").await.unwrap();
    assert!(left.is_empty(), "already approved as her certificate");
    let err = r
        .engine
        .approve(&alice_sso, &req.id, "", None, "")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Duplicate(_)), "{err}");
    let still = r.store.request(&req.id).await.unwrap().unwrap();
    assert_eq!(still.state, RequestState::Pending);
    assert_eq!(still.approvals.len(), 1);
}

/// Issue 21, finding 7: the claim window of a request for two approval
/// scopes is the shorter one's, whichever approver decides last.
#[tokio::test]
async fn the_claim_window_is_the_requests_whoever_approves_last() {
    const TWO: &str = r#"
[groups]
a = ["spiffe://t/human/alice"]
b = ["spiffe://t/human/bob"]
[[scope]]
name = "long"
tier = "approval"
workloads = ["spiffe://t/w"]
approvers = ["a"]
claim_ttl = "1h"
[[scope]]
name = "short"
tier = "approval"
workloads = ["spiffe://t/w"]
approvers = ["b"]
claim_ttl = "5m"
"#;
    let (alice, bob) = (id("spiffe://t/human/alice"), id("spiffe://t/human/bob"));
    for order in [[&alice, &bob], [&bob, &alice]] {
        let r = rig(TWO).await;
        let req = parked(&r, &["long", "short"]).await;
        let mut last = None;
        for who in order {
            last = Some(r.engine.approve(who, &req.id, "", None, "").await.unwrap());
        }
        let approved = last.unwrap();
        assert_eq!(approved.state, RequestState::Approved);
        let now = crate::clock::Clock::now(r.clock.as_ref());
        assert_eq!(
            approved.deadline,
            now + 300_000,
            "last approver {}: the shorter window",
            order[1]
        );
    }
}

//! Human approval over real mTLS: N-of-M, rules, lifecycle, exactly-once
//! delivery, restart, notifications, break-glass.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::time::Duration;

use common::*;
use portcullis::dev::{APPROVER, As, WORKLOAD};
use portcullis::pb;
use portcullis::pb::approvals_client::ApprovalsClient;
use portcullis::pb::broker_client::BrokerClient;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

const BOB: &str = "spiffe://portcullis.dev/human/bob";
const CAROL: &str = "spiffe://portcullis.dev/human/carol";
const DAVE: &str = "spiffe://portcullis.dev/human/dave";

fn policy(hook_port: u16) -> String {
    format!(
        r#"
[broker]
default_audience = "test"
admins = ["admins"]

[groups]
db-owners = ["{APPROVER}", "{BOB}", "{CAROL}"]
sec = ["{DAVE}"]
admins = ["spiffe://portcullis.dev/human/root-oncall"]
self-service = ["{WORKLOAD}", "{APPROVER}"]

[[scope]]
name = "orders.read"
tier = "auto"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]

[[scope]]
name = "orders.admin"
description = "change or delete any order"
tier = "approval"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
approvers = ["db-owners"]
approvals_required = 2
pending_ttl = "30m"
claim_ttl = "10m"
max_ttl = "15m"

[[scope]]
name = "keys.rotate"
tier = "approval"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
approvers = ["sec"]
require_approval_reason = true
max_ttl = "10m"

[[scope]]
name = "self.service"
tier = "approval"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
approvers = ["self-service"]
require_justification = false

[[scope]]
name = "db.break"
tier = "approval"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
approvers = ["db-owners"]
max_ttl = "1h"
break_glass = {{ allowed = true, max_ttl = "5m" }}

[[webhook]]
url = "http://127.0.0.1:{hook_port}/hook"

[[webhook]]
url = "http://127.0.0.1:{hook_port}/slack"
format = "slack"
events = ["parked", "break_glass"]
"#
    )
}

struct World {
    h: Harness,
    hooks: mpsc::UnboundedReceiver<(String, String)>,
}

async fn world() -> World {
    let (port, hooks) = receiver().await;
    let h = Harness::start_with(Some(&policy(port))).await;
    World { h, hooks }
}

async fn approvals(h: &Harness, uri: &str) -> ApprovalsClient<Channel> {
    ApprovalsClient::new(h.channel_for(uri).await)
}

fn approve(id: &str, reason: &str) -> pb::ApproveRequest {
    pb::ApproveRequest {
        request_id: id.into(),
        reason: reason.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn one_approval_flow_delivers_the_token_through_watch_once() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["keys.rotate"]).await;
    let mut stream = c
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream
            .message()
            .await
            .unwrap()
            .unwrap()
            .request
            .unwrap()
            .state,
        pb::RequestState::Pending as i32
    );

    let mut dave = approvals(&w.h, DAVE).await;
    // The dave view shows everything needed to decide.
    let listed = dave
        .list_pending(pb::ListPendingRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].justification, "ticket 7");
    assert_eq!(
        listed[0].waiting_for[0].rule,
        "scope `keys.rotate` (policy line 28)"
    );
    let e = dave.approve(approve(&req.id, "")).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("reason")),
        (Code::InvalidArgument, true),
        "policy requires a reason"
    );
    let e = dave
        .approve(pb::ApproveRequest {
            digest: "0".repeat(64),
            ..approve(&req.id, "rotation ticket")
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "digest of what was reviewed must match"
    );
    let done = dave
        .approve(pb::ApproveRequest {
            digest: req.digest.clone(),
            ..approve(&req.id, "rotation ticket")
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(done.state, pb::RequestState::Approved as i32);

    let msg = stream.message().await.unwrap().unwrap();
    let grant = msg.grant.expect("the watcher receives the token");
    assert_eq!(msg.request.unwrap().state, pb::RequestState::Issued as i32);
    let claims = part(&grant.token, 1);
    assert_eq!(claims["scope"], "keys.rotate");
    assert_eq!(claims["approved_by"], serde_json::json!([DAVE]));
    let lease = grant.lease.unwrap();
    assert_eq!(lease.request_id, req.id);
    assert_eq!(lease.approved_by, [DAVE]);
    assert!(
        c.introspect(pb::IntrospectRequest {
            token: grant.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
    );
    assert!(
        stream.message().await.unwrap().is_none(),
        "stream ends after ISSUED"
    );

    // No second copy, by any path.
    let again = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.grant.is_none());
    assert_eq!(
        again.request.unwrap().state,
        pb::RequestState::Issued as i32
    );
    let mut s2 = c
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s2.message().await.unwrap().unwrap().grant.is_none());
    // Deciding a terminal request is refused.
    let e = dave.approve(approve(&req.id, "again")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    w.h.stop().await;
}

#[tokio::test]
async fn two_of_three_counts_each_approver_once() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["orders.admin"]).await;
    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    let r = alice
        .approve(approve(&req.id, "ok"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Pending as i32);
    assert_eq!(r.waiting_for[0].approvals_received, 1);
    let e = alice
        .approve(approve(&req.id, "ok again"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        alice
            .list_pending(pb::ListPendingRequest::default())
            .await
            .unwrap()
            .into_inner()
            .requests
            .is_empty(),
        "already approved: nothing left for alice"
    );
    let r = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.grant.is_none());
    assert_eq!(r.request.unwrap().waiting_for[0].approvals_received, 1);
    let mut bob = approvals(&w.h, BOB).await;
    let r = bob
        .approve(approve(&req.id, "ok"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Approved as i32);
    // GetRequest by the requester claims it.
    let got = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let grant = got.grant.expect("claimed through GetRequest");
    assert_eq!(
        part(&grant.token, 1)["approved_by"],
        serde_json::json!([APPROVER, BOB])
    );
    w.h.stop().await;
}

#[tokio::test]
async fn every_scope_requirement_must_be_met() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["keys.rotate", "orders.admin"]).await;
    assert_eq!(req.waiting_for.len(), 2);
    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    let mut bob = approvals(&w.h, BOB).await;
    let mut dave = approvals(&w.h, DAVE).await;
    alice.approve(approve(&req.id, "ok")).await.unwrap();
    let r = bob
        .approve(approve(&req.id, "ok"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(
        r.state,
        pb::RequestState::Pending as i32,
        "sec has not approved yet"
    );
    let r = dave
        .approve(approve(&req.id, "ok"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Approved as i32);
    let got = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        part(&got.grant.unwrap().token, 1)["scope"],
        "keys.rotate orders.admin"
    );
    w.h.stop().await;
}

#[tokio::test]
async fn requesters_outsiders_and_workloads_cannot_decide() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    // The workload is in self-service's group but asked itself.
    let req = park(&mut c, &["self.service"]).await;
    let mut me = ApprovalsClient::new(w.h.channel(As::Workload).await);
    let e = me.approve(approve(&req.id, "me")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("cannot decide"), "{}", e.message());
    let e = me
        .deny(pb::DenyRequest {
            request_id: req.id.clone(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // An admin is not an approver.
    let mut admin = ApprovalsClient::new(w.h.channel(As::Admin).await);
    let e = admin.approve(approve(&req.id, "admin")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Outsider on another scope: told exactly what an unknown id is told
    // (issue 9: no request-existence oracle).
    let other = park(&mut c, &["keys.rotate"]).await;
    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    let e = alice
        .approve(approve(&other.id, "not my group"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(!e.message().contains("keys.rotate"), "{}", e.message());
    // Unknown id: NOT_FOUND.
    let e = alice
        .approve(approve("r_0000000000000000", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Issue 27, item 6: every refused decision is in the trail — who tried
    // what on which request, and why not — as refused grants are.
    let refused = refused_decisions(&w.h, 4).await;
    let seen: Vec<(&str, &str, bool)> = refused
        .iter()
        .map(|r| {
            (
                r.actor.as_str(),
                r.target.as_str(),
                r.reason.starts_with("approve:"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (WORKLOAD, req.id.as_str(), true),
            (WORKLOAD, req.id.as_str(), false),
            (portcullis::dev::ADMIN, req.id.as_str(), true),
            (APPROVER, other.id.as_str(), true),
        ],
        "an id that names no request is not recorded"
    );
    assert!(refused[0].reason.contains("cannot decide"), "{refused:?}");
    assert!(
        refused.iter().all(|r| r.outcome == "refused"),
        "{refused:?}"
    );
    // Someone else's request cannot be watched.
    let mut bob_broker = BrokerClient::new(w.h.channel_for(BOB).await);
    let e = bob_broker
        .watch_request(pb::WatchRequestRequest {
            request_id: other.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The eligible member may decide it.
    alice.approve(approve(&req.id, "fine")).await.unwrap();
    w.h.stop().await;
}

/// The trail's `request.decision_refused` records, once there are `n`
/// (they are noted, not waited on).
async fn refused_decisions(h: &Harness, n: usize) -> Vec<pb::AuditRecord> {
    let mut a = portcullis::pb::audit_client::AuditClient::new(h.channel(As::Admin).await);
    for _ in 0..100 {
        let found = a
            .export(pb::ExportRequest {
                action: "request.decision_refused".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} refused decisions in the trail")
}

#[tokio::test]
async fn deny_ends_the_request_and_bad_decisions_name_the_field() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["orders.admin"]).await;
    let mut stream = c
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    for (reason, field) in [("", "reason"), (&"x".repeat(5000) as &str, "reason")] {
        let e = alice
            .deny(pb::DenyRequest {
                request_id: req.id.clone(),
                reason: reason.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), e.message().contains(field)),
            (Code::InvalidArgument, true),
            "{}",
            e.message()
        );
    }
    let e = alice
        .approve(pb::ApproveRequest {
            ttl: secs(3600),
            ..approve(&req.id, "longer")
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("ttl")),
        (Code::InvalidArgument, true),
        "{}",
        e.message()
    );
    let r = alice
        .deny(pb::DenyRequest {
            request_id: req.id.clone(),
            reason: "not during the freeze".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Denied as i32);
    let seen = stream.message().await.unwrap().unwrap().request.unwrap();
    assert_eq!(seen.state, pb::RequestState::Denied as i32);
    assert_eq!(seen.history.last().unwrap().reason, "not during the freeze");
    let e = approvals(&w.h, BOB)
        .await
        .approve(approve(&req.id, "late"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Withdrawn requests cannot be approved either.
    let req2 = park(&mut c, &["orders.admin"]).await;
    c.withdraw_request(pb::WithdrawRequestRequest {
        request_id: req2.id.clone(),
        reason: "nvm".into(),
    })
    .await
    .unwrap();
    let e = alice.approve(approve(&req2.id, "late")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    w.h.stop().await;
}

#[tokio::test]
async fn a_shorter_ttl_from_an_approver_applies_and_unclaimed_approvals_expire() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["orders.admin"]).await;
    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    alice
        .approve(pb::ApproveRequest {
            ttl: secs(120),
            ..approve(&req.id, "2 minutes is enough")
        })
        .await
        .unwrap();
    approvals(&w.h, BOB)
        .await
        .approve(approve(&req.id, "ok"))
        .await
        .unwrap();
    let g = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    let l = g.lease.unwrap();
    assert_eq!(
        l.expires_at.unwrap().seconds - l.issued_at.unwrap().seconds,
        120
    );

    // Approved, never claimed: expires after claim_ttl (10m).
    let req = park(&mut c, &["orders.admin"]).await;
    alice.approve(approve(&req.id, "ok")).await.unwrap();
    let approved = approvals(&w.h, BOB)
        .await
        .approve(approve(&req.id, "ok"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(
        approved.expires_at.unwrap().seconds - w.h.clock.now_secs(),
        600
    );
    w.h.advance(Duration::from_secs(601)).await;
    let r = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.grant.is_none());
    assert_eq!(r.request.unwrap().state, pb::RequestState::Expired as i32);
    w.h.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_watchers_and_claimers_get_one_token() {
    let w = world().await;
    let c = w.h.broker(As::Workload).await;
    let req = park(&mut c.clone(), &["orders.admin"]).await;
    let (ready_tx, mut ready_rx) = mpsc::channel(64);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = if i % 2 == 0 {
            c.clone()
        } else {
            w.h.broker(As::Workload).await
        };
        let (id, ready) = (req.id.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = c
                .watch_request(pb::WatchRequestRequest { request_id: id })
                .await
                .unwrap()
                .into_inner();
            let mut grants = 0;
            while let Some(m) = s.message().await.unwrap() {
                if m.request.unwrap().state == pb::RequestState::Pending as i32 {
                    let _ = ready.send(()).await;
                }
                grants += usize::from(m.grant.is_some());
            }
            grants
        }));
    }
    for _ in 0..50 {
        ready_rx.recv().await.unwrap();
    }
    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    alice.approve(approve(&req.id, "ok")).await.unwrap();
    // Claimers through GetRequest race the watchers.
    let mut getters = Vec::new();
    for _ in 0..10 {
        let mut c = c.clone();
        let id = req.id.clone();
        getters.push(tokio::spawn(async move {
            usize::from(
                c.get_request(pb::GetRequestRequest { request_id: id })
                    .await
                    .unwrap()
                    .into_inner()
                    .grant
                    .is_some(),
            )
        }));
    }
    approvals(&w.h, BOB)
        .await
        .approve(approve(&req.id, "ok"))
        .await
        .unwrap();
    let mut total = 0;
    for t in tasks.into_iter().chain(getters) {
        total += t.await.unwrap();
    }
    assert_eq!(
        total, 1,
        "exactly one token among 50 watchers and 10 claimers"
    );
    let leases = c
        .clone()
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(leases.len(), 1, "and exactly one lease");
    w.h.stop().await;
}

#[tokio::test]
async fn restart_keeps_pending_approvals_and_watch_resumes() {
    let mut w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["orders.admin"]).await;
    let mut s = c
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    ApprovalsClient::new(w.h.channel(As::Approver).await)
        .approve(approve(&req.id, "first"))
        .await
        .unwrap();
    drop(s);
    w.h.restart().await;

    let mut c = w.h.broker(As::Workload).await;
    let mut s = c
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let now = s.message().await.unwrap().unwrap().request.unwrap();
    assert_eq!(now.state, pb::RequestState::Pending as i32);
    assert_eq!(now.approvals.len(), 1, "approval survived the restart");
    assert_eq!(
        now.expires_at, req.expires_at,
        "deadline survived the restart"
    );
    let e = ApprovalsClient::new(w.h.channel(As::Approver).await)
        .approve(approve(&req.id, "again"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    approvals(&w.h, CAROL)
        .await
        .approve(approve(&req.id, "second"))
        .await
        .unwrap();
    let m = s.message().await.unwrap().unwrap();
    assert!(m.grant.is_some(), "the resumed watch delivers the token");
    // Pending expiry is still scheduled after a restart.
    let req2 = park(&mut c, &["orders.admin"]).await;
    w.h.restart().await;
    w.h.advance(Duration::from_secs(1801)).await;
    let mut c = w.h.broker(As::Workload).await;
    let r = c
        .get_request(pb::GetRequestRequest {
            request_id: req2.id,
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Expired as i32);
    w.h.stop().await;
}

#[tokio::test]
async fn webhooks_announce_events_without_tokens() {
    let mut w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["keys.rotate"]).await;
    approvals(&w.h, DAVE)
        .await
        .approve(approve(&req.id, "rotation window"))
        .await
        .unwrap();
    let grant = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    let bg = grant_bg(&mut c).await;

    let mut seen = Vec::new();
    // parked, approved, issued, break_glass on /hook; parked and break_glass on /slack.
    while seen.len() < 6 {
        seen.push(w.hooks.recv().await.unwrap());
    }
    for (_, body) in &seen {
        assert!(
            !body.contains(&grant.token) && !body.contains(&bg) && !body.contains("eyJ"),
            "no token in {body}"
        );
    }
    let json_events: Vec<String> = seen
        .iter()
        .filter(|(p, _)| p == "hook")
        .map(|(_, b)| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for e in ["parked", "approved", "issued", "break_glass"] {
        assert!(
            json_events.contains(&e.to_owned()),
            "{e} missing from {json_events:?}"
        );
    }
    let approved: serde_json::Value = seen
        .iter()
        .filter(|(p, _)| p == "hook")
        .map(|(_, b)| serde_json::from_str::<serde_json::Value>(b).unwrap())
        .find(|v| v["event"] == "approved")
        .unwrap();
    assert_eq!(approved["actor"], DAVE);
    assert_eq!(approved["reason"], "rotation window");
    // Notifications link the request's console page.
    let page = format!("{}/ui/requests/{}", common::CONSOLE_URL, req.id);
    assert_eq!(approved["console_url"], page.as_str());
    assert_eq!(approved["request"]["requester"], WORKLOAD);
    let slack: Vec<&String> = seen
        .iter()
        .filter(|(p, _)| p == "slack")
        .map(|(_, b)| b)
        .collect();
    assert_eq!(slack.len(), 2);
    let texts: Vec<String> = slack
        .iter()
        .map(|b| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let link = format!("<{page}|Open in the console>");
    assert!(texts.iter().any(|t| t.contains(&link)), "{texts:?}");
    let base = format!("<{}/ui/requests/r_", common::CONSOLE_URL);
    assert!(texts.iter().all(|t| t.contains(&base)), "{texts:?}");
    assert_eq!(
        w.h.running()
            .engine
            .notifier()
            .stats()
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    w.h.stop().await;
}

async fn grant_bg(c: &mut BrokerClient<Channel>) -> String {
    let r = pb::RequestTokenRequest {
        break_glass: true,
        justification: "prod is down".into(),
        ..ask(&["db.break"])
    };
    grant(c, r).await.token
}

#[tokio::test]
async fn break_glass_grants_at_once_capped_and_queues_a_review() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let g = grant(
        &mut c,
        pb::RequestTokenRequest {
            break_glass: true,
            justification: "prod is down".into(),
            ttl: secs(3600),
            ..ask(&["db.break"])
        },
    )
    .await;
    let claims = part(&g.token, 1);
    assert_eq!(claims["break_glass"], true);
    let l = g.lease.unwrap();
    assert!(l.break_glass);
    assert_eq!(
        l.expires_at.unwrap().seconds - l.issued_at.unwrap().seconds,
        300,
        "capped at break_glass.max_ttl"
    );

    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    let queue = alice
        .list_pending(pb::ListPendingRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(queue.len(), 1);
    assert!(queue[0].review_pending && queue[0].break_glass);
    assert_eq!(queue[0].lease_id, l.id);
    let e = alice.approve(approve(&queue[0].id, "x")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "nothing to approve: it was already issued"
    );
    let acked = alice
        .acknowledge(pb::AcknowledgeRequest {
            request_id: queue[0].id.clone(),
            reason: "saw the incident".into(),
            revoke: true,
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert!(!acked.review_pending);
    assert_eq!(acked.reviewed_by, APPROVER);
    assert!(
        alice
            .list_pending(pb::ListPendingRequest::default())
            .await
            .unwrap()
            .into_inner()
            .requests
            .is_empty()
    );
    assert!(
        !c.introspect(pb::IntrospectRequest {
            token: g.token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active,
        "revoked on review"
    );
    // The gauges follow: nothing active, nothing left to review.
    let metrics = http_get(w.h.running().http_addr.unwrap(), "/metrics").await;
    for line in [
        "portcullis_active_leases 0",
        "portcullis_open_requests 0",
        "portcullis_revocations_total 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from {metrics}"
        );
    }

    // Refused where the policy does not allow it.
    let e = c
        .request_token(pb::RequestTokenRequest {
            break_glass: true,
            justification: "please".into(),
            ..ask(&["orders.admin"])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("break-glass"), "{}", e.message());
    w.h.stop().await;
}

#[tokio::test]
async fn a_failing_webhook_is_retried_counted_and_never_blocks_the_request() {
    // A receiver that always answers 500 and reports each attempt.
    let (tx, mut attempts) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/{path}",
        axum::routing::post(move || {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // Both hooks (JSON: every event; Slack: parked) point at it.
    let h = Harness::start_with(Some(&policy(port))).await;
    let mut c = h.broker(As::Workload).await;
    // The request path answers at once, whatever the receiver does.
    park(&mut c, &["keys.rotate"]).await;
    let stats = h.running().engine.notifier().stats().clone();
    // Two hooks x 4 attempts each.
    for _ in 0..8 {
        attempts.recv().await.unwrap();
    }
    while stats.failed.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        let changed = stats.changed.notified();
        if stats.failed.load(std::sync::atomic::Ordering::Relaxed) >= 2 {
            break;
        }
        tokio::time::timeout(Duration::from_secs(30), changed)
            .await
            .unwrap();
    }
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(
        stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let metrics = http_get(h.running().http_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("portcullis_notification_failures 2"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn terminal_requests_and_ended_leases_stay_queryable_until_retention_removes_them() {
    let w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let req = park(&mut c, &["orders.admin"]).await;
    ApprovalsClient::new(w.h.channel(As::Approver).await)
        .deny(pb::DenyRequest {
            request_id: req.id.clone(),
            reason: "no".into(),
        })
        .await
        .unwrap();
    let ended = grant(&mut c, ask(&["orders.read"])).await.lease.unwrap().id;
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: ended.clone(),
        reason: "done".into(),
    })
    .await
    .unwrap();
    let live = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(3600),
            ..ask(&["orders.read"])
        },
    )
    .await
    .lease
    .unwrap()
    .id;
    // History stays after the terminal state...
    w.h.advance(Duration::from_secs(1800)).await;
    let r = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Denied as i32);
    // ...until the retention window passes.
    let engine = w.h.running().engine.clone();
    let cutoff = portcullis::clock::Clock::now(w.h.clock.as_ref()) - 600_000;
    assert_eq!(engine.purge_ended(cutoff).await.unwrap(), (1, 1));
    assert_eq!(
        c.get_request(pb::GetRequestRequest { request_id: req.id })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        c.get_lease(pb::GetLeaseRequest { lease_id: ended })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    c.get_lease(pb::GetLeaseRequest { lease_id: live })
        .await
        .unwrap();
    let trail = portcullis::pb::audit_client::AuditClient::new(w.h.channel(As::Admin).await)
        .export(pb::ExportRequest {
            action: "retention.purged".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(trail.len(), 1);
    drop(engine);
    w.h.stop().await;
}

/// Issue 9, finding 2: text from the requester reaches a chat channel as
/// text — no `@channel` mention, no disguised link — and control
/// characters never reach the broker at all.
#[tokio::test]
async fn f02_requester_text_cannot_ping_a_channel_or_rewrite_a_screen() {
    let mut w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let r = pb::RequestTokenRequest {
        justification: "<!channel> see <https://evil.example|the runbook> & approve".into(),
        ..ask(&["keys.rotate"])
    };
    c.request_token(r).await.unwrap();
    let slack = loop {
        let (path, body) = w.hooks.recv().await.unwrap();
        if path == "slack" {
            break body;
        }
    };
    let text = serde_json::from_str::<serde_json::Value>(&slack).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.contains(
            "&lt;!channel&gt; see &lt;https://evil.example|the runbook&gt; &amp; approve"
        ),
        "{text}"
    );
    // The one link is the broker's own, to the console, at the end; the
    // requester's text before it makes none.
    let (theirs, ours) = text
        .rsplit_once(&format!(" <{}/ui/requests/r_", common::CONSOLE_URL))
        .unwrap_or_else(|| panic!("no console link in {text}"));
    assert!(ours.ends_with("|Open in the console>"), "{text}");
    assert!(
        !theirs.contains("<!channel>") && !theirs.contains("<https://"),
        "{text}"
    );

    for (field, bad) in [
        ("justification", "orders.read, 60s\r\u{1b}[2K"),
        ("justification", "fine\nforged line"),
        ("justification", "abc\u{202e}txt.exe"),
        // Issue 21, finding 6: invisible characters hide text from the
        // approver who reads it.
        ("justification", "ap\u{200b}prove me"),
        ("justification", "soft\u{ad}hyphen"),
        ("justification", "\u{feff}leading mark"),
    ] {
        let r = pb::RequestTokenRequest {
            justification: bad.into(),
            ..ask(&["keys.rotate"])
        };
        let e = c.request_token(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
    let req = park(&mut c, &["keys.rotate"]).await;
    let e = approvals(&w.h, DAVE)
        .await
        .approve(approve(&req.id, "ok\u{1b}[1A"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("`reason`"), "{}", e.message());
    let mine = c
        .list_my_requests(pb::ListMyRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.requests.len(), 2, "refused asks parked nothing");
    w.h.stop().await;
}

/// Issue 27, items 3 and 5: a request that waits for people must say why
/// (unless its scope's policy says otherwise), and the people are told what
/// the scope allows — over gRPC and in notifications.
#[tokio::test]
async fn i27_a_parked_request_says_why_and_approvers_see_what_the_scope_allows() {
    let mut w = world().await;
    let mut c = w.h.broker(As::Workload).await;
    let unjustified = pb::RequestTokenRequest {
        justification: String::new(),
        ..ask(&["orders.admin"])
    };
    let e = c.request_token(unjustified.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("justification") && e.message().contains("--reason"),
        "{}",
        e.message()
    );
    let mine = c
        .list_my_requests(pb::ListMyRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(mine.requests.is_empty(), "nothing parked: {mine:?}");
    // A scope whose policy waives it parks without one.
    let waived = c
        .request_token(pb::RequestTokenRequest {
            scopes: vec!["self.service".into()],
            ..unjustified
        })
        .await
        .unwrap();
    assert!(matches!(
        waived.into_inner().outcome,
        Some(pb::request_token_response::Outcome::Pending(_))
    ));
    // What the scope allows reaches the approvers...
    let req = park(&mut c, &["orders.admin"]).await;
    let mut alice = ApprovalsClient::new(w.h.channel(As::Approver).await);
    let shown = alice
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(
        shown.waiting_for[0].description,
        "change or delete any order"
    );
    // ...and the webhook of the event.
    let body = loop {
        let (path, body) = w.hooks.recv().await.unwrap();
        if path == "hook" && body.contains(&req.id) {
            break body;
        }
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["request"]["waiting_for"][0]["description"], "change or delete any order",
        "{body}"
    );
    w.h.stop().await;
}

//! The broker over real mTLS gRPC: issuance, policy tiers, leases, expiry,
//! restart, introspection.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a test failure"
)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use portcullis::clock::Clock;
use portcullis::dev::{ADMIN, APPROVER, As, WORKLOAD};
use portcullis::pb;
use portcullis::pb::keys_client::KeysClient;
use tonic::Code;

#[tokio::test]
async fn auto_grant_carries_rfc9068_claims_and_verifies_against_the_jwks() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let now = h.clock.now() / 1000;
    let g = grant(
        &mut c,
        pb::RequestTokenRequest {
            audience: "orders-api".into(),
            justification: "nightly report".into(),
            ..ask(&["orders.read"])
        },
    )
    .await;
    let lease = g.lease.unwrap();
    let header = part(&g.token, 0);
    let claims = part(&g.token, 1);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["kid"], lease.kid);
    assert_eq!(claims["iss"], h.running().engine.issuer());
    assert_eq!(claims["sub"], WORKLOAD);
    assert_eq!(claims["client_id"], WORKLOAD);
    assert_eq!(claims["aud"], "orders-api");
    assert_eq!(claims["scope"], "orders.read");
    assert_eq!(claims["jti"], lease.id);
    assert_eq!(claims["iat"], now);
    assert_eq!(claims["nbf"], now);
    // default_ttl of orders.read is 5m.
    assert_eq!(claims["exp"], now + 300);
    assert_eq!(lease.state, pb::LeaseState::Active as i32);
    assert_eq!(lease.justification, "nightly report");

    // The published key verifies it (jsonwebtoken with our ring provider).
    let jwks = KeysClient::new(h.channel(As::Workload).await)
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks_json;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).unwrap();
    let jwk = set.find(header["kid"].as_str().unwrap()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["orders-api"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&g.token, &key, &v).unwrap();
    assert_eq!(data.claims["sub"], WORKLOAD);

    // And the same set is served over HTTP.
    let http = h.running().http_addr.unwrap();
    let body = http_get(http, "/.well-known/jwks.json").await;
    assert_eq!(body, jwks);
    let disco: serde_json::Value =
        serde_json::from_str(&http_get(http, "/.well-known/openid-configuration").await).unwrap();
    assert_eq!(disco["issuer"], h.running().engine.issuer());
    h.stop().await;
}

#[tokio::test]
async fn ttl_is_clamped_to_the_smallest_max_ttl() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let g = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(7200),
            ..ask(&["orders.read"])
        },
    )
    .await;
    let l = g.lease.unwrap();
    // orders.read max_ttl is 1h.
    assert_eq!(
        l.expires_at.unwrap().seconds - l.issued_at.unwrap().seconds,
        3600
    );
    // Two scopes: the smaller max_ttl (orders.write: 15m) wins.
    let g = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(7200),
            ..ask(&["orders.read", "orders.write"])
        },
    )
    .await;
    let l = g.lease.unwrap();
    assert_eq!(
        l.expires_at.unwrap().seconds - l.issued_at.unwrap().seconds,
        900
    );
    assert_eq!(
        l.max_expires_at.unwrap().seconds - l.issued_at.unwrap().seconds,
        900
    );
    assert_eq!(part(&g.token, 1)["scope"], "orders.read orders.write");
    h.stop().await;
}

#[tokio::test]
async fn refusals_name_the_scope_and_write_nothing() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let e = c
        .request_token(ask(&["orders.read", "payroll.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("`payroll.read`"), "{}", e.message());
    // The approver identity is not among the scope's workloads.
    let mut a = h.broker(As::Approver).await;
    let e = a.request_token(ask(&["orders.read"])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains(APPROVER), "{}", e.message());
    assert_eq!(count_leases(&mut c).await, 0);
    assert_eq!(count_leases(&mut a).await, 0);
    h.stop().await;
}

#[tokio::test]
async fn parked_request_is_pending_then_expires_and_the_watch_sees_it() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let resp = c
        .request_token(pb::RequestTokenRequest {
            justification: "fix row 7".into(),
            ..ask(&["orders.admin"])
        })
        .await
        .unwrap()
        .into_inner();
    let pb::request_token_response::Outcome::Pending(req) = resp.outcome.unwrap() else {
        panic!("expected pending")
    };
    assert_eq!(req.state, pb::RequestState::Pending as i32);
    assert_eq!(req.waiting_for.len(), 1);
    assert_eq!(req.waiting_for[0].scope, "orders.admin");
    assert_eq!(req.waiting_for[0].approver_groups, ["approvers"]);
    assert_eq!(req.waiting_for[0].approvals_required, 1);
    assert_eq!(
        req.expires_at.unwrap().seconds - req.created_at.unwrap().seconds,
        1800
    );
    assert_eq!(count_leases(&mut c).await, 0, "parking issues nothing");

    // Others cannot see it; the requester, its approvers and admins can.
    h.broker(As::Approver)
        .await
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap();
    let e = portcullis::pb::broker_client::BrokerClient::new(
        h.channel_for("spiffe://portcullis.dev/ns/other/sa/x").await,
    )
    .get_request(pb::GetRequestRequest {
        request_id: req.id.clone(),
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.broker(As::Admin)
        .await
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap();

    let mut stream = c
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().request.unwrap();
    assert_eq!(first.state, pb::RequestState::Pending as i32);
    h.advance(Duration::from_secs(1801)).await;
    let next = stream.message().await.unwrap().unwrap().request.unwrap();
    assert_eq!(next.state, pb::RequestState::Expired as i32);
    assert_eq!(next.history.last().unwrap().actor, "portcullis");
    assert!(
        stream.message().await.unwrap().is_none(),
        "stream ends after a terminal state"
    );
    // A late watcher still gets the final state at once.
    let mut again = c
        .watch_request(pb::WatchRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again
            .message()
            .await
            .unwrap()
            .unwrap()
            .request
            .unwrap()
            .state,
        pb::RequestState::Expired as i32
    );
    h.stop().await;
}

#[tokio::test]
async fn withdraw_ends_a_pending_request_once() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let resp = c
        .request_token(ask(&["orders.admin"]))
        .await
        .unwrap()
        .into_inner();
    let pb::request_token_response::Outcome::Pending(req) = resp.outcome.unwrap() else {
        panic!()
    };
    let w = c
        .withdraw_request(pb::WithdrawRequestRequest {
            request_id: req.id.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.request.unwrap().state, pb::RequestState::Withdrawn as i32);
    let e = c
        .withdraw_request(pb::WithdrawRequestRequest {
            request_id: req.id,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    h.stop().await;
}

#[tokio::test]
async fn retried_request_with_the_same_client_request_id_returns_the_same_lease() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let r = pb::RequestTokenRequest {
        client_request_id: "job-42".into(),
        ..ask(&["orders.read"])
    };
    let a = grant(&mut c, r.clone()).await;
    let b = grant(&mut c, r.clone()).await;
    assert_eq!(a.lease.as_ref().unwrap().id, b.lease.as_ref().unwrap().id);
    assert_eq!(part(&a.token, 1), part(&b.token, 1), "same claims");
    assert_eq!(count_leases(&mut c).await, 1);
    // Concurrent retries also converge on one lease.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        let r = pb::RequestTokenRequest {
            client_request_id: "job-43".into(),
            ..ask(&["orders.read"])
        };
        tasks.push(tokio::spawn(async move {
            grant(&mut c, r).await.lease.unwrap().id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(count_leases(&mut c).await, 2);
    // Same key, other parameters: refused, nothing written.
    let e = c
        .request_token(pb::RequestTokenRequest {
            client_request_id: "job-42".into(),
            ..ask(&["orders.write"])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains("client_request_id"));
    assert_eq!(count_leases(&mut c).await, 2);
    // Keys are per caller: another identity may use the same key.
    let mut adm = h.broker(As::Admin).await;
    let e = adm
        .request_token(pb::RequestTokenRequest {
            client_request_id: "job-42".into(),
            ..ask(&["orders.read"])
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "refused by policy, not by the other caller's key"
    );
    h.stop().await;
}

#[tokio::test]
async fn renew_extends_up_to_max_ttl_with_a_fresh_token() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    // orders.write: default 5m, max 15m.
    let g = grant(&mut c, ask(&["orders.write"])).await;
    let l = g.lease.unwrap();
    let issued = l.issued_at.unwrap().seconds;
    h.advance(Duration::from_secs(240)).await;
    let r = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: l.id.clone(),
            ttl: secs(600),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    let rl = r.lease.unwrap();
    assert_eq!(rl.expires_at.unwrap().seconds, issued + 240 + 600);
    assert_eq!(rl.renewals, 1);
    assert_eq!(part(&r.token, 1)["jti"], l.id.as_str());
    assert_eq!(part(&r.token, 1)["exp"], issued + 840);
    let active = c
        .introspect(pb::IntrospectRequest {
            token: r.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(active.active);
    // Renewal past max_ttl is capped at first issue + 15m.
    h.advance(Duration::from_secs(360)).await;
    let r = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: l.id.clone(),
            ttl: secs(600),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(r.lease.unwrap().expires_at.unwrap().seconds, issued + 900);
    // At max_ttl the lease expires and cannot be renewed.
    h.advance(Duration::from_secs(300)).await;
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: l.id.clone(),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("expired"), "{}", e.message());
    h.stop().await;
}

#[tokio::test]
async fn owners_revoke_their_leases_admins_revoke_anyones_others_are_refused() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let mut other = h.broker(As::Approver).await;
    let mut admin = h.broker(As::Admin).await;
    let g = grant(&mut c, ask(&["orders.read"])).await;
    let id = g.lease.unwrap().id;

    for e in [
        other
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap_err(),
        other
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: id.clone(),
                ttl: None,
            })
            .await
            .unwrap_err(),
        admin
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: id.clone(),
                ttl: None,
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("lease_id"), "{}", e.message());
    }
    let l = c
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: id.clone(),
            reason: "done".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(l.state, pb::LeaseState::Revoked as i32);
    assert_eq!(l.revoked_by, WORKLOAD);
    assert_eq!(l.revoke_reason, "done");
    assert!(
        !c.introspect(pb::IntrospectRequest {
            token: g.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
    );
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: id.clone(),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("revoked"));

    let g2 = grant(&mut c, ask(&["orders.read"])).await;
    let id2 = g2.lease.unwrap().id;
    let l = admin
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: id2,
            reason: "incident".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(l.revoked_by, ADMIN);
    let e = c
        .get_lease(pb::GetLeaseRequest {
            lease_id: "l_doesnotexist".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.stop().await;
}

#[tokio::test]
async fn bulk_revocation_ends_every_active_lease_of_a_subject() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let mut tokens = Vec::new();
    for _ in 0..40 {
        tokens.push(grant(&mut c, ask(&["orders.read"])).await.token);
    }
    let one = c
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases[0]
        .id
        .clone();
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: one,
        reason: String::new(),
    })
    .await
    .unwrap();

    let e = c
        .revoke_leases(pb::RevokeLeasesRequest {
            subject: WORKLOAD.into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "bulk revocation is admin-only"
    );
    let e = h
        .broker(As::Admin)
        .await
        .revoke_leases(pb::RevokeLeasesRequest {
            subject: "not a uri".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("subject"));

    let n = h
        .broker(As::Admin)
        .await
        .revoke_leases(pb::RevokeLeasesRequest {
            subject: WORKLOAD.into(),
            reason: "incident 12".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked;
    assert_eq!(n, 39);
    for t in tokens {
        assert!(
            !c.introspect(pb::IntrospectRequest {
                token: t,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .active
        );
    }
    let active = c
        .list_leases(pb::ListLeasesRequest {
            state: pb::LeaseState::Active as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(active.leases.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn list_leases_pages_and_filters_and_is_scoped_to_the_caller() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    for _ in 0..5 {
        grant(&mut c, ask(&["orders.read"])).await;
    }
    let p1 = c
        .list_leases(pb::ListLeasesRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.leases.len(), 2);
    let p2 = c
        .list_leases(pb::ListLeasesRequest {
            page_size: 2,
            page_token: p1.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let p3 = c
        .list_leases(pb::ListLeasesRequest {
            page_size: 2,
            page_token: p2.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.leases.len(), 2);
    assert_eq!(p3.leases.len(), 1);
    assert!(p3.next_page_token.is_empty());
    let mut ids: Vec<_> = [p1.leases, p2.leases, p3.leases]
        .concat()
        .into_iter()
        .map(|l| l.id)
        .collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n);

    let e = h
        .broker(As::Approver)
        .await
        .list_leases(pb::ListLeasesRequest {
            subject: WORKLOAD.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let all = h
        .broker(As::Admin)
        .await
        .list_leases(pb::ListLeasesRequest {
            subject: WORKLOAD.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.leases.len(), 5);
    let e = c
        .list_leases(pb::ListLeasesRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test]
async fn leases_expire_on_time_and_introspection_never_waits_for_the_sweep() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let g = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(60),
            ..ask(&["orders.read"])
        },
    )
    .await;
    let long = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(600),
            ..ask(&["orders.read"])
        },
    )
    .await;
    // Move the clock without waiting for the expiry task: introspection
    // must already say inactive.
    h.clock.advance(Duration::from_secs(61));
    assert!(
        !c.introspect(pb::IntrospectRequest {
            token: g.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
    );
    h.advance(Duration::ZERO).await;
    let l = c
        .get_lease(pb::GetLeaseRequest {
            lease_id: g.lease.unwrap().id,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(l.state, pb::LeaseState::Expired as i32);
    let l2 = c
        .get_lease(pb::GetLeaseRequest {
            lease_id: long.lease.unwrap().id,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(l2.state, pb::LeaseState::Active as i32);
    assert!(
        c.introspect(pb::IntrospectRequest {
            token: long.token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
    );
    // An earlier deadline inserted while the task sleeps towards a later one
    // wakes it.
    let short = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(5),
            ..ask(&["orders.read"])
        },
    )
    .await;
    h.advance(Duration::from_secs(6)).await;
    let l3 = c
        .get_lease(pb::GetLeaseRequest {
            lease_id: short.lease.unwrap().id,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(l3.state, pb::LeaseState::Expired as i32);
    h.stop().await;
}

#[tokio::test]
async fn restart_keeps_leases_keys_requests_and_their_deadlines() {
    let mut h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let g = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(120),
            ..ask(&["orders.read"])
        },
    )
    .await;
    let resp = c
        .request_token(ask(&["orders.admin"]))
        .await
        .unwrap()
        .into_inner();
    let pb::request_token_response::Outcome::Pending(req) = resp.outcome.unwrap() else {
        panic!()
    };
    let kid = part(&g.token, 0)["kid"].clone();
    h.restart().await;

    let mut c = h.broker(As::Workload).await;
    assert!(
        c.introspect(pb::IntrospectRequest {
            token: g.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active,
        "same key, same lease after restart"
    );
    let g2 = grant(&mut c, ask(&["orders.read"])).await;
    assert_eq!(part(&g2.token, 0)["kid"], kid, "the signing key survived");
    let r = c
        .get_request(pb::GetRequestRequest {
            request_id: req.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Pending as i32);

    h.advance(Duration::from_secs(121)).await;
    let l = c
        .get_lease(pb::GetLeaseRequest {
            lease_id: g.lease.unwrap().id,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(
        l.state,
        pb::LeaseState::Expired as i32,
        "expiry resumes from the store index"
    );
    h.advance(Duration::from_secs(1800)).await;
    let r = c
        .get_request(pb::GetRequestRequest { request_id: req.id })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Expired as i32);
    h.stop().await;
}

fn forge(header: serde_json::Value, claims: serde_json::Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(sig)
    )
}

#[tokio::test]
async fn introspection_rejects_forged_and_out_of_time_tokens() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let g = grant(&mut c, ask(&["orders.read"])).await;
    let header = part(&g.token, 0);
    let claims = part(&g.token, 1);
    let sig = B64.decode(g.token.split('.').nth(2).unwrap()).unwrap();
    let inactive = |t: String| {
        let mut c = c.clone();
        async move {
            !c.introspect(pb::IntrospectRequest {
                token: t,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .active
        }
    };
    assert!(
        !inactive(g.token.clone()).await,
        "the genuine token is active"
    );

    // alg none, no signature.
    let mut h_none = header.clone();
    h_none["alg"] = "none".into();
    assert!(
        inactive(format!(
            "{}.{}.",
            B64.encode(h_none.to_string()),
            B64.encode(claims.to_string())
        ))
        .await
    );

    // HS256 keyed with the public key.
    let jwks: serde_json::Value =
        serde_json::from_str(&h.running().engine.keys().current().jwks_json).unwrap();
    let mut h_hs = header.clone();
    h_hs["alg"] = "HS256".into();
    let signing_input = format!(
        "{}.{}",
        B64.encode(h_hs.to_string()),
        B64.encode(claims.to_string())
    );
    for secret in [
        jwks.to_string().into_bytes(),
        h.running().engine.keys().current().records[0]
            .public
            .clone(),
    ] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let tag = ring::hmac::sign(&key, signing_input.as_bytes());
        assert!(inactive(format!("{signing_input}.{}", B64.encode(tag.as_ref()))).await);
    }

    // Unknown kid, real signature.
    let mut h_kid = header.clone();
    h_kid["kid"] = "not-a-key".into();
    assert!(inactive(forge(h_kid, claims.clone(), &sig)).await);

    // Edited payload: more scope.
    let mut edited = claims.clone();
    edited["scope"] = "orders.read orders.admin".into();
    assert!(inactive(forge(header.clone(), edited, &sig)).await);

    // Garbage and oversize.
    assert!(inactive("not.a.token".into()).await);
    assert!(inactive("a".repeat(10_000)).await);

    // Genuinely signed tokens with bad time claims or a foreign issuer.
    let keys = h.running().engine.keys().current();
    let now = h.clock.now() / 1000;
    let sign = |mut c: serde_json::Value, edit: &dyn Fn(&mut serde_json::Value)| {
        edit(&mut c);
        let claims: portcullis::token::Claims = serde_json::from_value(c).unwrap();
        portcullis::token::mint(&keys, &claims).unwrap()
    };
    assert!(
        !inactive(sign(claims.clone(), &|_| {})).await,
        "a re-signed copy of the real claims is active"
    );
    assert!(
        inactive(sign(claims.clone(), &|c| c["exp"] = (now - 1).into())).await,
        "expired"
    );
    assert!(
        inactive(sign(claims.clone(), &|c| c["nbf"] = (now + 60).into())).await,
        "nbf in the future"
    );
    assert!(
        inactive(sign(claims.clone(), &|c| c["iss"] =
            "https://evil.example".into()))
        .await,
        "foreign iss"
    );
    assert!(
        inactive(sign(claims.clone(), &|c| c["exp"] = (now + 100_000).into())).await,
        "exp beyond the lease"
    );
    assert!(
        inactive(sign(claims.clone(), &|c| c["jti"] = "l_0000".into())).await,
        "unknown lease"
    );
    h.stop().await;
}

#[tokio::test]
async fn policy_reloads_on_change_and_a_bad_file_keeps_the_old_policy() {
    /// A reload that never comes fails the test instead of hanging it.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("no policy reload within 30 s")
    }

    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let mut reloads = h.running().engine.policy_reloads();
    let path = h.dev.path("policy.toml");
    let original = std::fs::read_to_string(&path).unwrap();

    // Break it: the old policy keeps serving.
    std::fs::write(&path, "[[scope]]\nname = 'x'\ntier = 'sometimes'\n").unwrap();
    within(reloads.wait_for(|r| r.rejected >= 1)).await.unwrap();
    grant(&mut c, ask(&["orders.read"])).await;

    // Remove orders.read for everyone: now refused, and renewal too.
    let g = grant(&mut c, ask(&["orders.write"])).await;
    std::fs::write(
        &path,
        original
            .replace("name = \"orders.read\"", "name = \"orders.list\"")
            // The dev policy's delegation rule names it too.
            .replace("scopes = [\"orders.read\", ", "scopes = [")
            .replace(
                "workloads = [\"spiffe://portcullis.dev/ns/demo/*\"]\napprovers",
                "workloads = [\"spiffe://portcullis.dev/ns/other/*\"]\napprovers",
            ),
    )
    .unwrap();
    within(reloads.wait_for(|r| r.loaded >= 1)).await.unwrap();
    let e = c.request_token(ask(&["orders.read"])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    c.renew_lease(pb::RenewLeaseRequest {
        lease_id: g.lease.unwrap().id,
        ttl: None,
    })
    .await
    .unwrap();
    grant(&mut c, ask(&["orders.list"])).await;
    h.stop().await;
}

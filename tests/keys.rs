//! Signing-key rotation over real mTLS and HTTP: pre-publication, hand-over,
//! retirement, emergency rotation, restart; tokens checked by an independent
//! verifier that knows only the JWKS fetched over HTTP.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use portcullis::dev::As;
use portcullis::pb;
use portcullis::pb::keys_client::KeysClient;
use tonic::Code;

/// A JOSE verifier written here, not jsonwebtoken: parse the compact JWS,
/// find the JWK by `kid` in a JWKS document, rebuild the P-256 point from
/// `x`/`y`, check the ES256 signature with ring and the `exp` claim.
fn independent_verify(jwks: &str, token: &str, now: u64) -> Result<serde_json::Value, String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, sig] = parts.as_slice() else {
        return Err("not a compact JWS".into());
    };
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(h).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    if header["alg"] != "ES256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let set: serde_json::Value = serde_json::from_str(jwks).map_err(|e| e.to_string())?;
    let jwk = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .ok_or("kid not in JWKS")?;
    assert_eq!(
        (
            jwk["kty"].as_str(),
            jwk["crv"].as_str(),
            jwk["use"].as_str()
        ),
        (Some("EC"), Some("P-256"), Some("sig"))
    );
    let mut point = vec![4u8];
    point.extend(B64.decode(jwk["x"].as_str().unwrap()).unwrap());
    point.extend(B64.decode(jwk["y"].as_str().unwrap()).unwrap());
    let key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point);
    key.verify(
        format!("{h}.{p}").as_bytes(),
        &B64.decode(sig).map_err(|e| e.to_string())?,
    )
    .map_err(|_| "bad signature".to_owned())?;
    let claims: serde_json::Value = serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
    if claims["exp"].as_u64().unwrap() <= now {
        return Err("expired".into());
    }
    Ok(claims)
}

async fn jwks(h: &Harness) -> String {
    http_get(h.running().http_addr.unwrap(), "/.well-known/jwks.json").await
}

fn kids(jwks: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(jwks).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// Move the clock and wait until the key ring has changed `n` more times.
async fn advance_to_change(h: &Harness, by: Duration, n: u64) {
    let mut rx = h.running().engine.keys().changes();
    let start = *rx.borrow_and_update();
    h.clock.advance(by);
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|c| *c >= start + n))
        .await
        .expect("key ring did not change in time")
        .unwrap();
}

#[tokio::test]
async fn scheduled_rotation_prepublishes_hands_over_and_retires_without_a_verification_failure() {
    let mut h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let first_kid = kids(&jwks(&h).await).pop().unwrap();
    assert_eq!(kids(&jwks(&h).await).len(), 1);

    // 24h period, 10m pre-publication. Half an hour before the hand-over,
    // take a 1h token with the first key.
    h.clock.advance(Duration::from_secs(24 * 3600 - 1800));
    let old = grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(3600),
            ..ask(&["orders.read"])
        },
    )
    .await;
    assert_eq!(part(&old.token, 0)["kid"], first_kid.as_str());

    // 10 minutes before: the next key is published, not signing.
    advance_to_change(&h, Duration::from_secs(1200), 1).await;
    let published = kids(&jwks(&h).await);
    assert_eq!(published.len(), 2, "next key pre-published");
    let next_kid = published.iter().find(|k| **k != first_kid).unwrap().clone();
    let still = grant(&mut c, ask(&["orders.read"])).await;
    assert_eq!(
        part(&still.token, 0)["kid"],
        first_kid.as_str(),
        "the next key does not sign yet"
    );
    let keys = KeysClient::new(h.channel(As::Workload).await)
        .list_keys(pb::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(
        keys.iter()
            .any(|k| k.kid == next_kid && k.state == pb::KeyState::Next as i32)
    );

    // Hand-over: new tokens carry the new kid; the old token still verifies
    // from the published JWKS, independently, and introspects active.
    advance_to_change(&h, Duration::from_secs(600), 1).await;
    let new = grant(&mut c, ask(&["orders.read"])).await;
    assert_eq!(part(&new.token, 0)["kid"], next_kid.as_str());
    let set = jwks(&h).await;
    let now = h.clock.now_secs() as u64;
    independent_verify(&set, &old.token, now).unwrap();
    independent_verify(&set, &new.token, now).unwrap();
    assert!(
        c.introspect(pb::IntrospectRequest {
            token: old.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
    );
    let keys = KeysClient::new(h.channel(As::Workload).await)
        .list_keys(pb::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let retired = keys.iter().find(|k| k.kid == first_kid).unwrap();
    assert_eq!(retired.state, pb::KeyState::Retired as i32);
    assert!(retired.retire_at.is_some());

    // A restart keeps keys and schedule.
    h.restart().await;
    let mut c = h.broker(As::Workload).await;
    assert_eq!(kids(&jwks(&h).await).len(), 2);
    assert_eq!(
        part(&grant(&mut c, ask(&["orders.read"])).await.token, 0)["kid"],
        next_kid.as_str()
    );

    // The retired key stays published until every token it could have signed
    // has expired (policy max 24h + 60s leeway), then disappears. The next
    // pre-publication (at 48h - 10m) happens on the way.
    advance_to_change(&h, Duration::from_secs(24 * 3600 - 600), 1).await;
    assert!(
        kids(&jwks(&h).await).contains(&first_kid),
        "still published before its window ends"
    );
    advance_to_change(&h, Duration::from_secs(600 + 61), 1).await;
    let after = kids(&jwks(&h).await);
    assert!(
        !after.contains(&first_kid),
        "removed after its last token expired: {after:?}"
    );
    assert!(
        !c.introspect(pb::IntrospectRequest {
            token: old.token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
    );
    h.stop().await;
}

#[tokio::test]
async fn emergency_rotation_kills_the_old_tokens_at_once() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let before = grant(&mut c, ask(&["orders.read"])).await;
    let old_kid = part(&before.token, 0)["kid"].as_str().unwrap().to_owned();

    let e = KeysClient::new(h.channel(As::Workload).await)
        .rotate(pb::RotateRequest {
            emergency: true,
            reason: "leak".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "only admins rotate");

    // An emergency needs a reason (issue 27, item 2), and nothing changes
    // without one.
    let e = KeysClient::new(h.channel(As::Admin).await)
        .rotate(pb::RotateRequest {
            emergency: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("reason"), "{}", e.message());
    assert!(kids(&jwks(&h).await).contains(&old_kid));

    let done = KeysClient::new(h.channel(As::Admin).await)
        .rotate(pb::RotateRequest {
            emergency: true,
            reason: "key leaked".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The answer says what was done: the key withdrawn, the lease revoked.
    assert!(done.withdrawn.contains(&old_kid), "{done:?}");
    assert_eq!(
        (done.leases_revoked, done.descendants_revoked),
        (1, 0),
        "{done:?}"
    );
    let keys = done.keys;
    assert!(
        keys.iter().all(|k| k.kid != old_kid),
        "old key removed at once"
    );
    assert!(!kids(&jwks(&h).await).contains(&old_kid));
    assert!(
        !c.introspect(pb::IntrospectRequest {
            token: before.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
    );
    let lease = c
        .get_lease(pb::GetLeaseRequest {
            lease_id: before.lease.unwrap().id,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(lease.state, pb::LeaseState::Revoked as i32);
    assert_eq!(lease.revoke_reason, "emergency key rotation");
    let after = grant(&mut c, ask(&["orders.read"])).await;
    assert_ne!(part(&after.token, 0)["kid"], old_kid.as_str());
    independent_verify(&jwks(&h).await, &after.token, h.clock.now_secs() as u64).unwrap();
    // The withdrawn key's checkpoints prove nothing: a trusted key signs
    // one over the trail at once, not at the next interval, so the trail
    // verifies again (with a note) right after an emergency.
    let mut audit = portcullis::pb::audit_client::AuditClient::new(h.channel(As::Admin).await);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = audit
            .verify(pb::VerifyRequest::default())
            .await
            .unwrap()
            .into_inner();
        if v.ok {
            assert!(
                v.notes
                    .iter()
                    .any(|n| n.contains("withdrawn in an emergency")),
                "{v:?}"
            );
            break;
        }
        assert!(std::time::Instant::now() < until, "not re-signed: {v:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn a_manual_rotation_still_prepublishes() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let first = part(&grant(&mut c, ask(&["orders.read"])).await.token, 0)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let keys = KeysClient::new(h.channel(As::Admin).await)
        .rotate(pb::RotateRequest {
            emergency: false,
            reason: "quarterly".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 2, "a next key is published");
    assert_eq!(
        part(&grant(&mut c, ask(&["orders.read"])).await.token, 0)["kid"],
        first.as_str(),
        "but does not sign yet"
    );
    advance_to_change(&h, Duration::from_secs(600), 1).await;
    assert_ne!(
        part(&grant(&mut c, ask(&["orders.read"])).await.token, 0)["kid"],
        first.as_str(),
        "hand-over after pre-publication"
    );
    h.stop().await;
}

#[tokio::test]
async fn jwks_and_discovery_over_https_with_the_server_certificate() {
    use http_body_util::BodyExt as _;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut h = Harness::start().await;
    h.https = true;
    h.restart().await;
    let port = h.running().http_addr.unwrap().port();
    assert!(
        h.running().engine.issuer().starts_with("https://"),
        "{}",
        h.running().engine.issuer()
    );

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(h.dev.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let get = |path: &str| {
        let uri: hyper::Uri = format!("https://localhost:{port}{path}").parse().unwrap();
        let client = client.clone();
        async move {
            let resp = client.get(uri).await.unwrap();
            assert!(resp.status().is_success());
            String::from_utf8(
                resp.into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
            )
            .unwrap()
        }
    };
    let set = get("/.well-known/jwks.json").await;
    assert_eq!(set, h.running().engine.keys().current().jwks_json);
    let disco: serde_json::Value =
        serde_json::from_str(&get("/.well-known/openid-configuration").await).unwrap();
    assert_eq!(
        disco["jwks_uri"],
        format!("{}/.well-known/jwks.json", h.running().engine.issuer())
    );
    let mut c = h.broker(As::Workload).await;
    let g = grant(&mut c, ask(&["orders.read"])).await;
    independent_verify(&set, &g.token, h.clock.now_secs() as u64).unwrap();
    h.stop().await;
}

fn kid_of(token: &str) -> String {
    part(token, 0)["kid"].as_str().unwrap().to_owned()
}

async fn active(
    c: &mut portcullis::pb::broker_client::BrokerClient<tonic::transport::Channel>,
    token: &str,
) -> bool {
    c.introspect(pb::IntrospectRequest {
        token: token.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .active
}

async fn rotate(h: &Harness, emergency: bool, kid: &str) -> Result<(), tonic::Status> {
    KeysClient::new(h.channel(As::Admin).await)
        .rotate(pb::RotateRequest {
            emergency,
            kid: kid.into(),
            reason: "test".into(),
        })
        .await
        .map(|_| ())
}

/// Issue 9, finding 4: a leaked RETIRED key can be withdrawn at once, and
/// by default an emergency withdraws every key whose private part exists.
#[tokio::test]
async fn f04_emergency_rotation_withdraws_a_retired_key_and_by_default_every_key() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let hour = || pb::RequestTokenRequest {
        ttl: secs(3600),
        ..ask(&["orders.read"])
    };
    let old = grant(&mut c, hour()).await.token;
    let k1 = kid_of(&old);
    rotate(&h, false, "").await.unwrap();
    advance_to_change(&h, Duration::from_secs(600), 1).await;
    let newer = grant(&mut c, hour()).await.token;
    let k2 = kid_of(&newer);
    assert_ne!(k1, k2);
    assert!(
        kids(&jwks(&h).await).contains(&k1),
        "retired, still published"
    );
    assert!(active(&mut c, &old).await);

    rotate(&h, true, &k1).await.unwrap();
    assert!(!kids(&jwks(&h).await).contains(&k1), "withdrawn at once");
    assert!(!active(&mut c, &old).await, "its leases are revoked");
    assert!(active(&mut c, &newer).await, "the active key was not named");
    assert_eq!(
        kid_of(&grant(&mut c, ask(&["orders.read"])).await.token),
        k2
    );
    let e = rotate(&h, false, &k2).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "--kid needs --emergency");

    rotate(&h, true, "").await.unwrap();
    let published = kids(&jwks(&h).await);
    assert!(
        !published.contains(&k2) && published.len() == 1,
        "{published:?}"
    );
    assert!(!active(&mut c, &newer).await);
    h.stop().await;
}

/// Issue 9, finding 5: the trail verifies after keys leave the JWKS — a
/// retired key removed on schedule, or a key withdrawn in an emergency
/// (whose checkpoints are reported as such, not as tampering).
#[tokio::test]
async fn f05_audit_verify_survives_key_removal_and_names_withdrawn_signers() {
    use portcullis::pb::audit_client::AuditClient;
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let engine = h.running().engine.clone();
    grant(&mut c, ask(&["orders.read"])).await;
    engine.checkpoint_audit().await.unwrap().unwrap();
    // Scheduled: K1 retires, then is removed after the longest token life.
    rotate(&h, false, "").await.unwrap();
    advance_to_change(&h, Duration::from_secs(600), 1).await;
    grant(&mut c, ask(&["orders.read"])).await;
    engine.checkpoint_audit().await.unwrap().unwrap();
    advance_to_change(&h, Duration::from_secs(25 * 3600), 1).await;
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let v = a
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    // The one signed at start and the two above.
    assert_eq!(v.checkpoints, 3, "{v:?}");
    assert!(v.notes.is_empty(), "{v:?}");

    // Emergency: the active key is withdrawn; its checkpoint is named.
    rotate(&h, true, "").await.unwrap();
    grant(&mut c, ask(&["orders.read"])).await;
    engine.checkpoint_audit().await.unwrap().unwrap();
    let v = a
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "not tampering: {v:?}");
    assert_eq!(
        v.checkpoints, 3,
        "the removed key's two (at start and the first above) and the new key's: {v:?}"
    );
    assert_eq!(v.notes.len(), 1, "{v:?}");
    assert!(v.notes[0].contains("withdrawn in an emergency"), "{v:?}");
    h.stop().await;
}

// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
//! Unit tests of `engine::leases`.

use super::*;
use crate::engine::testing::{POLICY, actions, granted, id, rig, workload};

#[tokio::test]
async fn renewal_extends_up_to_the_ceiling_and_only_for_the_owner() {
    let r = rig(POLICY).await;
    let lease = granted(&r, &["read"]).await;
    r.clock.advance(Duration::from_secs(60));
    let (_, renewed) = r.engine.renew(&workload(), &lease.id, None).await.unwrap();
    assert_eq!(renewed.expires_at, lease.expires_at + 60_000);
    assert_eq!(renewed.renewals, 1);
    let (_, long) = r
        .engine
        .renew(&workload(), &lease.id, Some(Duration::from_secs(7200)))
        .await
        .unwrap();
    assert_eq!(long.expires_at, lease.max_expires_at, "capped by max_ttl");
    let other = id("spiffe://t/other");
    let err = r.engine.renew(&other, &lease.id, None).await.unwrap_err();
    assert!(matches!(err, EngineError::NotAllowed(_)), "{err}");
}

#[tokio::test]
async fn revoke_is_once_and_renewing_a_revoked_lease_fails() {
    let r = rig(POLICY).await;
    let lease = granted(&r, &["read"]).await;
    let revoked = r
        .engine
        .revoke(&workload(), &lease.id, "done")
        .await
        .unwrap();
    assert_eq!(revoked.state, LeaseState::Revoked);
    let again = r
        .engine
        .revoke(&workload(), &lease.id, "twice")
        .await
        .unwrap();
    assert_eq!(again.revoke_reason.as_deref(), Some("done"), "unchanged");
    let err = r
        .engine
        .renew(&workload(), &lease.id, None)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongState(_)), "{err}");
    assert_eq!(
        actions(r.store.as_ref()).await,
        ["token.granted", "lease.revoked"]
    );
}

#[tokio::test]
async fn bulk_revocation_needs_an_admin_and_counts_what_it_revoked() {
    let r = rig(POLICY).await;
    for _ in 0..3 {
        granted(&r, &["read"]).await;
    }
    let err = r
        .engine
        .revoke_all(&workload(), "spiffe://t/w", "")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::NotAllowed(_)));
    let root = id("spiffe://t/human/root");
    assert_eq!(
        r.engine
            .revoke_all(&root, "spiffe://t/w", "")
            .await
            .unwrap(),
        (3, 0)
    );
    assert_eq!(
        r.engine
            .revoke_all(&root, "spiffe://t/w", "")
            .await
            .unwrap(),
        (0, 0)
    );
    assert_eq!(r.engine.metrics().active_leases.get(), 0);
    let (page, _) = r
        .engine
        .list_leases(&root, "spiffe://t/w", Some(LeaseState::Active), 0, "")
        .await
        .unwrap();
    assert!(page.is_empty());
}

#[tokio::test]
async fn an_undelivered_token_is_revoked_and_recorded_once() {
    let r = rig(POLICY).await;
    let lease = granted(&r, &["read"]).await;
    r.engine.revoke_undelivered(&lease).await;
    r.engine.revoke_undelivered(&lease).await;
    let stored = r.store.lease(&lease.id).await.unwrap().unwrap();
    assert_eq!(stored.state, LeaseState::Revoked);
    assert_eq!(stored.revoked_by.as_deref(), Some(SYSTEM_ACTOR));
    assert_eq!(
        actions(r.store.as_ref()).await,
        ["token.granted", "lease.revoked"],
        "recorded only by the call that revoked it"
    );
}

/// A subject's lease and a child it delegated to itself: the bulk
/// revocation reaches the child twice (through the cascade and through the
/// subject's own list) and still ends both, in one operation.
#[tokio::test]
async fn a_bulk_revocation_of_a_subject_that_delegated_to_itself_ends_both() {
    use crate::store::conformance::TestWrites as _;
    let r = rig(POLICY).await;
    let parent = granted(&r, &["read"]).await;
    let child = crate::model::Lease {
        id: format!("{}c", parent.id),
        delegation: Some(crate::model::Delegation {
            parent_id: parent.id.clone(),
            depth: 1,
            actors: vec![workload().as_str().to_owned()],
        }),
        ..parent.clone()
    };
    r.store.create_lease(&child, None).await.unwrap();
    let count = r
        .engine
        .revoke_all(
            &id("spiffe://t/human/root"),
            workload().as_str(),
            "incident",
        )
        .await
        .unwrap();
    assert!(count.0 >= 1, "{count:?}");
    for l in [&parent.id, &child.id] {
        assert_eq!(
            r.store.lease(l).await.unwrap().unwrap().state,
            LeaseState::Revoked,
            "{l}"
        );
    }
}

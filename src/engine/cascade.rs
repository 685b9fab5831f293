//! Cascade: a lease that ends takes every lease delegated from it, however
//! deep, with it (issue 12; docs/design-delegation.md). The subtree is
//! walked breadth-first through the store's `children` index; each active
//! descendant's revocation and its audit record join the caller's
//! operation, so the whole subtree ends in the same atomic batch as the
//! lease it hangs from.

use super::records::revoke_if_active;
use super::{Cas, EngineError, Op, Records};
use crate::audit::{Action, Entry as AuditEntry};
use crate::identity::Identity;
use crate::model::{Delegation, Lease, LeaseState};
use crate::policy::{DelegationAsk, Policy};
use crate::store::{Millis, Store, StoreError};

/// Children read per index page.
const PAGE: usize = 1024;

/// Revoke, in `op`, every active lease delegated, directly or not, from
/// `root`, as `by` at `now`; their audit entries (the caller records them
/// with its own, in the same operation). Reads the index a page at a time.
/// Also returns the ids of the ended leases that hold a database login (a
/// revocation waits for their ends).
pub(crate) async fn end_descendants(
    records: &Records,
    op: &mut Op,
    root: &str,
    by: &str,
    why: &str,
    now: Millis,
) -> Result<(Vec<AuditEntry>, Vec<String>), StoreError> {
    let mut logins = Vec::new();
    let reason = format!("delegated from `{root}`, which ended: {why}");
    let mut entries = Vec::new();
    let mut frontier = vec![root.to_owned()];
    // A damaged index must not make the walk go round forever.
    let mut seen = std::collections::HashSet::new();
    while let Some(parent) = frontier.pop() {
        if !seen.insert(parent.clone()) {
            continue;
        }
        let mut after: Option<String> = None;
        loop {
            let page = records
                .store()
                .children(&parent, after.as_deref(), PAGE)
                .await?;
            let done = page.len() < PAGE;
            for id in page {
                let edit = revoke_if_active(by, &reason, now);
                if let Cas::Swapped { new, .. } =
                    records.edit_lease::<StoreError>(op, &id, edit).await?
                {
                    entries.push(AuditEntry::ok(
                        by,
                        Action::LeaseRevoked,
                        &id,
                        &new.scopes,
                        &reason,
                    ));
                    if new.login.is_some() {
                        logins.push(id.clone());
                    }
                }
                // Walk on below an already ended child too: its own
                // children may have been delegated while it lived.
                after = Some(id.clone());
                frontier.push(id);
            }
            if done {
                break;
            }
        }
    }
    Ok((entries, logins))
}

/// Is every lease `lease` was delegated from still live at `now`? A
/// revocation ends the subtree in the same commit, so this matters while a
/// cascade is being written, and for a record that outlived an ancestor
/// (a child written just after the cascade walked by).
pub(crate) async fn ancestors_live(
    store: &dyn Store,
    lease: &Lease,
    now: Millis,
) -> Result<bool, StoreError> {
    let mut next = lease.delegation.as_ref().map(|d| d.parent_id.clone());
    // A chain is at most this long; a longer (or cyclic) one is refused.
    for _ in 0..=crate::policy::MAX_DELEGATION_DEPTH {
        let Some(id) = next else { return Ok(true) };
        let Some(parent) = store.lease(&id).await? else {
            return Ok(false);
        };
        if parent.state != LeaseState::Active || parent.expires_at <= now {
            return Ok(false);
        }
        next = parent.delegation.map(|d| d.parent_id);
    }
    Ok(false)
}

/// `lease` made a child of `parent` through `d`: never past the parent's
/// end, issued to the delegator (`client_id`, the chain's nearest actor),
/// break-glass when the parent is, and carrying the parent's approvals
/// unless it has its own.
pub(crate) fn child_of(mut lease: Lease, parent: &Lease, d: &Delegation) -> Lease {
    lease.expires_at = lease.expires_at.min(parent.expires_at);
    lease.max_expires_at = lease.max_expires_at.min(parent.expires_at);
    lease.client_id = d.actors.first().cloned().unwrap_or_default();
    lease.break_glass = parent.break_glass;
    if lease.approved_by.is_empty() {
        lease.approved_by = parent.approved_by.clone();
    }
    lease.delegation = Some(d.clone());
    lease
}

/// The parent of delegation `d` if it lives at `now`: active, not past its
/// end, and every lease above it live too (`None` otherwise).
pub(crate) async fn live_parent(
    store: &dyn Store,
    d: &Delegation,
    now: Millis,
) -> Result<Option<Lease>, StoreError> {
    let Some(p) = store.lease(&d.parent_id).await? else {
        return Ok(None);
    };
    let live = p.state == LeaseState::Active
        && p.expires_at > now
        && ancestors_live(store, &p, now).await?;
    Ok(live.then_some(p))
}

/// How far a delegated `lease` may be renewed at `now`: never past its
/// parent's current end (nor its own ceiling), only while the parent lives,
/// and only while the policy still allows the delegation.
pub(crate) async fn delegated_ceiling(
    store: &dyn Store,
    policy: &Policy,
    lease: &Lease,
    d: &Delegation,
    now: Millis,
) -> Result<Millis, EngineError> {
    let parent = live_parent(store, d, now).await?.ok_or_else(|| {
            EngineError::WrongState(format!(
                "lease `{}` was delegated from `{}`, which (or a lease it was delegated from) has ended; it cannot be renewed",
                lease.id, d.parent_id
            ))
        })?;
    let stored = |s: &str| {
        Identity::parse(s).map_err(|e| {
            EngineError::DataLoss(format!("lease `{}` names identity `{s}`: {e}", lease.id))
        })
    };
    let holder = stored(d.actors.first().map_or("", String::as_str))?;
    let to = stored(&lease.subject)?;
    policy.delegation_rule(&DelegationAsk {
        holder: &holder,
        to: &to,
        scopes: &lease.scopes,
        depth: d.depth,
        audience: &lease.audience,
        parent_audience: &parent.audience,
    })?;
    Ok(lease.max_expires_at.min(parent.expires_at))
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::super::testing::{POLICY, ask, id, rig, workload};
    use crate::model::{Delegation, Lease, LeaseState};
    #[allow(unused_imports)]
    use crate::store::conformance::TestWrites as _;

    /// A fresh `read` lease of the workload.
    async fn granted(r: &super::super::testing::Rig) -> Lease {
        match r
            .engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap()
        {
            Outcome::Granted { lease, .. } => lease,
            Outcome::Parked(_) => panic!("granted"),
        }
    }

    /// A lease delegated from `parent` at `depth`.
    fn child(of: &Lease, id: &str, depth: u32) -> Lease {
        Lease {
            id: id.into(),
            delegation: Some(Delegation {
                parent_id: of.id.clone(),
                depth,
                actors: vec![of.subject.clone()],
            }),
            state: LeaseState::Active,
            expired_at: None,
            ..of.clone()
        }
    }

    #[tokio::test]
    async fn revoking_a_lease_ends_its_whole_subtree_and_records_each() {
        let r = rig(POLICY).await;
        let root = granted(&r).await;
        // A tree: two children, a grandchild, and a child already ended.
        let (a, b) = (child(&root, "l_a", 1), child(&root, "l_b", 1));
        let grand = child(&a, "l_a1", 2);
        let ended = Lease {
            state: LeaseState::Expired,
            expired_at: Some(5),
            ..child(&root, "l_c", 1)
        };
        let under_ended = child(&ended, "l_c1", 2);
        for l in [&a, &b, &grand, &ended, &under_ended] {
            r.store.create_lease(l, None).await.unwrap();
        }
        let other = granted(&r).await;

        let (_, descendants) = r
            .engine
            .revoke_counted(&workload(), &root.id, "task finished")
            .await
            .unwrap();
        assert_eq!(descendants, 4, "the caller is told how many ended with it");
        for id in ["l_a", "l_b", "l_a1", "l_c1"] {
            let l = r.store.lease(id).await.unwrap().unwrap();
            assert_eq!(l.state, LeaseState::Revoked, "{id}");
            assert!(
                l.revoke_reason.as_deref().unwrap().contains(&root.id),
                "{id}: {:?}",
                l.revoke_reason
            );
        }
        assert_eq!(
            r.store.lease("l_c").await.unwrap().unwrap().state,
            LeaseState::Expired,
            "an ended lease keeps its end"
        );
        assert_eq!(
            r.store.lease(&other.id).await.unwrap().unwrap().state,
            LeaseState::Active,
            "a lease outside the tree is untouched"
        );
        let revoked = super::super::testing::actions(r.store.as_ref())
            .await
            .iter()
            .filter(|a| a.as_str() == "lease.revoked")
            .count();
        assert_eq!(
            revoked, 5,
            "the root and its four active descendants, one record each"
        );
    }

    #[tokio::test]
    async fn a_bulk_revocation_ends_what_was_delegated_too() {
        let r = rig(POLICY).await;
        let root = granted(&r).await;
        // Delegated to another identity: not among the subject's leases.
        let tool = Lease {
            subject: "spiffe://t/tool".into(),
            ..child(&root, "l_t", 1)
        };
        r.store.create_lease(&tool, None).await.unwrap();
        let n = r
            .engine
            .revoke_all(
                &id("spiffe://t/human/root"),
                workload().as_str(),
                "incident",
            )
            .await
            .unwrap();
        assert_eq!(
            n,
            (1, 1),
            "the subject's own leases, and the tool's delegated from one"
        );
        assert_eq!(
            r.store.lease("l_t").await.unwrap().unwrap().state,
            LeaseState::Revoked,
            "the tool's delegated lease ended with its parent"
        );
    }

    const DELEGATING: &str = r#"
[broker]
admins = ["admins"]
[groups]
admins = ["spiffe://t/human/root"]
[[scope]]
name = "read"
tier = "auto"
workloads = ["spiffe://t/w"]
default_ttl = "5m"
max_ttl = "1h"
[[delegation]]
from = ["spiffe://t/w"]
to = ["spiffe://t/tool"]
scopes = ["read"]
"#;

    #[tokio::test]
    async fn a_child_renews_only_within_its_parent_and_only_while_it_lives() {
        let r = rig(DELEGATING).await;
        let root = granted(&r).await;
        let tool = id("spiffe://t/tool");
        let kid = Lease {
            subject: tool.as_str().into(),
            client_id: workload().as_str().into(),
            max_expires_at: root.max_expires_at,
            ..child(&root, "l_kid", 1)
        };
        r.store.create_lease(&kid, None).await.unwrap();
        // Asked for an hour, it gets no further than its parent's end.
        let (_, renewed) = r
            .engine
            .renew(&tool, "l_kid", Some(std::time::Duration::from_secs(3600)))
            .await
            .unwrap();
        assert_eq!(renewed.expires_at, root.expires_at, "capped by the parent");

        // The parent ended: the child is ended with it and cannot renew.
        r.engine
            .revoke(&workload(), &root.id, "done")
            .await
            .unwrap();
        let e = r.engine.renew(&tool, "l_kid", None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "lease `l_kid` is revoked and cannot be renewed"
        );

        // A child whose record outlives its parent (a lease written before
        // the cap, say) still cannot renew once the parent's time is up.
        let root = granted(&r).await;
        let late = Lease {
            subject: tool.as_str().into(),
            expires_at: root.expires_at + 600_000,
            max_expires_at: root.expires_at + 600_000,
            ..child(&root, "l_late", 1)
        };
        r.store.create_lease(&late, None).await.unwrap();
        r.clock.advance(std::time::Duration::from_millis(
            root.expires_at - crate::clock::Clock::now(r.clock.as_ref()) + 1,
        ));
        let e = r.engine.renew(&tool, "l_late", None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "lease `l_late` was delegated from `{}`, which (or a lease it was delegated from) has ended; it cannot be renewed",
                root.id
            )
        );
    }

    #[tokio::test]
    async fn a_child_whose_delegation_the_policy_withdrew_cannot_renew() {
        let r = rig(DELEGATING).await;
        let root = granted(&r).await;
        let tool = id("spiffe://t/tool");
        let kid = Lease {
            subject: tool.as_str().into(),
            ..child(&root, "l_kid", 1)
        };
        r.store.create_lease(&kid, None).await.unwrap();
        let without = DELEGATING.split("[[delegation]]").next().unwrap();
        r.engine
            .set_policy(crate::policy::Policy::parse(without).unwrap());
        let e = r.engine.renew(&tool, "l_kid", None).await.unwrap_err();
        assert!(e.to_string().contains("no delegation rule"), "{e}");
    }

    #[tokio::test]
    async fn a_delegated_token_is_inactive_once_an_ancestor_has_ended() {
        let r = rig(DELEGATING).await;
        let root = granted(&r).await;
        // Two levels down, its record outliving the root's.
        let now = crate::clock::Clock::now(r.clock.as_ref());
        let middle = Lease {
            subject: "spiffe://t/tool".into(),
            expires_at: root.expires_at + 600_000,
            ..child(&root, "l_mid", 1)
        };
        let leaf = Lease {
            subject: "spiffe://t/tool".into(),
            expires_at: root.expires_at + 600_000,
            ..child(&middle, "l_leaf", 2)
        };
        r.store.create_lease(&middle, None).await.unwrap();
        r.store.create_lease(&leaf, None).await.unwrap();
        let keys = r.engine.keys().current();
        let leaf = Lease {
            delegation: Some(Delegation {
                parent_id: middle.id.clone(),
                depth: 2,
                actors: vec!["spiffe://t/agent".into(), workload().as_str().into()],
            }),
            ..leaf
        };
        r.store
            .swap_lease(&r.store.lease("l_leaf").await.unwrap().unwrap(), &leaf)
            .await
            .unwrap();
        let tok = crate::token::mint(&keys, &r.engine.claims(&leaf, now)).unwrap();
        // RFC 8693 §4.1: the current actor outermost, the earlier nested.
        let payload = tok.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            claims["act"],
            serde_json::json!({"sub": "spiffe://t/agent", "act": {"sub": "spiffe://t/w"}})
        );
        assert_eq!(claims["sub"], "spiffe://t/tool");
        assert!(
            r.engine.introspect(&tok).await.unwrap().is_some(),
            "active while its ancestors are"
        );
        r.clock
            .advance(std::time::Duration::from_millis(root.expires_at - now + 1));
        assert!(
            r.engine.introspect(&tok).await.unwrap().is_none(),
            "the root's time is up: the leaf is inactive though its own is not"
        );
    }
}

//! Cascade: a lease that ends takes every lease delegated from it, however
//! deep, with it (issue 12; docs/design-delegation.md). The subtree is
//! walked breadth-first through the store's `children` index; each active
//! descendant is revoked by compare-and-swap and gets its own audit record;
//! the caller makes them durable with its own, in one group commit.

use super::records::revoke_if_active;
use super::{Cas, Records};
use crate::audit::{Action, Entry as AuditEntry};
use crate::store::{Millis, StoreError};

/// Children read per index page.
const PAGE: usize = 1024;

/// Revoke every active lease delegated, directly or not, from `root`, as
/// `by` at `now`; their audit entries (the caller records them with its
/// own, in one group commit). Blocking store work: bulk callers run it off
/// the runtime.
pub(crate) fn end_descendants(
    records: &Records,
    root: &str,
    by: &str,
    why: &str,
    now: Millis,
) -> Result<Vec<AuditEntry>, StoreError> {
    let reason = format!("delegated from `{root}`, which ended: {why}");
    let mut entries = Vec::new();
    let mut frontier = vec![root.to_owned()];
    while let Some(parent) = frontier.pop() {
        let mut after: Option<String> = None;
        loop {
            let page = records.store().children(&parent, after.as_deref(), PAGE)?;
            let done = page.len() < PAGE;
            for id in page {
                let edit = revoke_if_active(by, &reason, now);
                if let Cas::Swapped { new, .. } = records.edit_lease::<StoreError>(&id, edit)? {
                    entries.push(AuditEntry::ok(
                        by,
                        Action::LeaseRevoked,
                        &id,
                        &new.scopes,
                        &reason,
                    ));
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
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::super::testing::{POLICY, ask, id, rig, workload};
    use crate::store::{Delegation, Lease, LeaseState};

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
        let r = rig(POLICY);
        let Outcome::Granted { lease: root, .. } = r
            .engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap()
        else {
            panic!("granted")
        };
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
            r.store.create_lease(l, None).unwrap();
        }
        let other = r
            .engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap();

        r.engine
            .revoke(&workload(), &root.id, "task finished")
            .await
            .unwrap();
        for id in ["l_a", "l_b", "l_a1", "l_c1"] {
            let l = r.store.lease(id).unwrap().unwrap();
            assert_eq!(l.state, LeaseState::Revoked, "{id}");
            assert!(
                l.revoke_reason.as_deref().unwrap().contains(&root.id),
                "{id}: {:?}",
                l.revoke_reason
            );
        }
        assert_eq!(
            r.store.lease("l_c").unwrap().unwrap().state,
            LeaseState::Expired,
            "an ended lease keeps its end"
        );
        let Outcome::Granted { lease: other, .. } = other else {
            panic!("granted")
        };
        assert_eq!(
            r.store.lease(&other.id).unwrap().unwrap().state,
            LeaseState::Active,
            "a lease outside the tree is untouched"
        );
        let revoked = super::super::testing::actions(r.store.as_ref())
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
        let r = rig(POLICY);
        let Outcome::Granted { lease: root, .. } = r
            .engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap()
        else {
            panic!("granted")
        };
        // Delegated to another identity: not among the subject's leases.
        let tool = Lease {
            subject: "spiffe://t/tool".into(),
            ..child(&root, "l_t", 1)
        };
        r.store.create_lease(&tool, None).unwrap();
        let n = r
            .engine
            .revoke_all(
                &id("spiffe://t/human/root"),
                workload().as_str(),
                "incident",
            )
            .await
            .unwrap();
        assert_eq!(n, 1, "the subject's own leases are counted");
        assert_eq!(
            r.store.lease("l_t").unwrap().unwrap().state,
            LeaseState::Revoked,
            "the tool's delegated lease ended with its parent"
        );
    }
}

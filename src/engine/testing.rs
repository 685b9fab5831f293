// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
//! Engines for unit tests: the in-memory store, a manual clock, a real key
//! ring and group commit.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Engine, Parts};
use crate::audit::AuditLog;
use crate::clock::ManualClock;
use crate::keys::{Kek, KeyRing, SigningAlg};
use crate::policy::Policy;
use crate::store::Store;
use crate::store::commit::GroupCommit;
use crate::store::mem::MemStore;

/// Start of the manual clock (ms since the epoch).
pub const T0: u64 = 1_000_000;

/// A test engine and what drives it.
pub struct Rig {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Its clock.
    pub clock: Arc<ManualClock>,
    /// Its store.
    pub store: Arc<dyn Store>,
    cancel: CancellationToken,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// An engine over `store` with `policy` (TOML) at [`T0`].
pub async fn rig_on(store: Arc<dyn Store>, policy: &str) -> Rig {
    rig_limited(store, policy, super::Limits::default()).await
}

/// [`rig_on`] with other per-caller bounds.
pub async fn rig_limited(store: Arc<dyn Store>, policy: &str, limits: super::Limits) -> Rig {
    let (kek, _) = Kek::generate().unwrap();
    let keys = Arc::new(
        KeyRing::load_or_create(store.as_ref(), &kek, SigningAlg::Es256, T0)
            .await
            .unwrap(),
    );
    let cancel = CancellationToken::new();
    let (commit, _flusher) = GroupCommit::start(store.clone(), cancel.clone());
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Arc::new(Engine::new(Parts {
        store: store.clone(),
        commit,
        policy: Policy::parse(policy).unwrap(),
        keys,
        clock: clock.clone(),
        issuer: "https://t".into(),
        audit: AuditLog::open(store.as_ref()).await.unwrap(),
        limits,
    }));
    // No leadership task here: the rig's engine leads from the start.
    engine.set_leading(true, None, None);
    Rig {
        engine,
        clock,
        store,
        cancel,
    }
}

/// An engine over a fresh in-memory store.
pub async fn rig(policy: &str) -> Rig {
    rig_on(Arc::new(MemStore::new()), policy).await
}

/// A policy with one auto scope, one approval scope (2 of 3 approvers,
/// break-glass allowed) and an admin.
pub const POLICY: &str = r#"
[broker]
admins = ["admins"]
auditors = ["auditors"]
[groups]
owners = ["spiffe://t/human/alice", "spiffe://t/human/bob", "spiffe://t/w"]
admins = ["spiffe://t/human/root"]
auditors = ["spiffe://t/human/carol"]
[[scope]]
name = "read"
tier = "auto"
workloads = ["spiffe://t/*"]
default_ttl = "5m"
max_ttl = "1h"
[[scope]]
name = "admin"
tier = "approval"
workloads = ["spiffe://t/w"]
approvers = ["owners"]
approvals_required = 2
pending_ttl = "30m"
claim_ttl = "10m"
max_ttl = "15m"
break_glass = { allowed = true, max_ttl = "5m" }
"#;

/// An identity.
pub fn id(s: &str) -> crate::identity::Identity {
    crate::identity::Identity::parse(s).unwrap()
}

/// The workload every test asks as.
pub fn workload() -> crate::identity::Identity {
    id("spiffe://t/w")
}

/// An ask for `scopes`.
pub fn ask(scopes: &[&str]) -> super::TokenAsk {
    super::TokenAsk {
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// The actions of the trail, in order.
pub async fn actions(store: &dyn Store) -> Vec<String> {
    store
        .audit_after(None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, b)| {
            serde_json::from_slice::<crate::audit::AuditRecord>(&b)
                .unwrap()
                .action
        })
        .collect()
}

/// Ask for `scopes` as the workload; the request it parks.
pub async fn parked(r: &Rig, scopes: &[&str]) -> crate::model::TokenRequest {
    // Approval scopes need a reason for their approvers.
    let asked = super::TokenAsk {
        justification: "ticket 7".into(),
        ..ask(scopes)
    };
    match r.engine.request_token(&workload(), asked).await.unwrap() {
        super::Outcome::Parked(req) => req,
        super::Outcome::Granted { .. } => panic!("{scopes:?} was granted, not parked"),
    }
}

/// Ask for `scopes` as the workload; the lease it grants.
pub async fn granted(r: &Rig, scopes: &[&str]) -> crate::model::Lease {
    match r
        .engine
        .request_token(&workload(), ask(scopes))
        .await
        .unwrap()
    {
        super::Outcome::Granted { lease, .. } => lease,
        super::Outcome::Parked(_) => panic!("{scopes:?} was parked, not granted"),
    }
}

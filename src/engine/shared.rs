//! What changes when several brokers share one store: only the leader does
//! the time-driven work (expiry, retention, rotation steps, checkpoints),
//! and news of other brokers' changes — a decided request, a rotated key
//! ring, new trail records — reaches this broker's watchers, key ring and
//! followers.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Engine, EngineError};
use crate::store::{Fence, StoreError};

/// The role a broker holds while it changes the key ring of a shared store,
/// so rotation steps (scheduled, or asked for on any broker) never
/// interleave.
const KEYS_ROLE: &str = "keys";
/// Longest a key-ring change may hold [`KEYS_ROLE`].
const KEYS_TERM_MS: u64 = 30_000;
/// Longest a key-ring change waits for another to finish.
const KEYS_WAIT: Duration = Duration::from_secs(15);

/// What a request watcher is sent when any request may have changed.
pub(super) const ANY_REQUEST: &str = "*";

impl Engine {
    /// Does this broker do the time-driven work now? On a shared store only
    /// until half a term after its last renewal started, whatever the
    /// leadership task has (not yet) said: a broker whose renewals hang
    /// stops acting before another can take the role.
    pub fn leads(&self) -> bool {
        *self.leader.borrow()
            && self
                .lead_until
                .lock()
                .is_ok_and(|u| u.is_none_or(|u| Instant::now() < u))
    }

    /// The leadership task's verdict: leading until `until` (`None`: no
    /// limit, a store of its own) in the term `fence` names (`None`: no
    /// fence, a store of its own), or not leading.
    pub fn set_leading(&self, leading: bool, until: Option<Instant>, fence: Option<Fence>) {
        if let Ok(mut u) = self.lead_until.lock() {
            *u = until;
        }
        if let Ok(mut f) = self.upkeep_fence.lock() {
            *f = fence;
        }
        self.leader.send_if_modified(|l| {
            let changed = *l != leading;
            *l = leading;
            changed
        });
    }

    fn set_keys_fence(&self, fence: Option<Fence>) {
        if let Ok(mut f) = self.keys_fence.lock() {
            *f = fence;
        }
    }

    /// Wait until this broker leads; `false` if `cancel` fired first.
    pub async fn until_leading(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.leader.subscribe();
        loop {
            rx.borrow_and_update();
            if self.leads() {
                return true;
            }
            // Not leading, or leading past the deadline while a renewal
            // hangs: wait for a verdict, looking again now and then.
            tokio::select! {
                () = cancel.cancelled() => return false,
                r = rx.changed() => if r.is_err() { return false },
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Act on news from the shared store (see [`crate::store::Store::changes`]):
    /// `request:<id>`, `keys`, or `*` (anything may have changed).
    pub async fn heard(&self, news: &str) {
        if let Some(id) = news.strip_prefix("request:") {
            let _ = self.request_events.send(id.to_owned());
            return;
        }
        if news == "keys" || news == "*" {
            match self.keys.refresh(self.store().as_ref()).await {
                Ok(true) => tracing::info!("key ring changed by another broker; reloaded"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not reload the key ring"),
            }
        }
        if news == "*" {
            let _ = self.request_events.send(ANY_REQUEST.to_owned());
        }
    }

    /// Run `change` (a key-ring change) alone among every broker of a
    /// shared store, on the newest stored ring; at once on a store of its
    /// own.
    pub(super) async fn alone_on_keys<T>(
        &self,
        change: impl Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        // One path for every store: one of its own grants the role at
        // once, and ignores the fence.
        let store = self.store().clone();
        let me = crate::text::new_id("keys_", self.clock.now())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let until = Instant::now() + KEYS_WAIT;
        let generation = loop {
            let mine = store.lead(KEYS_ROLE, &me, KEYS_TERM_MS).await?;
            if let Some(generation) = mine {
                break generation;
            }
            if Instant::now() > until {
                return Err(StoreError::Contended(
                    "another broker has been changing the key ring for too long".into(),
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The change's batches carry this term: should it run past the term
        // and another broker take the role, the store refuses them.
        self.set_keys_fence(Some(Fence {
            role: KEYS_ROLE.into(),
            holder: me.clone(),
            generation,
        }));
        let result = match self.keys.refresh(store.as_ref()).await {
            Ok(_) => change.await,
            Err(e) => Err(e.into()),
        };
        self.set_keys_fence(None);
        if let Err(e) = store.resign(KEYS_ROLE, &me).await {
            tracing::warn!(error = %e, "could not give up the key-ring role; it lapses with its term");
        }
        result
    }
}

//! What changes when several brokers share one store: only the leader does
//! the time-driven work (expiry, retention, rotation steps, checkpoints),
//! and news of other brokers' changes — a decided request, a rotated key
//! ring, new trail records — reaches this broker's watchers, key ring and
//! followers.

use tokio_util::sync::CancellationToken;

use super::Engine;

/// What a request watcher is sent when any request may have changed.
pub(super) const ANY_REQUEST: &str = "*";

impl Engine {
    /// Does this broker do the time-driven work now?
    pub fn leads(&self) -> bool {
        *self.leader.borrow()
    }

    /// The leadership task's verdict.
    pub fn set_leading(&self, leading: bool) {
        self.leader.send_if_modified(|l| {
            let changed = *l != leading;
            *l = leading;
            changed
        });
    }

    /// Wait until this broker leads; `false` if `cancel` fired first.
    pub async fn until_leading(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.leader.subscribe();
        loop {
            if *rx.borrow_and_update() {
                return true;
            }
            tokio::select! {
                () = cancel.cancelled() => return false,
                r = rx.changed() => if r.is_err() { return false },
            }
        }
    }

    /// Act on news from the shared store (see [`crate::store::Store::changes`]):
    /// `request:<id>`, `keys`, or `*` (anything may have changed).
    pub fn heard(&self, news: &str) {
        if let Some(id) = news.strip_prefix("request:") {
            let _ = self.request_events.send(id.to_owned());
            return;
        }
        if news == "keys" || news == "*" {
            match self.keys.refresh(self.store().as_ref()) {
                Ok(true) => tracing::info!("key ring changed by another broker; reloaded"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not reload the key ring"),
            }
        }
        if news == "*" {
            let _ = self.request_events.send(ANY_REQUEST.to_owned());
        }
    }
}

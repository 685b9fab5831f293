//! Per-identity bounds on what one caller can hold open: parked requests
//! and live watch streams. One identity must not exhaust what every other
//! identity shares (memory, store scans, connections' streams).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Engine, EngineError};
use crate::identity::Identity;

/// The bounds, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open requests (pending, approved and unclaimed) one identity may have.
    pub open_requests_per_identity: usize,
    /// `WatchRequest` streams one identity may hold at once.
    pub watches_per_identity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            open_requests_per_identity: 20,
            watches_per_identity: 64,
        }
    }
}

/// Live watch streams per identity.
#[derive(Default)]
pub(super) struct Watchers(Arc<Mutex<HashMap<String, usize>>>);

/// One live watch stream; released when dropped.
pub struct WatchPermit {
    table: Arc<Mutex<HashMap<String, usize>>>,
    who: String,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut t = match self.table.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = t.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.who);
            }
        }
    }
}

/// Who made `r`: the holder who asked for an exchange (the nearest actor),
/// else its requester.
fn made_by(r: &crate::model::TokenRequest) -> &str {
    r.delegation
        .as_ref()
        .and_then(|d| d.actors.first())
        .map_or(r.requester.as_str(), String::as_str)
}

fn exhausted(what: String) -> EngineError {
    EngineError::Exhausted(what)
}

impl Engine {
    /// A permit for one more watch stream by `who`, or RESOURCE_EXHAUSTED.
    pub(super) fn watch_permit(&self, who: &Identity) -> Result<WatchPermit, EngineError> {
        let max = self.limits.watches_per_identity;
        let table = self.watchers.0.clone();
        let mut t = match table.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        let n = t.entry(who.as_str().to_owned()).or_insert(0);
        if *n >= max {
            return Err(exhausted(format!(
                "at most {max} open watch streams per identity (--max-watches); close one first"
            )));
        }
        *n += 1;
        drop(t);
        Ok(WatchPermit {
            table,
            who: who.as_str().to_owned(),
        })
    }

    /// Refuse a new parked request when `who` already has the most allowed
    /// open. A request counts against whoever made it: its requester, or —
    /// for an exchange parked for another identity — the holder who asked
    /// (so no one can fill a recipient's quota).
    pub(super) async fn check_open_requests(&self, who: &Identity) -> Result<(), EngineError> {
        let max = self.limits.open_requests_per_identity;
        let mut mine = 0;
        let mut after: Option<String> = None;
        loop {
            let chunk = self.store().open_requests(after.as_deref(), 256).await?;
            let Some(last) = chunk.last() else {
                return Ok(());
            };
            after = Some(last.id.clone());
            mine += chunk.iter().filter(|r| made_by(r) == who.as_str()).count();
            if mine >= max {
                return Err(exhausted(format!(
                    "at most {max} open requests per identity (--max-open-requests); withdraw one or wait for a decision"
                )));
            }
            if chunk.len() < 256 {
                return Ok(());
            }
        }
    }
}

//! Per-identity bounds on what one caller can hold open — parked requests,
//! live watch streams, children of one lease — and on how fast one caller
//! may ask for what costs others (token exchanges, console links, OpenID
//! sign-ins). One identity must not exhaust what every other identity
//! shares (memory, store scans, connections' streams, approvers' attention,
//! the provider's token endpoint).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Engine, EngineError};
use crate::identity::Identity;
use crate::store::Millis;

/// The bounds, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open requests (pending, approved and unclaimed) one identity may have.
    pub open_requests_per_identity: usize,
    /// `WatchRequest` streams one identity may hold at once.
    pub watches_per_identity: usize,
    /// Leases delegated directly from one lease over its life (the size of
    /// a subtree a revocation ends in one batch stays bounded); 0: no limit.
    pub children_per_lease: usize,
    /// `ExchangeToken` calls per identity (a rate of 0: no limit).
    pub exchanges: Rate,
    /// `CreateConsoleLink` calls per identity.
    pub console_links: Rate,
    /// Console sign-ins (OpenID starts and callbacks, link uses) per peer
    /// address (an IPv6 /64 is one peer).
    pub sign_ins: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            open_requests_per_identity: 20,
            watches_per_identity: 64,
            children_per_lease: 1000,
            exchanges: Rate {
                burst: 100,
                per_minute: 6000,
            },
            console_links: Rate {
                burst: 10,
                per_minute: 10,
            },
            sign_ins: Rate {
                burst: 30,
                per_minute: 60,
            },
        }
    }
}

/// How often a caller may do something: `burst` at once, then
/// `per_minute` a minute on average (0 a minute: no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Calls allowed back to back.
    pub burst: u32,
    /// Calls a minute once the burst is spent.
    pub per_minute: u32,
}

/// Keys a throttle remembers at most; past that, a key it has not seen is
/// refused until old ones are forgotten (fail closed, memory bounded).
const THROTTLE_KEYS: usize = 65_536;

/// A [`Rate`] per key (an identity, a peer address), by the generic cell
/// rate algorithm: each key keeps one number, the time its next call is
/// due; a call more than the burst ahead of that is refused. Time comes
/// from the caller (`now`), so tests run on a manual clock.
pub struct Throttle {
    rate: Rate,
    due: Mutex<HashMap<String, Millis>>,
}

impl Throttle {
    /// A throttle at `rate`.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            due: Mutex::new(HashMap::new()),
        }
    }

    /// Admit one call by `key` at `now`, or say how long until one would be.
    pub fn admit(&self, key: &str, now: Millis) -> Result<(), std::time::Duration> {
        if self.rate.per_minute == 0 {
            return Ok(());
        }
        let interval = 60_000 / u64::from(self.rate.per_minute.max(1));
        let tolerance = interval * u64::from(self.rate.burst.max(1) - 1);
        let mut due = match self.due.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        if !due.contains_key(key) && due.len() >= THROTTLE_KEYS {
            due.retain(|_, at| *at > now);
            if due.len() >= THROTTLE_KEYS {
                return Err(std::time::Duration::from_millis(interval));
            }
        }
        let at = due.get(key).copied().unwrap_or(now).max(now);
        if at - now > tolerance {
            return Err(std::time::Duration::from_millis(at - now - tolerance));
        }
        due.insert(key.to_owned(), at + interval);
        Ok(())
    }
}

/// The key a peer is counted under: an IPv4 address (IPv4-mapped IPv6
/// too), or an IPv6 /64 (one host usually holds a whole /64).
pub fn peer_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[4..].fill(0);
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(s))
        }
        v4 => v4,
    }
}

/// RESOURCE_EXHAUSTED for a throttled call: what, and when to try again.
pub fn too_fast(what: &str, wait: std::time::Duration) -> EngineError {
    let secs = wait.as_millis().div_ceil(1000).max(1);
    EngineError::Exhausted(format!("{what}: too many calls; try again in {secs} s"))
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

fn exhausted(what: String) -> EngineError {
    EngineError::Exhausted(what)
}

impl Engine {
    /// Refuse one more child of `parent` when it has had as many as one
    /// lease may over its life.
    pub(super) async fn check_children(
        &self,
        parent: &crate::model::Lease,
    ) -> Result<(), EngineError> {
        let max = self.limits.children_per_lease;
        if max == 0 {
            return Ok(());
        }
        let had = self.store().children(&parent.id, None, max).await?.len();
        if had >= max {
            return Err(exhausted(format!(
                "lease `{}` has had {max} delegated leases, as many as one lease may: ask for a new one",
                parent.id
            )));
        }
        Ok(())
    }

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
            // Only the requests that concern `who` are read.
            let chunk = self
                .store()
                .open_requests_of(who.as_str(), after.as_deref(), 256)
                .await?;
            let Some(last) = chunk.last() else {
                return Ok(());
            };
            after = Some(last.id.clone());
            mine += chunk.iter().filter(|r| r.made_by() == who.as_str()).count();
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

#[cfg(test)]
mod tests {
    use super::{Rate, Throttle, peer_key};

    #[test]
    fn peers_are_counted_by_ipv4_address_or_ipv6_slash_64() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(peer_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(peer_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(peer_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            peer_key(ip("2001:db8:1:2:bbbb::9")),
            peer_key(ip("2001:db8:1:2:aaaa::1")),
            "one host's /64 is one peer"
        );
        assert_ne!(
            peer_key(ip("2001:db8:1:3::1")),
            peer_key(ip("2001:db8:1:2::1"))
        );
    }

    #[test]
    fn a_throttle_admits_its_burst_then_its_rate_per_key() {
        let t = Throttle::new(Rate {
            burst: 3,
            per_minute: 60,
        });
        let now = 1_000_000;
        for _ in 0..3 {
            assert!(t.admit("a", now).is_ok());
        }
        let wait = t.admit("a", now).unwrap_err();
        assert_eq!(wait.as_millis(), 1_000, "one a second");
        assert!(t.admit("b", now).is_ok(), "another key has its own");
        assert!(t.admit("a", now + 999).is_err());
        assert!(t.admit("a", now + 1_000).is_ok());
        assert!(t.admit("a", now + 1_000).is_err());
        // Idle long enough, the whole burst is back (and no more).
        let later = now + 60_000;
        for _ in 0..3 {
            assert!(t.admit("a", later).is_ok());
        }
        assert!(t.admit("a", later).is_err());
    }
}

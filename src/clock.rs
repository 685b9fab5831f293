//! Time as a parameter. The broker reads time only through a [`Clock`], so
//! tests drive expiry with a [`ManualClock`] instead of sleeping.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// Milliseconds since the Unix epoch. All stored times use it.
pub type Millis = u64;

/// A source of wall-clock time that can also be slept on.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
    /// Resolve once `now() >= at` (callers re-check the time after waking).
    fn sleep_until(&self, at: Millis) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn sleep_until(&self, at: Millis) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wait = at.saturating_sub(self.now());
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
    moved: watch::Sender<Millis>,
}

impl ManualClock {
    /// Start at `start`.
    pub fn new(start: Millis) -> Self {
        Self {
            now: AtomicU64::new(start),
            moved: watch::channel(start).0,
        }
    }

    /// Current time in whole seconds.
    pub fn now_secs(&self) -> i64 {
        i64::try_from(self.now() / 1000).unwrap_or(i64::MAX)
    }

    /// Move forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let now = self.now.fetch_add(by, Ordering::SeqCst) + by;
        self.moved.send_replace(now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, at: Millis) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.moved.subscribe();
        Box::pin(async move {
            while self.now() < at {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

/// Unix seconds of a millisecond time.
pub fn secs(ms: Millis) -> u64 {
    ms / 1000
}

/// A `Duration` as whole milliseconds (saturating).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

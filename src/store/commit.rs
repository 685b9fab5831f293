//! Group commit: many concurrent writers, one `flush` + fsync per batch.
//!
//! A writer applies its write to the store, then awaits [`GroupCommit::durable`].
//! That takes a ticket (a sequence number taken *after* the write was
//! applied) and wakes the single flusher task. The flusher reads the highest
//! ticket handed out, awaits one [`Store::sync`], and
//! publishes that ticket as durable; every writer whose ticket is covered
//! returns. Writers that arrive while a sync is running form the next batch.
//!
//! INVARIANT: a ticket is published as durable only by a sync that *started*
//! after the ticket was taken, hence after the write it covers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// Most scheduler rounds the flusher waits for more writers before a sync.
const LINGER_ROUNDS: usize = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// Every ticket up to this one was covered by a failed sync (and by no
    /// successful one yet).
    failed: u64,
    /// Syncs done and the tickets they covered, for the batch-size metric.
    syncs: u64,
}

/// Handle writers use to wait for durability.
#[derive(Clone)]
pub struct GroupCommit {
    inner: Arc<Inner>,
}

struct Inner {
    issued: AtomicU64,
    wake: Notify,
    progress: watch::Sender<Progress>,
}

/// Counters of the commit path.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitStats {
    /// Number of syncs run.
    pub syncs: u64,
    /// Number of writes covered.
    pub writes: u64,
}

impl GroupCommit {
    /// Start the flusher for `store`. It runs until `cancel` fires, then makes
    /// one last sync so nothing acknowledged is left behind.
    pub fn start(
        store: Arc<dyn Store>,
        cancel: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, _) = watch::channel(Progress::default());
        let inner = Arc::new(Inner {
            issued: AtomicU64::new(0),
            wake: Notify::new(),
            progress: tx,
        });
        let task = tokio::spawn(flusher(inner.clone(), store, cancel));
        (Self { inner }, task)
    }

    /// Wait until every write this caller applied before the call is durable.
    /// `Err` means the covering sync failed: the caller must not acknowledge
    /// anything that depends on the write.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let mut rx = self.inner.progress.subscribe();
        let ticket = self.inner.issued.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.wake.notify_one();
        loop {
            {
                let p = *rx.borrow_and_update();
                if p.durable >= ticket {
                    return Ok(());
                }
                if p.failed >= ticket {
                    return Err(StoreError::Unavailable(
                        "could not make the write durable".into(),
                    ));
                }
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Stopping);
            }
        }
    }

    /// Ask for a sync soon without waiting for it: for writes nobody waits
    /// on (a noted refusal on a shared store, whose records become visible
    /// only when a sync chains them).
    pub fn nudge(&self) {
        self.inner.issued.fetch_add(1, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// Did the latest sync succeed (or has there been none)?
    pub fn healthy(&self) -> bool {
        let p = *self.inner.progress.borrow();
        p.failed == 0 || (p.durable >= p.failed && p.failed != u64::MAX)
    }

    /// Counters so far.
    pub fn stats(&self) -> CommitStats {
        let p = *self.inner.progress.borrow();
        CommitStats {
            syncs: p.syncs,
            writes: p.durable.max(p.failed),
        }
    }
}

async fn flusher(inner: Arc<Inner>, store: Arc<dyn Store>, cancel: CancellationToken) {
    let mut done = 0u64;
    loop {
        let stopping = tokio::select! {
            () = inner.wake.notified() => false,
            () = cancel.cancelled() => true,
        };
        // Linger while writers are still arriving: each round lets every
        // task that is ready run once (e.g. the writers the last sync just
        // released), so they join this batch instead of forcing one sync
        // each. Stops as soon as a round brings nobody new.
        let mut target = inner.issued.load(Ordering::SeqCst);
        for _ in 0..LINGER_ROUNDS {
            tokio::task::yield_now().await;
            let now = inner.issued.load(Ordering::SeqCst);
            if now == target {
                break;
            }
            target = now;
        }
        // The last round syncs even without a ticket: a shared store may
        // hold records queued by writes nobody waited on.
        if target > done || stopping {
            let result = store.sync().await;
            inner.progress.send_modify(|p| {
                p.syncs += 1;
                match &result {
                    Ok(()) => p.durable = target,
                    Err(_) => p.failed = target,
                }
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "group commit sync failed; writes in this batch are not acknowledged");
            }
            done = target;
        }
        if stopping {
            // Nothing written from now on can be acknowledged.
            inner.progress.send_modify(|p| p.failed = u64::MAX);
            return;
        }
    }
}

//! Time-driven work: one task that sleeps until the next lease or request
//! deadline, wakes early when an earlier one is inserted, and survives a
//! restart by reading its next deadline from the store's indexes (it never
//! loads every lease).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::grant::Engine;

/// How long to back off after a store error before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// Run until `cancel` fires.
pub async fn run(engine: Arc<Engine>, cancel: CancellationToken) {
    loop {
        let now = engine.clock().now();
        let result = match engine.expire_due(now).await {
            Ok(_) => engine.next_deadline(),
            Err(e) => Err(e),
        };
        let next = match result {
            Ok(next) => {
                engine.publish_progress(now);
                next
            }
            Err(e) => {
                tracing::error!(error = %e, "expiry sweep failed; retrying");
                Some(now + RETRY.as_millis() as u64)
            }
        };
        let clock = engine.clock().clone();
        let sleep = async {
            match next {
                Some(at) => clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = engine.woken().notified() => {}
            () = sleep => {}
        }
    }
}

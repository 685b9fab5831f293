//! The broker's background loops, each until the root cancellation token
//! fires: policy reload, audit checkpoints (and audit retention), health
//! reporting, key rotation, and retention of ended records.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::audit::{Action, Entry, Outcome};
use crate::clock::millis;
use crate::engine::{Engine, SYSTEM_ACTOR};
use crate::policy::Policy;
use crate::rotation::Schedule;

/// Sign an audit checkpoint after this many records…
const CHECKPOINT_EVERY: u64 = 1000;
/// …or this long, whichever comes first.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// How often health is re-read.
const HEALTH_POLL: Duration = Duration::from_millis(500);
/// Back-off after a failed rotation step.
const ROTATION_RETRY_MS: u64 = 5_000;
/// How often retention sweeps.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// The role whose holder does the time-driven work on a shared store.
pub(super) const UPKEEP_ROLE: &str = "upkeep";
/// How long a leader's term lasts unless renewed: the longest the
/// time-driven work pauses when a leader dies without resigning.
pub(super) const LEADER_TERM: Duration = Duration::from_secs(5);
/// How often the leader renews (and others try to take over).
const LEADER_RENEW: Duration = Duration::from_secs(1);
/// How often a broker on a shared store looks for changes it may not have
/// been told of (engines without `LISTEN/NOTIFY`, a lost listener).
const SHARED_POLL: Duration = Duration::from_millis(500);

/// Sleep until `at` on the engine's clock, forever when `None`.
async fn sleep_until(engine: &Engine, at: Option<u64>) {
    match at {
        Some(at) => engine.clock().sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reload the policy when its file changes (polled every `poll`) or on
/// SIGHUP. A policy with problems is rejected and the old one stays.
pub(super) async fn reload_policy(
    engine: Arc<Engine>,
    path: PathBuf,
    poll: Duration,
    cancel: CancellationToken,
) {
    // Compare contents, not mtimes: two writes inside one timestamp tick
    // (coarse on many filesystems) would otherwise go unnoticed.
    let read = |p: &PathBuf| std::fs::read(p).ok();
    let mut seen = read(&path);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup_fut = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fut = std::future::pending::<()>();
        let forced = tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(poll) => false,
            () = hup_fut => true,
        };
        let now = read(&path);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        load_policy(&engine, &path).await;
    }
}

/// Load the policy at `path` and swap it in once its load is recorded.
async fn load_policy(engine: &Engine, path: &Path) {
    let shown = path.display().to_string();
    match Policy::load(path) {
        Ok(p) => {
            let entry = Entry::ok(SYSTEM_ACTOR, Action::PolicyLoaded, &shown, &[], "reload");
            // Fail closed: a policy whose load cannot be recorded is not swapped in.
            match engine.record(vec![entry]).await {
                Ok(()) => {
                    engine.set_policy(p);
                    tracing::info!(path = %shown, "policy reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload not recorded; the previous policy stays in force");
                }
            }
        }
        Err(e) => {
            tracing::error!(path = %shown, error = %e, "new policy rejected; the previous policy stays in force");
            let entry = Entry::ok(
                SYSTEM_ACTOR,
                Action::PolicyRejected,
                &shown,
                &[],
                &e.to_string(),
            )
            .outcome(Outcome::Refused);
            if let Err(e) = engine.record(vec![entry]).await {
                tracing::error!(error = %e, "could not record the rejected policy");
            }
            engine.policy_rejected();
        }
    }
}

/// Sign an audit checkpoint every [`CHECKPOINT_EVERY`] records or
/// [`CHECKPOINT_INTERVAL`], whichever comes first, and once more at
/// shutdown; with `retention`, compact what is older after each.
pub(super) async fn checkpoints(
    engine: Arc<Engine>,
    retention: Option<Duration>,
    witness: Witness,
    cancel: CancellationToken,
) {
    let mut last = tokio::time::Instant::now();
    // Keys withdrawn in an emergency (on any broker: the key ring follows
    // the store): what they signed proves nothing, so a trusted key signs
    // over the trail at once, not at the next interval.
    let withdrawn = || engine.keys().current().withdrawn.len();
    let mut withdrawn_seen = withdrawn();
    loop {
        let stop = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        if engine.leads()
            && (stop
                || withdrawn() != withdrawn_seen
                || crate::audit::AuditLog::since_checkpoint(engine.store().as_ref())
                    .await
                    .is_ok_and(|n| n >= CHECKPOINT_EVERY)
                || last.elapsed() >= CHECKPOINT_INTERVAL)
        {
            withdrawn_seen = withdrawn();
            checkpoint(&engine, retention, &witness).await;
            last = tokio::time::Instant::now();
        }
        if stop {
            return;
        }
    }
}

/// Where signed checkpoints are copied, out of the store writer's reach.
#[derive(Clone, Debug, Default)]
pub(super) struct Witness {
    /// Appended to, one JWS per line.
    pub(super) file: Option<PathBuf>,
    /// POSTed to, `{"checkpoint": JWS, "seq": N}`.
    pub(super) url: Option<String>,
}

impl Witness {
    /// The witnesses `cfg` names.
    pub(super) fn of(cfg: &super::ServeConfig) -> Self {
        Self {
            file: cfg.audit_witness.clone(),
            url: cfg.audit_witness_url.clone(),
        }
    }

    /// Hand one checkpoint to every configured witness; failures are logged
    /// (the checkpoint is in the store either way).
    async fn hand_over(&self, seq: u64, jws: &str) {
        if let Some(path) = &self.file
            && let Err(e) = witness_append(path, jws)
        {
            tracing::error!(path = %path.display(), error = %e, "could not hand the checkpoint to the witness file");
        }
        if let Some(url) = &self.url {
            let body = serde_json::json!({ "checkpoint": jws, "seq": seq }).to_string();
            if let Err(e) = crate::notify::deliver(url, &body).await {
                tracing::error!(url = %url, error = %e, "could not hand the checkpoint to the witness URL");
            }
        }
    }
}

/// At start, by the broker that leads: a checkpoint over what is stored,
/// the start's records included.
pub(super) async fn first_checkpoint(engine: &Engine, witness: &Witness) {
    if !engine.leads() {
        return;
    }
    if let Err(e) = engine.settled().await {
        tracing::error!(error = %e, "the start's records were not applied; no first checkpoint");
        return;
    }
    checkpoint(engine, None, witness).await;
}

async fn checkpoint(engine: &Engine, retention: Option<Duration>, witness: &Witness) {
    match engine.sign_checkpoint().await {
        Ok(Some((seq, jws))) => {
            tracing::debug!(seq, "audit checkpoint signed");
            witness.hand_over(seq, &jws).await;
            if let Some(keep) = retention {
                let before = engine.clock().now().saturating_sub(millis(keep));
                if let Err(e) = engine.compact_audit(before).await {
                    tracing::error!(error = %e, "audit compaction failed");
                }
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "audit checkpoint failed"),
    }
}

/// Append one checkpoint to the witness file, durably.
fn witness_append(path: &Path, jws: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    writeln!(f, "{jws}")?;
    f.sync_data()
}

/// Report `grpc.health.v1` SERVING while the store answers and the last
/// group commit succeeded, NOT_SERVING otherwise.
pub(super) async fn health(
    engine: Arc<Engine>,
    reporter: tonic_health::server::HealthReporter,
    cancel: CancellationToken,
) {
    use crate::pb::{approvals_server, audit_server, broker_server, keys_server};
    let mut serving = None;
    loop {
        let ok = engine.healthy().await;
        engine.set_serving(ok);
        if serving != Some(ok) {
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in [
                "",
                broker_server::SERVICE_NAME,
                approvals_server::SERVICE_NAME,
                keys_server::SERVICE_NAME,
                audit_server::SERVICE_NAME,
            ] {
                reporter.set_service_status(name, status).await;
            }
            if !ok {
                tracing::error!("store unhealthy: reporting NOT_SERVING");
            }
            serving = Some(ok);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
}

/// Carry out key rotation steps as they fall due; an operator's
/// `Keys.Rotate` wakes it early. The schedule is derived from the stored key
/// records, so it survives restarts.
pub(super) async fn rotate(
    engine: Arc<Engine>,
    schedule: Schedule,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    while engine.until_leading(&cancel).await {
        // An emergency rotation a broker did not live to complete.
        if let Err(e) = engine.finish_withdrawals().await {
            tracing::error!(error = %e, "could not finish an emergency rotation's revocations; retrying");
        }
        let now = engine.clock().now();
        let next = match engine.rotate_due(&schedule, now).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "key rotation step failed; the current keys stay in use");
                Some(now + ROTATION_RETRY_MS)
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = wake.notified() => {}
            () = sleep_until(&engine, next) => {}
        }
    }
}

/// Hourly: delete leases and requests that ended more than `keep` ago.
pub(super) async fn retention(engine: Arc<Engine>, keep: Duration, cancel: CancellationToken) {
    while engine.until_leading(&cancel).await {
        let before = engine.clock().now().saturating_sub(millis(keep));
        if let Err(e) = engine.purge_ended(before).await {
            tracing::error!(error = %e, "retention sweep failed");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(RETENTION_EVERY) => {}
        }
    }
}

/// Start the gauges from the store's counts, off the start-up path.
pub(super) async fn count_gauges(engine: Arc<Engine>) {
    match engine.store().counts().await {
        Ok((leases, requests)) => {
            let m = engine.metrics();
            m.active_leases
                .inc_by(i64::try_from(leases).unwrap_or(i64::MAX));
            m.open_requests
                .inc_by(i64::try_from(requests).unwrap_or(i64::MAX));
        }
        _ => tracing::warn!("could not count leases for the gauges"),
    }
}

/// Hold the upkeep role while this broker can, renewing every
/// [`LEADER_RENEW`]; stop acting at the first renewal that fails. A store of
/// its own grants generation 0, a term that never ends: no deadline, no
/// fence. The role is given up by [`super::Running::shutdown`], after the
/// last leader-only step (a final checkpoint) ran under it.
pub(super) async fn lead(engine: Arc<Engine>, node: String, cancel: CancellationToken) {
    loop {
        lead_round(&engine, &node).await;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(LEADER_RENEW) => {}
        }
    }
}

/// Take or keep the upkeep role once and tell the engine. The first round
/// runs before the broker starts its tasks (`super::start`), so a store of
/// its own leads from the start, as its work expects.
pub(super) async fn lead_round(engine: &Engine, node: &str) {
    let term = millis(LEADER_TERM);
    {
        let asked = std::time::Instant::now();
        let held = engine.store().lead(UPKEEP_ROLE, node, term).await;
        let (leading, until, fence) = match &held {
            Ok(Some(0)) => (true, None, None),
            Ok(Some(generation)) => (
                true,
                Some(asked + LEADER_TERM / 2),
                Some(crate::store::Fence {
                    role: UPKEEP_ROLE.into(),
                    holder: node.to_owned(),
                    generation: *generation,
                }),
            ),
            _ => (false, None, None),
        };
        if leading != engine.leads() {
            tracing::info!(node = %node, leading, "upkeep leadership changed");
        }
        engine.set_leading(leading, until, fence);
        if let Err(e) = held {
            tracing::warn!(error = %e, "cannot renew upkeep leadership; time-driven work paused here");
        }
    }
}

/// Where other brokers share the store: pass their news to the engine as it comes,
/// and look for what was missed every [`SHARED_POLL`]; feed new trail
/// records to live followers.
pub(super) async fn hear(engine: Arc<Engine>, cancel: CancellationToken) {
    use tokio::sync::broadcast::error::RecvError;
    let Some(mut news) = engine.store().changes() else {
        return;
    };
    let mut poll = tokio::time::interval(SHARED_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let heard = tokio::select! {
            () = cancel.cancelled() => return,
            n = news.recv() => match n {
                Ok(n) => n,
                Err(RecvError::Lagged(_)) => "*".to_owned(),
                Err(RecvError::Closed) => return,
            },
            _ = poll.tick() => {
                if let Err(e) = engine.audit().poll_tail(engine.store().as_ref()).await {
                    tracing::debug!(error = %e, "could not read new trail records");
                }
                "*".to_owned()
            }
        };
        engine.heard(&heard).await;
    }
}

/// The leader's pass over the databases' logins, at start and every
/// [`RECONCILE_EVERY`](crate::engine::logins::RECONCILE_EVERY).
pub(super) async fn reconcile_logins(engine: Arc<Engine>, cancel: CancellationToken) {
    while engine.until_leading(&cancel).await {
        let n = engine.reconcile_logins().await;
        if n > 0 {
            tracing::info!(ended = n, "database logins reconciled");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(crate::engine::logins::RECONCILE_EVERY) => {}
        }
    }
}

/// Keep the trusted issuers' keys fresh: fetched at start (the broker
/// serves while an issuer is unreachable; its tokens are refused until a
/// fetch succeeds), every 10 minutes, and at once for the entries of a
/// reloaded policy. Fetches run beside this loop, so a reload is taken at
/// once even while an issuer is slow to answer.
pub(super) async fn follow_issuers(
    engine: Arc<Engine>,
    federation: Arc<crate::federation::Federation>,
    cancel: CancellationToken,
) {
    let mut reloads = engine.policy_reloads();
    let fetch = || {
        let f = federation.clone();
        tokio::spawn(async move { f.refresh().await })
    };
    let mut fetching = fetch();
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                fetching.abort();
                return;
            }
            () = tokio::time::sleep(crate::federation::keys::REFRESH) => {}
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                federation.update(&engine.policy());
            }
        }
        if fetching.is_finished() {
            fetching = fetch();
        }
    }
}

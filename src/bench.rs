//! `portcullis bench`: a load generator. N concurrent clients, each on its
//! own mTLS connection, call one RPC (or a mix) for a fixed duration; it
//! prints calls/s and latency percentiles. A benchmark, not a test.
//!
//! Modes (`--rpc`):
//! - `grant`: `RequestToken` for an auto-tier scope, one new lease per call;
//! - `introspect`: `Introspect` over a pool of live tokens granted first;
//! - `renew`: `RenewLease` of one lease per client, over and over;
//! - `exchange`: `ExchangeToken` of one parent token per client into
//!   narrower children, each a durable lease of its own;
//! - `mixed`: each client repeats grant, introspect ×3, renew (the shape of
//!   a workload that takes a token, uses it at a few services, extends it).
//!
//! `--leases N` first fills the store to N active leases (grants at full
//! concurrency, not measured), so the run shows how a large store behaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;

use crate::client::{ClientError, ClientOpts};
use crate::pb;
use crate::pb::broker_client::BrokerClient;

/// Which RPC the clients call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rpc {
    /// `RequestToken` (a new durable lease per call).
    Grant,
    /// `Introspect` of live tokens.
    Introspect,
    /// `RenewLease` (a durable update per call).
    Renew,
    /// Grant, introspect ×3, renew, repeated.
    Mixed,
    /// `ExchangeToken`: a narrower child of one parent token per client (a
    /// durable child lease per call; the policy must let the identity
    /// delegate the scopes to itself, as the dev policy does).
    Exchange,
    /// `RequestToken` then `RevokeLease` of that lease, timed as one call:
    /// what a short-lived credential costs from issue to end (a login
    /// scope's login is made and ended in it).
    Cycle,
}

impl Rpc {
    /// Where a call of this RPC is tallied (`mixed` is not a call).
    fn slot(self) -> usize {
        match self {
            Self::Grant | Self::Mixed => 0,
            Self::Introspect => 1,
            Self::Renew => 2,
            Self::Exchange => 3,
            Self::Cycle => 4,
        }
    }

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Introspect => "introspect",
            Self::Renew => "renew",
            Self::Mixed => "mixed",
            Self::Exchange => "exchange",
            Self::Cycle => "cycle",
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The RPC.
    pub rpc: Rpc,
    /// Scopes to ask for (auto tier for the identity).
    pub scopes: Vec<String>,
    /// Concurrent clients, one connection each.
    pub clients: usize,
    /// Measured time (after a 0.5 s warm-up).
    pub duration: Duration,
    /// TTL to ask for (policy default when `None`).
    pub ttl: Option<Duration>,
    /// Fill the store to this many active leases before measuring.
    pub leases: u64,
}

/// Result of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The RPC measured.
    pub rpc: Rpc,
    /// Concurrent clients.
    pub clients: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful calls.
    pub calls: u64,
    /// Successful calls per second.
    pub calls_per_sec: f64,
    /// Successful grants among them (every call in `grant` mode).
    pub grants: u64,
    /// Grants per second.
    pub grants_per_sec: f64,
    /// Failed calls.
    pub errors: u64,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// 99.9th percentile latency (ms).
    pub p999_ms: f64,
    /// Worst latency (ms).
    pub max_ms: f64,
    /// The same, for each RPC the run made (three in `mixed`).
    pub per_rpc: Vec<Latency>,
    /// Leases granted by the fill before the run.
    pub filled: u64,
    /// Seconds the fill took.
    pub fill_seconds: f64,
    /// What makes the figures less than they claim (a short fill, tokens
    /// that may expire during the run).
    pub warnings: Vec<String>,
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    /// Latencies (µs) of successful calls, by RPC ([`Rpc::slot`]).
    each: [Vec<u32>; 5],
    grants: u64,
    errors: u64,
    /// Of the errors, refusals as over a per-identity limit.
    limited: u64,
}

impl Tally {
    fn merge(&mut self, other: Self) {
        for (mine, theirs) in self.each.iter_mut().zip(other.each) {
            mine.extend(theirs);
        }
        self.grants += other.grants;
        self.limited += other.limited;
        self.errors += other.errors;
    }
}

/// One client's view of the broker.
struct Caller {
    c: BrokerClient<Channel>,
    scopes: Vec<String>,
    ttl: Option<prost_types::Duration>,
    /// Calls the broker refused as over a per-identity limit.
    limited: u64,
}

impl Caller {
    /// A new token and its lease id.
    async fn grant(&mut self) -> Option<(String, String)> {
        let req = pb::RequestTokenRequest {
            scopes: self.scopes.clone(),
            ttl: self.ttl,
            ..Default::default()
        };
        match self.c.request_token(req).await.ok()?.into_inner().outcome {
            Some(pb::request_token_response::Outcome::Granted(g)) => {
                let lease = g.lease?;
                Some((g.token, lease.id))
            }
            _ => None,
        }
    }

    async fn introspect(&mut self, token: &str) -> bool {
        let req = pb::IntrospectRequest {
            cnf_x5t_s256: String::new(),
            token: token.to_owned(),
        };
        matches!(self.c.introspect(req).await, Ok(r) if r.get_ref().active)
    }

    async fn exchange(&mut self, parent: &str) -> bool {
        let req = pb::ExchangeTokenRequest {
            subject_token: parent.to_owned(),
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        };
        match self.c.exchange_token(req).await {
            Ok(_) => true,
            Err(s) => {
                self.limited += u64::from(s.code() == tonic::Code::ResourceExhausted);
                false
            }
        }
    }

    async fn revoke(&mut self, lease_id: &str) -> bool {
        let req = pb::RevokeLeaseRequest {
            lease_id: lease_id.to_owned(),
            reason: String::new(),
        };
        self.c.revoke_lease(req).await.is_ok()
    }

    async fn renew(&mut self, lease_id: &str) -> bool {
        let req = pb::RenewLeaseRequest {
            lease_id: lease_id.to_owned(),
            ttl: self.ttl,
        };
        self.c.renew_lease(req).await.is_ok()
    }
}

/// Run until `end`, recording calls that start after `from`.
struct Window {
    from: Instant,
    end: Instant,
}

impl Window {
    /// Time one call and tally it (if inside the measured window).
    async fn timed<F: std::future::Future<Output = bool>>(
        &self,
        t: &mut Tally,
        rpc: Rpc,
        call: F,
    ) -> bool {
        let t0 = Instant::now();
        let ok = call.await;
        if t0 >= self.from {
            if ok {
                t.each[rpc.slot()]
                    .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                t.grants += u64::from(rpc == Rpc::Grant);
            } else {
                t.errors += 1;
            }
        }
        ok
    }

    fn open(&self) -> bool {
        Instant::now() < self.end
    }
}

/// One client's loop for `rpc`; `pool` holds live tokens for introspection.
async fn drive(mut c: Caller, rpc: Rpc, pool: Arc<Vec<String>>, w: Arc<Window>) -> Tally {
    let mut t = Tally::default();
    let mut next = 0usize;
    let mut lease: Option<String> = None;
    while w.open() {
        match rpc {
            Rpc::Grant => {
                w.timed(&mut t, Rpc::Grant, async { c.grant().await.is_some() })
                    .await;
            }
            Rpc::Introspect => {
                let Some(tok) = pool.get(next % pool.len().max(1)) else {
                    t.errors += 1;
                    break;
                };
                next = next.wrapping_add(1);
                w.timed(&mut t, Rpc::Introspect, c.introspect(tok)).await;
            }
            Rpc::Renew => {
                if lease.is_none() {
                    lease = c.grant().await.map(|(_, id)| id);
                }
                let Some(id) = lease.clone() else {
                    t.errors += 1;
                    continue;
                };
                if !w.timed(&mut t, Rpc::Renew, c.renew(&id)).await {
                    lease = None; // ran into its max TTL: start a new one
                }
            }
            Rpc::Mixed => mixed_round(&mut c, &mut t, &w).await,
            Rpc::Cycle => {
                w.timed(&mut t, Rpc::Cycle, async {
                    match c.grant().await {
                        Some((_, id)) => c.revoke(&id).await,
                        None => false,
                    }
                })
                .await;
            }
            Rpc::Exchange => {
                if lease.is_none() {
                    lease = c.grant().await.map(|(token, _)| token);
                }
                let Some(parent) = lease.clone() else {
                    t.errors += 1;
                    continue;
                };
                if !w.timed(&mut t, Rpc::Exchange, c.exchange(&parent)).await {
                    lease = None; // the parent ran out: start from a new one
                }
            }
        }
    }
    t.limited = c.limited;
    t
}

/// Grant, introspect the new token three times, renew its lease.
async fn mixed_round(c: &mut Caller, t: &mut Tally, w: &Window) {
    let mut granted = None;
    w.timed(t, Rpc::Grant, async {
        granted = c.grant().await;
        granted.is_some()
    })
    .await;
    let Some((tok, id)) = granted else { return };
    for _ in 0..3 {
        w.timed(t, Rpc::Introspect, c.introspect(&tok)).await;
    }
    w.timed(t, Rpc::Renew, c.renew(&id)).await;
}

/// Open `n` connections.
async fn callers(opts: &ClientOpts, plan: &Plan, n: usize) -> Result<Vec<Caller>, ClientError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Caller {
            limited: 0,
            c: BrokerClient::new(opts.connect().await?),
            scopes: plan.scopes.clone(),
            ttl: plan
                .ttl
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        });
    }
    Ok(out)
}

/// Grant `n` leases over `callers` at full concurrency; up to `keep` tokens
/// per caller are returned (for the introspection pool), sampled evenly
/// over its grants (reservoir sampling), so the pool spans the whole fill
/// rather than its first, by now cold, leases.
async fn fill(callers: Vec<Caller>, n: u64, keep: usize) -> (Vec<Caller>, Vec<String>, u64) {
    let left = Arc::new(AtomicU64::new(n));
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut c| {
            let left = left.clone();
            tokio::spawn(async move {
                let mut toks = Vec::new();
                let mut made = 0u64;
                let mut failures = 0u32;
                let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15 ^ (n << 7) ^ keep as u64);
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                    .is_ok()
                {
                    match c.grant().await {
                        Some((tok, _)) => {
                            made += 1;
                            if toks.len() < keep {
                                toks.push(tok);
                            } else if let Some(slot) = toks.get_mut(rng.below(made)) {
                                *slot = tok;
                            }
                        }
                        None => {
                            left.fetch_add(1, Ordering::SeqCst);
                            failures += 1;
                            if failures > 100 {
                                break;
                            }
                        }
                    }
                }
                (c, toks, made)
            })
        })
        .collect();
    let (mut cs, mut pool, mut made) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        if let Ok((c, toks, m)) = t.await {
            cs.push(c);
            pool.extend(toks);
            made += m;
        }
    }
    pool.truncate(keep);
    (cs, pool, made)
}

/// A small deterministic generator for sampling (no security role).
struct Xorshift(u64);

impl Xorshift {
    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n.max(1)).unwrap_or(usize::MAX)
    }
}

/// Run `plan` against the broker `opts` points at.
pub async fn run(opts: &ClientOpts, plan: &Plan) -> Result<Report, ClientError> {
    // One connection per simulated client, on purpose: that is the load.
    let cs = callers(opts, plan, plan.clients).await?;
    let started = Instant::now();
    let pool_size: usize = if plan.rpc == Rpc::Introspect { 1024 } else { 0 };
    let want = plan.leases.max(pool_size as u64);
    let (cs, pool, filled) = fill(cs, want, pool_size.div_ceil(plan.clients.max(1))).await;
    let fill_seconds = started.elapsed().as_secs_f64();
    let pool = Arc::new(pool);
    let from = Instant::now() + Duration::from_millis(500);
    let w = Arc::new(Window {
        from,
        end: from + plan.duration,
    });
    let tasks: Vec<_> = cs
        .into_iter()
        .map(|c| tokio::spawn(drive(c, plan.rpc, pool.clone(), w.clone())))
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        if let Ok(tally) = t.await {
            all.merge(tally);
        }
    }
    for lat in &mut all.each {
        lat.sort_unstable();
    }
    let mut warnings = Vec::new();
    if filled < want {
        warnings.push(format!(
            "filled only {filled} of {want} leases: grants failed during the fill"
        ));
    }
    if all.limited > 0 {
        warnings.push(format!(
            "{} exchanges were refused as over the broker's per-identity limits (serve --max-exchanges-per-second, --max-children-per-lease): the figure measures the limit, not the broker",
            all.limited
        ));
    }
    if plan.rpc == Rpc::Introspect {
        // Default TTL of the dev policy's auto scopes.
        let ttl = plan.ttl.unwrap_or(Duration::from_secs(300));
        if ttl.as_secs_f64() < fill_seconds + 0.5 + plan.duration.as_secs_f64() {
            warnings.push(format!(
                "--ttl {}s is shorter than the fill plus the run: pooled tokens may expire and count as errors",
                ttl.as_secs()
            ));
        }
    }
    Ok(Report {
        filled,
        fill_seconds,
        warnings,
        ..report(plan, &all)
    })
}

/// Calls and latencies of one RPC in a run.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// The RPC.
    pub rpc: Rpc,
    /// Successful calls.
    pub calls: u64,
    /// Successful calls per second.
    pub calls_per_sec: f64,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// 99.9th percentile latency (ms).
    pub p999_ms: f64,
    /// Worst latency (ms).
    pub max_ms: f64,
}

/// Percentiles over sorted latencies (µs).
fn latency(rpc: Rpc, sorted: &[u32], seconds: f64) -> Latency {
    let pct = |p: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
    };
    Latency {
        rpc,
        calls: sorted.len() as u64,
        calls_per_sec: sorted.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_ms: sorted.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
    }
}

/// The run's report from per-RPC sorted latencies.
fn report(plan: &Plan, t: &Tally) -> Report {
    let seconds = plan.duration.as_secs_f64();
    let mut all: Vec<u32> = t.each.iter().flatten().copied().collect();
    all.sort_unstable();
    let total = latency(plan.rpc, &all, seconds);
    let per_rpc = [
        Rpc::Grant,
        Rpc::Introspect,
        Rpc::Renew,
        Rpc::Exchange,
        Rpc::Cycle,
    ]
    .into_iter()
    .filter(|r| !t.each[r.slot()].is_empty())
    .map(|r| latency(r, &t.each[r.slot()], seconds))
    .collect();
    Report {
        rpc: plan.rpc,
        clients: plan.clients,
        seconds,
        calls: total.calls,
        calls_per_sec: total.calls_per_sec,
        grants: t.grants,
        grants_per_sec: t.grants as f64 / seconds,
        errors: t.errors,
        p50_ms: total.p50_ms,
        p99_ms: total.p99_ms,
        p999_ms: total.p999_ms,
        max_ms: total.max_ms,
        per_rpc,
        filled: 0,
        fill_seconds: 0.0,
        warnings: Vec::new(),
    }
}

/// Latency of the disk under `dir`: `n` times, write 4 KiB at the start of a
/// scratch file and `fdatasync` it. Returns (p50, p99) in ms. This is the
/// floor a durable grant pays once, whatever the broker does.
pub fn disk_sync_latency(dir: &std::path::Path, n: usize) -> std::io::Result<(f64, f64)> {
    use std::io::{Seek as _, Write as _};
    let path = dir.join(format!(".portcullis-disk-probe-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(&block)?;
        f.sync_data()?;
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    lat.sort_by(f64::total_cmp);
    let at = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .copied()
    };
    Ok((at(0.5).unwrap_or(0.0), at(0.99).unwrap_or(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_latencies() {
        let plan = Plan {
            rpc: Rpc::Grant,
            scopes: vec![],
            clients: 1,
            duration: Duration::from_secs(2),
            ttl: None,
            leases: 0,
        };
        let t = Tally {
            each: [(1..=1000).collect(), vec![], vec![], vec![], vec![]],
            grants: 1000,
            errors: 3,
            limited: 0,
        };
        let r = report(&plan, &t);
        assert_eq!(r.per_rpc.len(), 1);
        assert_eq!(r.per_rpc[0].calls, 1000);
        assert_eq!(r.calls, 1000);
        assert!((r.calls_per_sec - 500.0).abs() < f64::EPSILON);
        assert!((r.p50_ms - 0.501).abs() < 1e-9, "{}", r.p50_ms);
        assert!((r.p99_ms - 0.990).abs() < 1e-9, "{}", r.p99_ms);
        assert!((r.p999_ms - 0.999).abs() < 1e-9, "{}", r.p999_ms);
        assert!((r.max_ms - 1.0).abs() < 1e-9);
        assert_eq!(r.errors, 3);
        // Mixed: each RPC's own figures, and the overall ones over all.
        let mixed = Tally {
            each: [
                vec![10_000],
                vec![1_000, 2_000, 3_000],
                vec![20_000],
                vec![],
                vec![],
            ],
            grants: 1,
            errors: 0,
            limited: 0,
        };
        let r = report(
            &Plan {
                rpc: Rpc::Mixed,
                ..plan
            },
            &mixed,
        );
        let names: Vec<_> = r.per_rpc.iter().map(|l| (l.rpc.name(), l.calls)).collect();
        assert_eq!(names, [("grant", 1), ("introspect", 3), ("renew", 1)]);
        assert_eq!(r.calls, 5);
        assert!((r.per_rpc[1].p50_ms - 2.0).abs() < 1e-9);
        assert!((r.max_ms - 20.0).abs() < 1e-9);
    }

    #[test]
    fn the_disk_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (p50, p99) = disk_sync_latency(dir.path(), 5).unwrap();
        assert!(p50 > 0.0 && p99 >= p50);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

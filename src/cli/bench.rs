//! `bench`: the load generator's flags and report (see [`crate::bench`]).

use std::path::PathBuf;
use std::time::Duration;

use super::Output;
use super::exit::{self, Failure, usage};
use super::render::print;
use crate::bench::{Plan, Rpc};
use crate::client::ClientOpts;

/// `bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scope(s) to request (must be auto for the identity).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// Which RPC to load: `grant` (RequestToken), `introspect`, `renew`
    /// (RenewLease), `mixed` (grant, introspect x3, renew), `exchange`, or
    /// `cycle` (grant then revoke, one call).
    #[arg(long, value_enum, default_value_t = Rpc::Grant)]
    pub rpc: Rpc,
    /// Concurrent clients, one mTLS connection each.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long to measure (after a 0.5 s warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// TTL to ask for on each grant and renewal (policy default if absent).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// First fill the store to this many active leases (granted at full
    /// concurrency, not measured).
    #[arg(long, default_value_t = 0)]
    pub leases: u64,
    /// Also measure this directory's disk: 4 KiB write + fdatasync, 1000
    /// times (the floor one durable grant pays).
    #[arg(long, value_name = "DIR")]
    pub disk_probe: Option<PathBuf>,
}

/// Run the benchmark and print its report. Each simulated client has its
/// own connection: that is what is measured.
pub async fn run(out: Output, args: BenchArgs, opts: &ClientOpts) -> Result<i32, Failure> {
    if args.clients == 0 {
        return Err(usage("--clients must be at least 1"));
    }
    let disk = match &args.disk_probe {
        Some(dir) => Some(
            crate::bench::disk_sync_latency(dir, 1000)
                .map_err(|e| usage(format!("--disk-probe {}: {e}", dir.display())))?,
        ),
        None => None,
    };
    let plan = Plan {
        rpc: args.rpc,
        scopes: args.scopes,
        clients: args.clients,
        duration: args.duration,
        ttl: args.ttl,
        leases: args.leases,
    };
    let r = crate::bench::run(opts, &plan).await?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let text = render(&r, disk);
    let mut json = serde_json::to_value(&r).unwrap_or_default();
    if let (Some((p50, p99)), Some(obj)) = (disk, json.as_object_mut()) {
        obj.insert("disk_sync_p50_ms".into(), p50.into());
        obj.insert("disk_sync_p99_ms".into(), p99.into());
    }
    print(out, &text, json);
    Ok(
        if (r.errors > 0 && r.calls == 0) || r.filled < args.leases {
            exit::FAILURE
        } else {
            exit::OK
        },
    )
}

/// The report for people.
fn render(r: &crate::bench::Report, disk: Option<(f64, f64)>) -> String {
    let mut text = String::new();
    if r.filled > 0 {
        text += &format!(
            "filled {} leases in {:.1}s ({:.0}/s)\n",
            r.filled,
            r.fill_seconds,
            r.filled as f64 / r.fill_seconds.max(1e-9)
        );
    }
    if let Some((p50, p99)) = disk {
        text += &format!("disk 4 KiB write+fdatasync  p50 {p50:.3} ms  p99 {p99:.3} ms\n");
    }
    text += &format!(
        "rpc {}  clients {}  duration {:.1}s  calls {}  errors {}\ncalls/s {:.0}  grants/s {:.0}  {}\n",
        r.rpc.name(),
        r.clients,
        r.seconds,
        r.calls,
        r.errors,
        r.calls_per_sec,
        r.grants_per_sec,
        percentiles(r.p50_ms, r.p99_ms, r.p999_ms, r.max_ms)
    );
    if r.per_rpc.len() > 1 {
        for l in &r.per_rpc {
            text += &format!(
                "  {:<10}  calls/s {:.0}  {}\n",
                l.rpc.name(),
                l.calls_per_sec,
                percentiles(l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms)
            );
        }
    }
    text
}

/// `p50 … ms  p99 … ms  p999 … ms  max … ms`.
fn percentiles(p50: f64, p99: f64, p999: f64, max: f64) -> String {
    format!("p50 {p50:.2} ms  p99 {p99:.2} ms  p999 {p999:.2} ms  max {max:.2} ms")
}

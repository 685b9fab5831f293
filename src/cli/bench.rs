//! `bench`: the load generator's flags and report (see [`crate::bench`]).

use std::time::Duration;

use super::Output;
use super::exit::{self, Failure, usage};
use super::render::print;
use crate::client::ClientOpts;

/// `bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scope(s) to request (must be auto for the identity).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// Concurrent clients, one mTLS connection each.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long to measure (after a 0.5 s warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// Run the benchmark and print its report. Each simulated client has its
/// own connection: that is what is measured.
pub async fn run(out: Output, args: BenchArgs, opts: &ClientOpts) -> Result<i32, Failure> {
    if args.clients == 0 {
        return Err(usage("--clients must be at least 1"));
    }
    let r = crate::bench::run(opts, args.scopes, args.clients, args.duration).await?;
    let text = format!(
        "clients {}  duration {:.1}s  grants {}  errors {}\ngrants/s {:.0}  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n",
        r.clients, r.seconds, r.grants, r.errors, r.grants_per_sec, r.p50_ms, r.p99_ms, r.max_ms
    );
    print(out, &text, serde_json::to_value(&r).unwrap_or_default());
    Ok(if r.errors > 0 && r.grants == 0 {
        exit::FAILURE
    } else {
        exit::OK
    })
}

//! `portcullis bench`: a load generator. N concurrent clients, each on its
//! own mTLS connection, request auto-tier tokens for a fixed duration; it
//! prints grants/s and latency percentiles. A benchmark, not a test.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::ClientOpts;
use crate::pb;
use crate::pb::broker_client::BrokerClient;
use tonic::transport::Channel;

/// Result of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Concurrent clients.
    pub clients: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful grants.
    pub grants: u64,
    /// Failed calls.
    pub errors: u64,
    /// Grants per second.
    pub grants_per_sec: f64,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// Worst latency (ms).
    pub max_ms: f64,
}

/// One client's loop: request tokens until `end`; record latencies (µs) of
/// grants from `measure_from` on, and count failures.
async fn drive(
    mut c: BrokerClient<Channel>,
    scopes: Vec<String>,
    measure_from: Instant,
    end: Instant,
) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(16 * 1024);
    let mut errors = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let req = pb::RequestTokenRequest {
            scopes: scopes.clone(),
            ..Default::default()
        };
        let ok = matches!(
            c.request_token(req).await.map(|r| r.into_inner().outcome),
            Ok(Some(pb::request_token_response::Outcome::Granted(_)))
        );
        if t0 < measure_from {
            continue;
        }
        if ok {
            lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
        } else {
            errors += 1;
        }
    }
    (lat, errors)
}

/// Drive `clients` connections requesting `scopes` for `duration` after a
/// short warm-up (not counted).
pub async fn run(
    opts: &ClientOpts,
    scopes: Vec<String>,
    clients: usize,
    duration: Duration,
) -> Result<Report, crate::client::ClientError> {
    // One connection per simulated client, on purpose: that is the load.
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(BrokerClient::new(opts.connect().await?));
    }
    let measure_from = Instant::now() + Duration::from_millis(500);
    let end = measure_from + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(drive(c, scopes.clone(), measure_from, end)))
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    all.sort_unstable();
    Ok(report(clients, duration, &all, errors))
}

/// Percentiles over sorted latencies (µs).
fn report(clients: usize, duration: Duration, all: &[u32], errors: u64) -> Report {
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        f64::from(all[i.min(all.len() - 1)]) / 1000.0
    };
    let seconds = duration.as_secs_f64();
    Report {
        clients,
        seconds,
        grants: all.len() as u64,
        errors,
        grants_per_sec: all.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: all.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
    }
}

//! `agent`: keep a fresh token in a file (see [`crate::agent`]).

use std::path::PathBuf;
use std::time::Duration;

use super::exit::{self, Failure};
use crate::client::ClientOpts;

/// `agent` flags.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Scope (repeat). With --from-token: default all of the parent's.
    #[arg(long = "scope", required_unless_present = "from_token")]
    pub scopes: Vec<String>,
    /// Token file (written atomically, mode 0600).
    #[arg(long, required_unless_present = "env_file")]
    pub out: Option<PathBuf>,
    /// Env file (written atomically, mode 0600): `PORTCULLIS_LEASE_ID`,
    /// `PORTCULLIS_TOKEN` and, for a login scope, the database login as
    /// `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`,
    /// `PGSSLMODE` — `KEY='value'` lines for `set -a; . FILE` or systemd's
    /// `EnvironmentFile=`.
    #[arg(long)]
    pub env_file: Option<PathBuf>,
    /// Audience.
    #[arg(long)]
    pub audience: Option<String>,
    /// Wanted TTL per lease.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Why the workload needs the token, recorded in the trail and shown to
    /// approvers (required for scopes that wait for approval).
    #[arg(long)]
    pub reason: Option<String>,
    /// Keep a delegated token: exchange the token in this file (re-read
    /// for each new lease) for a narrower child.
    #[arg(long)]
    pub from_token: Option<PathBuf>,
    /// With --from-token: who the child is for (default: this agent).
    #[arg(long = "for", requires = "from_token")]
    pub for_identity: Option<String>,
    /// Sign in with the platform token in this file instead of a
    /// certificate (a Kubernetes projected service-account token, a CI
    /// job's OIDC token), re-read for each new lease; each lease is asked
    /// for anew rather than renewed (`--federation-server`).
    #[arg(long, conflicts_with = "from_token")]
    pub id_token_file: Option<PathBuf>,
}

/// Run the agent until Ctrl-C. It connects afresh for each refresh, so it
/// follows a broker that restarted on another address.
pub async fn run(args: AgentArgs, opts: ClientOpts) -> Result<i32, Failure> {
    let cfg = crate::agent::AgentConfig {
        scopes: args.scopes,
        audience: args.audience.unwrap_or_default(),
        ttl: args.ttl,
        out: args.out,
        env_file: args.env_file,
        reason: args.reason.unwrap_or_default(),
        from_token: args.from_token,
        for_identity: args.for_identity.unwrap_or_default(),
        id_token: args.id_token_file,
    };
    crate::agent::run(opts, cfg, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .map_err(exit::failure)?;
    Ok(exit::OK)
}

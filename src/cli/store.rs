//! `store copy`: move a broker's state between backends (offline: every
//! broker on the source stopped).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::Output;
use super::exit::{Failure, failure};
use super::render::print;

/// `store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy every key, lease, request, idempotency entry, audit record and
    /// checkpoint into a new, empty store, then check that it reads back.
    /// Stop every broker on the source first.
    Copy {
        /// Source: a sled data directory (`sled:DIR` or `DIR`; with `--dev`
        /// it is `portcullis-dev/data`) or a `postgres://` URL.
        #[arg(long)]
        from: String,
        /// Target, as `--from`; must be empty.
        #[arg(long)]
        to: String,
        /// PEM CAs a database's certificate must chain to (default: the
        /// system's roots).
        #[arg(long, env = "PORTCULLIS_DATABASE_CA")]
        database_ca: Option<PathBuf>,
    },
}

/// Run a `store` subcommand.
pub async fn run(out: Output, cmd: StoreCmd) -> Result<i32, Failure> {
    let StoreCmd::Copy {
        from,
        to,
        database_ca,
    } = cmd;
    let copied = crate::server::copy_store(&from, &to, database_ca.as_deref())
        .await
        .map_err(|e| failure(format!("store copy: {e}")))?;
    let text = format!(
        "copied {} keys, {} metadata values, {} leases, {} requests, {} idempotency entries, {} audit records and {} checkpoints; the target reads back the same\n",
        copied.keys,
        copied.meta,
        copied.leases,
        copied.requests,
        copied.idempotency,
        copied.audit,
        copied.checkpoints
    );
    let value = json!({
        "keys": copied.keys,
        "meta": copied.meta,
        "leases": copied.leases,
        "requests": copied.requests,
        "idempotency": copied.idempotency,
        "audit": copied.audit,
        "checkpoints": copied.checkpoints,
    });
    print(out, &text, value);
    Ok(0)
}

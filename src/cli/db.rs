//! `db`: the databases login scopes make logins on.

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure};
use super::render::{fmt_ts, print};
use crate::pb;
use crate::pb::keys_client::KeysClient;

/// `db` subcommands.
#[derive(Debug, Subcommand)]
pub enum DbCmd {
    /// Rotate a `[[database]]`'s admin password now (admin): a new random
    /// password is set on the database and kept by the broker, sealed
    /// under its KEK. Run it on a schedule (deploy/ has a timer and a
    /// CronJob); after the first, the policy's `password_file` is only a
    /// fallback.
    RotateRoot {
        /// The `[[database]]` name in the policy.
        name: String,
        /// Why, recorded in the trail.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Run a `db` subcommand over `channel`.
pub async fn run(out: Output, cmd: DbCmd, channel: Channel) -> Result<i32, Failure> {
    let DbCmd::RotateRoot { name, reason } = cmd;
    let r = KeysClient::new(channel)
        .rotate_database_root(pb::RotateDatabaseRootRequest {
            database: name,
            reason: reason.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let at = fmt_ts(&r.rotated_at);
    print(
        out,
        &format!(
            "the admin password of database `{}` was rotated at {at}\n",
            super::render::clean(&r.database)
        ),
        json!({ "database": r.database, "rotated_at": at }),
    );
    Ok(exit::OK)
}

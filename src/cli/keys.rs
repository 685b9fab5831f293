//! `keys`: the JWK Set, the key list, rotation.

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure};
use super::render::{fmt_ts, print, table, ts_json};
use crate::pb;
use crate::pb::keys_client::KeysClient;

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Print the JWK Set.
    Jwks,
    /// List keys and their states.
    List,
    /// Rotate the signing key now (admin). `--emergency` withdraws keys at
    /// once (every key with a private part, or `--kid`) and revokes every
    /// lease they signed.
    Rotate {
        /// Compromised key: withdraw it now.
        #[arg(long)]
        emergency: bool,
        /// With --emergency: the one key to withdraw (default: every key
        /// whose private part exists: active, next and retired).
        #[arg(long, requires = "emergency")]
        kid: Option<String>,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Run a `keys` subcommand over `channel`.
pub async fn run(out: Output, cmd: KeysCmd, channel: Channel) -> Result<i32, Failure> {
    let mut k = KeysClient::new(channel);
    let keys = match cmd {
        KeysCmd::Jwks => {
            let r = k.get_jwks(pb::GetJwksRequest {}).await?.into_inner();
            println!("{}", r.jwks_json);
            return Ok(exit::OK);
        }
        KeysCmd::Rotate {
            emergency,
            kid,
            reason,
        } => {
            k.rotate(pb::RotateRequest {
                emergency,
                kid: kid.unwrap_or_default(),
                reason: reason.unwrap_or_default(),
            })
            .await?
            .into_inner()
            .keys
        }
        KeysCmd::List => k.list_keys(pb::ListKeysRequest {}).await?.into_inner().keys,
    };
    let rows: Vec<Vec<String>> = keys.iter().map(key_row).collect();
    print(
        out,
        &table(&rows),
        json!(keys.iter().map(key_json).collect::<Vec<_>>()),
    );
    Ok(exit::OK)
}

fn key_state_name(v: i32) -> &'static str {
    match pb::KeyState::try_from(v) {
        Ok(pb::KeyState::Next) => "next",
        Ok(pb::KeyState::Active) => "active",
        Ok(pb::KeyState::Retired) => "retired",
        _ => "unknown",
    }
}

fn key_row(k: &pb::KeyInfo) -> Vec<String> {
    vec![
        k.kid.clone(),
        k.alg.clone(),
        key_state_name(k.state).to_owned(),
        format!("created {}", fmt_ts(&k.created_at)),
        format!("activated {}", fmt_ts(&k.activated_at)),
        format!("retire at {}", fmt_ts(&k.retire_at)),
    ]
}

fn key_json(k: &pb::KeyInfo) -> serde_json::Value {
    json!({"kid": k.kid, "alg": k.alg, "state": key_state_name(k.state), "created_at": ts_json(&k.created_at), "activated_at": ts_json(&k.activated_at), "retire_at": ts_json(&k.retire_at)})
}

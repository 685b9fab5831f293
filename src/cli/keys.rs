//! `keys`: the JWK Set, the key list, rotation.

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure};
use super::render::{clean, confirm, count, fmt_ts, print, table, ts_json};
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
        /// Compromised key: withdraw it now (asks to confirm on a terminal;
        /// needs --reason).
        #[arg(long)]
        emergency: bool,
        /// With --emergency: the one key to withdraw (default: every key
        /// whose private part exists: active, next and retired).
        #[arg(long, requires = "emergency")]
        kid: Option<String>,
        /// Why the keys are rotated, recorded in the trail (required with
        /// --emergency).
        #[arg(long, required_if_eq("emergency", "true"))]
        reason: Option<String>,
        /// Do not ask to confirm an emergency rotation.
        #[arg(long)]
        yes: bool,
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
            yes,
        } => {
            if emergency {
                let which = kid.as_deref().map_or_else(
                    || "every signing key with a private part (active, next, retired)".to_owned(),
                    |k| format!("key `{}`", clean(k)),
                );
                confirm(
                    &format!(
                        "This withdraws {which} now and revokes every lease it signed, and every lease delegated from those."
                    ),
                    yes,
                )?;
            }
            let r = k
                .rotate(pb::RotateRequest {
                    emergency,
                    kid: kid.unwrap_or_default(),
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            return Ok(rotated(out, emergency, &r));
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

/// What a rotation did, then the keys as they are now.
fn rotated(out: Output, emergency: bool, r: &pb::RotateResponse) -> i32 {
    let rows: Vec<Vec<String>> = r.keys.iter().map(key_row).collect();
    let mut text = String::new();
    if emergency {
        text.push_str(&format!(
            "withdrew {}: {} (no longer published, private parts destroyed)\n",
            count(r.withdrawn.len() as u64, "key"),
            clean(&r.withdrawn.join(", "))
        ));
        text.push_str(&format!(
            "revoked {} they signed, and {} delegated from those\n",
            count(r.leases_revoked, "active lease"),
            count(r.descendants_revoked, "lease")
        ));
    } else {
        text.push_str("hand-over brought forward: the next key signs once it has been published for 10 minutes (so relying parties have it)\n");
    }
    if let Some(active) = r
        .keys
        .iter()
        .find(|k| k.state == pb::KeyState::Active as i32)
    {
        text.push_str(&format!("signing with {}\n\n", clean(&active.kid)));
    }
    text.push_str(&table(&rows));
    print(
        out,
        &text,
        json!({
            "keys": r.keys.iter().map(key_json).collect::<Vec<_>>(),
            "withdrawn": r.withdrawn,
            "leases_revoked": r.leases_revoked,
            "descendants_revoked": r.descendants_revoked,
        }),
    );
    exit::OK
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

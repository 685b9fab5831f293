//! `ui`: reach the approver console.

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure};
use super::render::{clean, fmt_ts, print, ts_json};
use crate::pb;
use crate::pb::approvals_client::ApprovalsClient;

/// `ui` subcommands.
#[derive(Debug, Subcommand)]
pub enum UiCmd {
    /// Print a one-time link that signs you into the approver console as
    /// your own (mTLS) identity: it works once, within 60 seconds.
    Login {
        /// Open this request after signing in.
        #[arg(long)]
        request: Option<String>,
    },
    /// End every console session a person has open, on every broker
    /// (admin; a person who left, a lost laptop). Removing them from the
    /// policy does the same by itself.
    EndSessions {
        /// Whose sessions: a SPIFFE ID, or `oidc:<name>`.
        identity: String,
        /// Why they are ended, recorded in the trail (required)
        #[arg(long)]
        reason: String,
    },
}

/// Run a `ui` subcommand over `channel`.
pub async fn run(out: Output, cmd: UiCmd, channel: Channel) -> Result<i32, Failure> {
    let request = match cmd {
        UiCmd::Login { request } => request,
        UiCmd::EndSessions { identity, reason } => {
            ApprovalsClient::new(channel)
                .end_console_sessions(pb::EndConsoleSessionsRequest {
                    identity: identity.clone(),
                    reason,
                })
                .await?;
            print(
                out,
                &format!("ended every console session of {}\n", clean(&identity)),
                json!({ "ended": identity }),
            );
            return Ok(exit::OK);
        }
    };
    let r = ApprovalsClient::new(channel)
        .create_console_link(pb::CreateConsoleLinkRequest {
            request_id: request.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if out == Output::Text {
        // The link alone on stdout (`xdg-open "$(portcullis ui login)"`).
        eprintln!(
            "works once, until {} — open it in your browser:",
            fmt_ts(&r.expires_at)
        );
    }
    print(
        out,
        &format!("{}\n", r.url),
        json!({ "url": r.url, "expires_at": ts_json(&r.expires_at) }),
    );
    Ok(exit::OK)
}

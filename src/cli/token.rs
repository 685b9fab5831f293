//! `token request` and `token inspect`.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure, failure, usage};
use super::render::{print, print_grant};
use super::requests::{request_json, request_text, watch};
use crate::client::convert;
use crate::pb;
use crate::pb::broker_client::BrokerClient;

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Ask for a token. Prints the token on stdout (details on stderr).
    Request {
        /// Scope to ask for (repeat for several).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Wanted lifetime, e.g. `10m` (clamped to the policy's max_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Audience (`aud`).
        #[arg(long)]
        audience: Option<String>,
        /// Why you need it (recorded; shown to approvers).
        #[arg(long)]
        reason: Option<String>,
        /// Idempotency key: a retry with the same key returns the same grant.
        #[arg(long)]
        client_request_id: Option<String>,
        /// Take an approval-tier scope at once where policy allows break-glass
        /// (capped TTL, reviewed afterwards). Needs --reason.
        #[arg(long)]
        break_glass: bool,
        /// If parked for approval, wait for the decision.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Introspect a token (`-` reads it from stdin).
    Inspect {
        /// The token.
        token: String,
    },
}

/// Run a `token` subcommand over `channel`.
pub async fn run(out: Output, cmd: TokenCmd, channel: Channel) -> Result<i32, Failure> {
    let mut b = BrokerClient::new(channel);
    match cmd {
        TokenCmd::Request {
            scopes,
            ttl,
            audience,
            reason,
            client_request_id,
            break_glass,
            wait,
            timeout,
        } => {
            let req = pb::RequestTokenRequest {
                scopes,
                ttl: ttl.map(convert::duration),
                audience: audience.unwrap_or_default(),
                justification: reason.unwrap_or_default(),
                client_request_id: client_request_id.unwrap_or_default(),
                break_glass,
            };
            let resp = b.request_token(req).await?.into_inner();
            let wait = wait.then_some(timeout);
            outcome(out, &mut b, resp.outcome, wait).await
        }
        TokenCmd::Inspect { token } => inspect(out, &mut b, parse_token_arg(token)?).await,
    }
}

/// Print a grant, or a parked request (and wait for it when `wait` says how
/// long).
async fn outcome(
    out: Output,
    b: &mut BrokerClient<Channel>,
    outcome: Option<pb::request_token_response::Outcome>,
    wait: Option<Duration>,
) -> Result<i32, Failure> {
    match outcome {
        Some(pb::request_token_response::Outcome::Granted(g)) => {
            print_grant(out, &g);
            Ok(exit::OK)
        }
        Some(pb::request_token_response::Outcome::Pending(r)) => match wait {
            Some(timeout) => watch(out, b, &r.id, timeout).await,
            None => {
                match out {
                    Output::Text => eprintln!(
                        "{}parked for approval; follow it with: portcullis requests watch {}",
                        request_text(&r),
                        r.id
                    ),
                    Output::Json => println!("{}", json!({"pending": request_json(&r)})),
                }
                Ok(exit::PENDING)
            }
        },
        None => Err(failure("empty response from broker")),
    }
}

async fn inspect(
    out: Output,
    b: &mut BrokerClient<Channel>,
    token: String,
) -> Result<i32, Failure> {
    let r = b
        .introspect(pb::IntrospectRequest {
            token,
            cnf_x5t_s256: String::new(),
        })
        .await?
        .into_inner();
    let text = if r.active {
        format!(
            "active     true\nsub        {}\nscope      {}\naud        {}\nclient_id  {}\njti        {}\niss        {}\niat        {}\nexp        {}\n",
            r.sub,
            r.scope,
            r.aud.join(" "),
            r.client_id,
            r.jti,
            r.iss,
            r.iat,
            r.exp
        )
    } else {
        "active     false\n".into()
    };
    print(
        out,
        &text,
        json!({"active": r.active, "sub": r.sub, "scope": r.scope, "aud": r.aud, "client_id": r.client_id, "jti": r.jti, "iss": r.iss, "iat": r.iat, "nbf": r.nbf, "exp": r.exp, "token_type": r.token_type}),
    );
    Ok(if r.active { exit::OK } else { exit::FAILURE })
}

fn parse_token_arg(t: String) -> Result<String, Failure> {
    if t == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| usage(format!("reading stdin: {e}")))?;
        Ok(s.trim().to_owned())
    } else {
        Ok(t)
    }
}

//! `token request`, `token exchange` and `token inspect`.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure, failure, usage};
use super::render::{clean, fmt_ts, print, print_grant};
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
        /// Take an approval-tier scope at once where policy allows break-glass
        /// (capped TTL, reviewed afterwards). Needs --reason.
        #[arg(long)]
        break_glass: bool,
        /// Sign in with your platform's token instead of a certificate (a
        /// GitHub Actions OIDC token, a Kubernetes service-account token, a
        /// JWT-SVID; `@FILE` reads it from a file, `-` from stdin). Goes to
        /// the broker's federation listener (`--federation-server`).
        #[arg(
            long,
            env = "PORTCULLIS_ID_TOKEN",
            hide_env_values = true,
            conflicts_with = "break_glass"
        )]
        id_token: Option<String>,
        #[command(flatten)]
        asking: Asking,
    },
    /// Exchange a token you hold for a narrower child (RFC 8693
    /// delegation). Prints the child token on stdout.
    Exchange(ExchangeArgs),
    /// Introspect a token (`-` reads it from stdin).
    Inspect {
        /// The token.
        token: String,
        /// RFC 8705 check, as a relying party makes it: the PEM client
        /// certificate the token was presented with. A token bound to
        /// another certificate is then inactive. (Not `--cert`: that one
        /// names this client's own certificate.)
        #[arg(long = "presented-cert", value_name = "PEM")]
        presented_cert: Option<std::path::PathBuf>,
    },
}

impl TokenCmd {
    /// A `token request` with a platform token (no certificate).
    pub fn signs_in_with_id_token(&self) -> bool {
        matches!(
            self,
            Self::Request {
                id_token: Some(_),
                ..
            }
        )
    }
}

/// `token exchange` flags.
#[derive(Debug, clap::Args)]
pub struct ExchangeArgs {
    /// The parent token (`-` reads it from stdin, `@FILE` from a file).
    #[arg(long)]
    token: String,
    /// Scope of the child (repeat; default: all of the parent's).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Who the child is for (default: you).
    #[arg(long = "for")]
    for_identity: Option<String>,
    /// Lifetime of the child (never past the parent's).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Audience of the child (default: the parent's).
    #[arg(long)]
    audience: Option<String>,
    #[command(flatten)]
    asking: Asking,
}

/// What asking for a token and exchanging one share: why, a retry key,
/// and whether to wait for approvers.
#[derive(Debug, clap::Args)]
pub struct Asking {
    /// Why you need it (recorded; shown to approvers).
    #[arg(long)]
    reason: Option<String>,
    /// Idempotency key: a retry with the same key returns the same outcome
    /// (not with `--id-token`: a platform token is used once; a retry signs
    /// in with a new one).
    #[arg(long)]
    client_request_id: Option<String>,
    /// If parked for approval, wait for the decision.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl Asking {
    /// How long to wait for a decision, if at all.
    fn wait(&self) -> Option<Duration> {
        self.wait.then_some(self.timeout)
    }
}

/// Run a `token` subcommand over `channel`.
pub async fn run(out: Output, cmd: TokenCmd, channel: Channel) -> Result<i32, Failure> {
    let mut b = BrokerClient::new(channel);
    match cmd {
        TokenCmd::Request {
            scopes,
            ttl,
            audience,
            break_glass,
            asking,
            ..
        } => {
            let wait = asking.wait();
            let req = pb::RequestTokenRequest {
                scopes,
                ttl: ttl.map(convert::duration),
                audience: audience.unwrap_or_default(),
                justification: asking.reason.unwrap_or_default(),
                client_request_id: asking.client_request_id.unwrap_or_default(),
                break_glass,
            };
            let resp = b.request_token(req).await?.into_inner();
            outcome(out, &mut b, resp.outcome, wait).await
        }
        TokenCmd::Exchange(args) => exchange(out, &mut b, args).await,
        TokenCmd::Inspect {
            token,
            presented_cert,
        } => {
            let x5t = presented_cert.as_deref().map(cert_thumbprint).transpose()?;
            inspect(
                out,
                &mut b,
                parse_token_arg(token)?,
                x5t.unwrap_or_default(),
            )
            .await
        }
    }
}

/// `token exchange`: ask, then print the child or the parked request.
async fn exchange(
    out: Output,
    b: &mut BrokerClient<Channel>,
    a: ExchangeArgs,
) -> Result<i32, Failure> {
    let wait = a.asking.wait();
    let req = pb::ExchangeTokenRequest {
        subject_token: parse_token_arg(a.token)?,
        scopes: a.scopes,
        ttl: a.ttl.map(convert::duration),
        audience: a.audience.unwrap_or_default(),
        for_identity: a.for_identity.unwrap_or_default(),
        justification: a.asking.reason.unwrap_or_default(),
        client_request_id: a.asking.client_request_id.unwrap_or_default(),
        subject_token_type: String::new(),
    };
    let resp = b.exchange_token(req).await?.into_inner();
    outcome(out, b, resp.outcome, wait).await
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
        Some(pb::request_token_response::Outcome::Pending(r))
            if r.state == pb::RequestState::Approved as i32 =>
        {
            // A bound child for another identity: it collects it itself.
            match out {
                Output::Text => eprintln!(
                    "{}the token is bound to its holder's certificate: `{}` collects it with: portcullis requests watch {}",
                    request_text(&r),
                    r.requester,
                    r.id
                ),
                Output::Json => println!("{}", json!({"pending": request_json(&r)})),
            }
            Ok(exit::PENDING)
        }
        Some(pb::request_token_response::Outcome::Pending(r)) => match wait {
            Some(timeout) => watch(out, b, &r.id, timeout, None).await,
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

/// `token request --id-token`: exchange the platform token on the
/// federation listener (`channel`), then print the grant, or wait for the
/// parked request with its claim secret (or print the secret, on stdout,
/// for a later `requests watch --claim-secret`).
pub async fn request_with_id_token(
    out: Output,
    cmd: TokenCmd,
    channel: Channel,
) -> Result<i32, Failure> {
    let TokenCmd::Request {
        scopes,
        ttl,
        audience,
        id_token: Some(id_token),
        asking,
        ..
    } = cmd
    else {
        return Err(usage("--id-token goes with `token request`"));
    };
    let mut b = BrokerClient::new(channel);
    let wait = asking.wait();
    let req = pb::ExchangeTokenRequest {
        subject_token: parse_token_arg(id_token)?,
        subject_token_type: pb::JWT_TOKEN_TYPE.to_owned(),
        scopes,
        ttl: ttl.map(convert::duration),
        audience: audience.unwrap_or_default(),
        for_identity: String::new(),
        justification: asking.reason.unwrap_or_default(),
        client_request_id: asking.client_request_id.unwrap_or_default(),
    };
    let resp = b.exchange_token(req).await?.into_inner();
    match (resp.outcome, wait) {
        (Some(pb::request_token_response::Outcome::Pending(r)), Some(timeout)) => {
            watch(out, &mut b, &r.id, timeout, Some(&resp.claim_secret)).await
        }
        (Some(pb::request_token_response::Outcome::Pending(r)), None) => {
            match out {
                Output::Text => {
                    eprintln!(
                        "{}parked for approval. Its claim secret is on stdout (keep it: it is the only way to collect the token); collect with: portcullis requests watch {} --claim-secret @FILE",
                        request_text(&r),
                        r.id
                    );
                    println!("{}", resp.claim_secret);
                }
                Output::Json => println!(
                    "{}",
                    json!({"pending": request_json(&r), "claim_secret": resp.claim_secret})
                ),
            }
            Ok(exit::PENDING)
        }
        (outcome, _) => self::outcome(out, &mut b, outcome, None).await,
    }
}

/// `requests watch ID --claim-secret`: follow (and collect) a request made
/// with a platform token, on the federation listener.
pub async fn watch_with_claim_secret(
    out: Output,
    id: &str,
    secret: String,
    channel: Channel,
) -> Result<i32, Failure> {
    let secret = parse_token_arg(secret)?;
    let mut b = BrokerClient::new(channel);
    watch(
        out,
        &mut b,
        id,
        Duration::from_secs(24 * 3600),
        Some(&secret),
    )
    .await
}

async fn inspect(
    out: Output,
    b: &mut BrokerClient<Channel>,
    token: String,
    cnf_x5t_s256: String,
) -> Result<i32, Failure> {
    let presented = !cnf_x5t_s256.is_empty();
    let r = b
        .introspect(pb::IntrospectRequest {
            token: token.clone(),
            cnf_x5t_s256,
        })
        .await?
        .into_inner();
    let when = |secs: i64| {
        format!(
            "{} ({secs})",
            fmt_ts(&Some(prost_types::Timestamp {
                seconds: secs,
                nanos: 0
            }))
        )
    };
    let text = if r.active {
        let mut t = format!(
            "active     true\nsub        {}\nscope      {}\naud        {}\nclient_id  {}\njti        {}\niss        {}\niat        {}\nexp        {}\n",
            r.sub,
            r.scope,
            r.aud.join(" "),
            r.client_id,
            r.jti,
            r.iss,
            when(r.iat),
            when(r.exp)
        );
        if !r.actors.is_empty() {
            t.push_str(&format!("act        {}\n", r.actors.join(" <- ")));
        }
        if !r.cnf_x5t_s256.is_empty() {
            let checked = if r.cnf_checked { " (matches)" } else { "" };
            t.push_str(&format!(
                "cnf        x5t#S256 {}{checked}\n",
                r.cnf_x5t_s256
            ));
        }
        t
    } else {
        format!(
            "active     false\nwhy        {}\n",
            why_inactive(b, &token, presented).await
        )
    };
    print(
        out,
        &text,
        json!({"active": r.active, "sub": r.sub, "scope": r.scope, "aud": r.aud, "client_id": r.client_id, "jti": r.jti, "iss": r.iss, "iat": r.iat, "nbf": r.nbf, "exp": r.exp, "token_type": r.token_type, "act": r.actors, "cnf_x5t_s256": r.cnf_x5t_s256, "cnf_checked": r.cnf_checked}),
    );
    Ok(if r.active { exit::OK } else { exit::FAILURE })
}

/// The RFC 8705 thumbprint of the first certificate in a PEM file.
fn cert_thumbprint(path: &std::path::Path) -> Result<String, Failure> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let cert = CertificateDer::from_pem_file(path).map_err(|e| {
        usage(format!(
            "reading a certificate from {}: {e}",
            path.display()
        ))
    })?;
    Ok(crate::identity::thumbprint(&cert))
}

fn parse_token_arg(t: String) -> Result<String, Failure> {
    if let Some(path) = t.strip_prefix('@') {
        let s = std::fs::read_to_string(path).map_err(|e| usage(format!("reading {path}: {e}")))?;
        return Ok(s.trim().to_owned());
    }
    if t == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| usage(format!("reading stdin: {e}")))?;
        Ok(s.trim().to_owned())
    } else {
        Ok(t)
    }
}

/// Why a token is inactive, as far as the caller may learn: read from the
/// token itself (unverified: the broker already said it is not good) and
/// from its lease when the caller may see it.
async fn why_inactive(b: &mut BrokerClient<Channel>, token: &str, presented: bool) -> String {
    // Read, never trusted: only to say which of the broker's reasons fits.
    let Some(claims) = crate::token::unverified_claims(token) else {
        return "not a token (not a JWT this broker could have issued)".into();
    };
    let now = convert::timestamp(std::time::SystemTime::now()).seconds;
    let exp = i64::try_from(claims.exp).unwrap_or(i64::MAX);
    let at = |secs: i64| {
        fmt_ts(&Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        }))
    };
    if exp != 0 && exp <= now {
        return format!("expired at {}", at(exp));
    }
    let lease = b
        .get_lease(pb::GetLeaseRequest {
            lease_id: claims.jti,
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().lease);
    match lease {
        Some(l) if l.state == pb::LeaseState::Revoked as i32 => format!(
            "revoked at {} by {}{}",
            fmt_ts(&l.revoked_at),
            clean(&l.revoked_by),
            if l.revoke_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", clean(&l.revoke_reason))
            }
        ),
        Some(l) if l.state == pb::LeaseState::Expired as i32 => {
            format!("its lease expired at {}", fmt_ts(&l.expires_at))
        }
        // The lease lives: this token is not the one it recorded, or not
        // presented as it must be. Which of these, the broker does not say.
        Some(_) if presented => "not accepted with the certificate presented (bound to another), or not its lease's current token (superseded by a renewal, altered, or signed by a withdrawn key)".into(),
        Some(_) => {
            "its lease is active, but this is not the token it recorded: superseded by a renewal, altered, or signed by a withdrawn key"
                .into()
        }
        None => {
            "unknown to this broker (another issuer, a removed key, or a lease you may not see)"
                .into()
        }
    }
}

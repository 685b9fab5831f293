//! The command line: `serve`, and client commands that talk to the broker
//! only through the generated gRPC client.
//!
//! Exit codes: 0 success, 1 failure, 2 denied by policy, 3 pending or timed
//! out waiting, 64 usage error (bad flags or a field the broker refused).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tonic::{Code, Status};

use crate::api::convert;
use crate::client::{ClientError, ClientOpts};
use crate::dev::DevDir;
use crate::identity::Identity;
use crate::keys::SigningAlg;
use crate::pb;
use crate::pb::approvals_client::ApprovalsClient;
use crate::pb::audit_client::AuditClient;
use crate::pb::broker_client::BrokerClient;
use crate::pb::keys_client::KeysClient;
use crate::policy::{Decision, Policy};

/// Process exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Failure (connection, server error).
    pub const FAILURE: i32 = 1;
    /// Denied by policy or by a person.
    pub const DENIED: i32 = 2;
    /// Pending, expired or timed out waiting.
    pub const PENDING: i32 = 3;
    /// Usage error: bad flags, or the broker refused a field.
    pub const USAGE: i32 = 64;
}

/// portcullis: a short-lived credential broker.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about, propagate_version = true)]
pub struct Cli {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: Output,
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "PORTCULLIS_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document.
    Json,
}

/// Log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// JSON lines.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Ask for and inspect tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List, show, renew and revoke leases.
    Lease {
        #[command(subcommand)]
        cmd: LeaseCmd,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Follow your parked requests.
    Requests {
        #[command(subcommand)]
        cmd: RequestsCmd,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Read the published signing keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Read and verify the decision trail (admins and auditors).
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Check a policy file or explain a decision (offline).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Keep a fresh token in a file (renews at ~2/3 of its life; waits for
    /// approval when needed; runs until interrupted).
    Agent {
        /// Scope (repeat).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Token file (written atomically, mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Audience.
        #[arg(long)]
        audience: Option<String>,
        /// Wanted TTL per lease.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Why (recorded).
        #[arg(long, default_value = "portcullis agent")]
        reason: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Load-test a running broker with auto-tier token requests.
    Bench {
        /// Scope(s) to request (must be auto for the identity).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Concurrent clients, one mTLS connection each.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// How long to measure (after a 0.5 s warm-up).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// `serve` flags (each also from `PORTCULLIS_*`).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Zero-config dev mode: dev CA, identities, policy and KEK are created
    /// in the data directory if missing.
    #[arg(long)]
    pub dev: bool,
    /// Data directory (dev mode keeps everything there; default
    /// `./portcullis-dev` with `--dev`).
    #[arg(long, env = "PORTCULLIS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC (mTLS) listen address; port 0 picks a free port.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: std::net::SocketAddr,
    /// HTTP listen address (JWKS, OIDC discovery, health).
    #[arg(long, env = "PORTCULLIS_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: std::net::SocketAddr,
    /// Server certificate (PEM). Dev default: `<data-dir>/server.pem`.
    #[arg(long, env = "PORTCULLIS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server key (PEM). Dev default: `<data-dir>/server-key.pem`.
    #[arg(long, env = "PORTCULLIS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle client certificates must chain to. Dev default: `<data-dir>/ca.pem`.
    #[arg(long, env = "PORTCULLIS_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Policy file. Dev default: `<data-dir>/policy.toml`.
    #[arg(long, env = "PORTCULLIS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Key-encryption key file (64 hex characters). Dev default: `<data-dir>/kek`.
    #[arg(long, env = "PORTCULLIS_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Issuer URL for `iss` (default `http://<http-listen>`).
    #[arg(long, env = "PORTCULLIS_ISSUER")]
    pub issuer: Option<String>,
    /// Algorithm for new signing keys.
    #[arg(
        long,
        env = "PORTCULLIS_SIGNING_ALG",
        value_enum,
        default_value = "es256"
    )]
    pub alg: SigningAlg,
    /// Keep audit records at least this long (e.g. `400d`); older ones are
    /// compacted up to a signed checkpoint. Default: keep everything.
    #[arg(long, env = "PORTCULLIS_AUDIT_RETENTION", value_parser = humantime::parse_duration)]
    pub audit_retention: Option<Duration>,
    /// How long a signing key signs before the next one takes over.
    #[arg(long, env = "PORTCULLIS_ROTATION_PERIOD", default_value = "24h", value_parser = humantime::parse_duration)]
    pub rotation_period: Duration,
    /// Delete leases and requests this long after they ended (e.g. `90d`);
    /// default: keep them. The deletion is recorded in the audit trail.
    #[arg(long, env = "PORTCULLIS_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Serve the HTTP listener (JWKS, discovery, metrics) over TLS with the
    /// server certificate. Recommended outside loopback development.
    #[arg(long, env = "PORTCULLIS_HTTP_TLS")]
    pub http_tls: bool,
    /// Keep all state in memory: nothing survives a restart and nothing is
    /// fsynced. For benchmarks and experiments only.
    #[arg(long)]
    pub in_memory: bool,
}

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

/// `lease` subcommands.
#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// List leases (yours, or `--subject` as admin).
    List {
        /// Whose leases.
        #[arg(long)]
        subject: Option<String>,
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Show one lease.
    Show {
        /// Lease id.
        id: String,
    },
    /// Renew a lease and print the fresh token.
    Renew {
        /// Lease id.
        id: String,
        /// Extension from now (default: the original TTL).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke a lease.
    Revoke {
        /// Lease id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke every active lease of a subject (admin; incident response).
    RevokeAll {
        /// Identity whose leases to revoke.
        #[arg(long)]
        subject: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Lease states for filters.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StateArg {
    /// Live.
    Active,
    /// Ran out.
    Expired,
    /// Ended early.
    Revoked,
}

/// `requests` subcommands.
#[derive(Debug, Subcommand)]
pub enum RequestsCmd {
    /// Requests you may decide now (approvers), oldest first.
    List {
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Approve a request (as an approver).
    Approve {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        /// Grant a shorter TTL than requested.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// The digest you reviewed (from `requests show`); refused if the request differs.
        #[arg(long)]
        digest: Option<String>,
    },
    /// Deny a request (as an approver). A reason is required.
    Deny {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Acknowledge a break-glass grant after the fact (as an approver).
    Ack {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
        /// Also revoke the break-glass lease.
        #[arg(long)]
        revoke: bool,
    },
    /// Show one request.
    Show {
        /// Request id.
        id: String,
    },
    /// Follow a request until it ends.
    Watch {
        /// Request id.
        id: String,
    },
    /// Withdraw your pending request.
    Withdraw {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Follow new records as they are written.
    Tail {
        /// Replay records after this sequence number first.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// `jsonl` prints each record's canonical JSON (what the chain hashes).
        #[arg(long, value_enum, default_value = "text")]
        format: AuditFormat,
    },
    /// Print records, filtered.
    Export {
        /// Only records this recent (e.g. `1h`) or since this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only this actor.
        #[arg(long)]
        actor: Option<String>,
        /// Only this action, or a prefix ending in `.` (e.g. `lease.`).
        #[arg(long)]
        action: Option<String>,
        /// Only this target (lease, request or key id).
        #[arg(long)]
        target: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: AuditFormat,
    },
    /// Walk the hash chain and the signed checkpoints.
    Verify,
}

/// Audit output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuditFormat {
    /// One line per record for people.
    Text,
    /// JSON Lines: each record's canonical JSON, for a SIEM.
    Jsonl,
}

fn audit_line(r: &pb::AuditRecord, format: AuditFormat) -> String {
    match format {
        AuditFormat::Jsonl => format!("{}\n", r.canonical_json),
        AuditFormat::Text => format!(
            "{:>6} {} {:<24} {:<8} {} {} {}{}\n",
            r.seq,
            fmt_ts(&r.at),
            r.action,
            r.outcome,
            r.actor,
            r.target,
            r.scopes.join(" "),
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(" — {}", r.reason)
            }
        ),
    }
}

fn parse_since(s: &str) -> Result<prost_types::Timestamp, Failure> {
    let t = match humantime::parse_duration(s) {
        Ok(ago) => std::time::SystemTime::now() - ago,
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            usage(format!(
                "--since: `{s}` is neither a duration nor an RFC 3339 time"
            ))
        })?,
    };
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(secs).unwrap_or(0),
        nanos: 0,
    })
}

async fn audit_cmd(out: Output, cmd: AuditCmd, client: &ClientOpts) -> Result<i32, Failure> {
    let mut a = AuditClient::new(client.connect().await?);
    match cmd {
        AuditCmd::Verify => {
            let r = a.verify(pb::VerifyRequest {}).await?.into_inner();
            let text = if r.ok {
                format!(
                    "verified {} records and {} signed checkpoints\n",
                    r.records, r.checkpoints
                )
            } else {
                format!(
                    "BROKEN at record {}: {} ({} records verified before it)\n",
                    r.first_bad_seq, r.problem, r.records
                )
            };
            print(
                out,
                &text,
                json!({"ok": r.ok, "records": r.records, "checkpoints": r.checkpoints, "first_bad_seq": r.first_bad_seq, "problem": r.problem}),
            );
            Ok(if r.ok { exit::OK } else { exit::FAILURE })
        }
        AuditCmd::Export {
            since,
            actor,
            action,
            target,
            format,
        } => {
            let since = since.as_deref().map(parse_since).transpose()?;
            let mut after = 0;
            loop {
                let page = a
                    .export(pb::ExportRequest {
                        since,
                        actor: actor.clone().unwrap_or_default(),
                        action: action.clone().unwrap_or_default(),
                        target: target.clone().unwrap_or_default(),
                        after_seq: after,
                        page_size: 5000,
                    })
                    .await?
                    .into_inner();
                let text: String = page.records.iter().map(|r| audit_line(r, format)).collect();
                print!("{text}");
                if page.next_after_seq == 0 {
                    return Ok(exit::OK);
                }
                after = page.next_after_seq;
            }
        }
        AuditCmd::Tail { after, format } => {
            let mut stream = a
                .tail(pb::TailRequest { after_seq: after })
                .await?
                .into_inner();
            while let Some(r) = stream.message().await? {
                print!("{}", audit_line(&r, format));
            }
            Ok(exit::OK)
        }
    }
}

fn key_state_name(v: i32) -> &'static str {
    match pb::KeyState::try_from(v) {
        Ok(pb::KeyState::Next) => "next",
        Ok(pb::KeyState::Active) => "active",
        Ok(pb::KeyState::Retired) => "retired",
        _ => "unknown",
    }
}

fn key_line(k: &pb::KeyInfo) -> String {
    format!(
        "{}  {:<5} {:<7} created {}  activated {}  retire at {}\n",
        k.kid,
        k.alg,
        key_state_name(k.state),
        fmt_ts(&k.created_at),
        fmt_ts(&k.activated_at),
        fmt_ts(&k.retire_at)
    )
}

fn key_json(k: &pb::KeyInfo) -> serde_json::Value {
    json!({"kid": k.kid, "alg": k.alg, "state": key_state_name(k.state), "created_at": ts_json(&k.created_at), "activated_at": ts_json(&k.activated_at), "retire_at": ts_json(&k.retire_at)})
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Print the JWK Set.
    Jwks,
    /// List keys and their states.
    List,
    /// Rotate the signing key now (admin). `--emergency` removes the active
    /// key at once and revokes every lease it signed.
    Rotate {
        /// Compromised key: remove it now.
        #[arg(long)]
        emergency: bool,
        /// Why (recorded).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy file and report every problem.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Say what the policy decides for an identity and scopes.
    Explain {
        /// Policy file (default: `$PORTCULLIS_DEV_DIR/policy.toml` or `./portcullis-dev/policy.toml`).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Asking identity.
        #[arg(long)]
        identity: String,
        /// Scope (repeat).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Wanted TTL.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

/// A command failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// Message for stderr.
    pub message: String,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        let code = match s.code() {
            Code::PermissionDenied => exit::DENIED,
            Code::InvalidArgument | Code::AlreadyExists => exit::USAGE,
            _ => exit::FAILURE,
        };
        let message = match s.code() {
            Code::Unknown | Code::Unavailable
                if s.message().contains("transport") || s.message().contains("connection") =>
            {
                crate::client::explain_transport(&s)
            }
            c => format!("{c:?}: {}", s.message()),
        };
        Self { code, message }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = if matches!(e, ClientError::Usage(_)) {
            exit::USAGE
        } else {
            exit::FAILURE
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        code: exit::USAGE,
        message: msg.into(),
    }
}

fn fmt_ts(t: &Option<prost_types::Timestamp>) -> String {
    match t {
        Some(t) => {
            let st = std::time::UNIX_EPOCH
                + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
            humantime::format_rfc3339_seconds(st).to_string()
        }
        None => "-".into(),
    }
}

fn ts_json(t: &Option<prost_types::Timestamp>) -> serde_json::Value {
    t.as_ref()
        .map_or(serde_json::Value::Null, |_| fmt_ts(t).into())
}

fn lease_state_name(v: i32) -> &'static str {
    match pb::LeaseState::try_from(v) {
        Ok(pb::LeaseState::Active) => "active",
        Ok(pb::LeaseState::Expired) => "expired",
        Ok(pb::LeaseState::Revoked) => "revoked",
        _ => "unknown",
    }
}

fn request_state_name(v: i32) -> &'static str {
    match pb::RequestState::try_from(v) {
        Ok(pb::RequestState::Pending) => "pending",
        Ok(pb::RequestState::Approved) => "approved",
        Ok(pb::RequestState::Issued) => "issued",
        Ok(pb::RequestState::Denied) => "denied",
        Ok(pb::RequestState::Withdrawn) => "withdrawn",
        Ok(pb::RequestState::Expired) => "expired",
        _ => "unknown",
    }
}

fn lease_json(l: &pb::Lease) -> serde_json::Value {
    json!({
        "id": l.id, "subject": l.subject, "client_id": l.client_id, "scopes": l.scopes,
        "audience": l.audience, "state": lease_state_name(l.state), "kid": l.kid,
        "issued_at": ts_json(&l.issued_at), "expires_at": ts_json(&l.expires_at),
        "max_expires_at": ts_json(&l.max_expires_at), "renewals": l.renewals,
        "revoked_at": ts_json(&l.revoked_at), "revoked_by": l.revoked_by, "revoke_reason": l.revoke_reason,
        "justification": l.justification, "request_id": l.request_id,
    })
}

fn lease_text(l: &pb::Lease) -> String {
    let mut s = format!(
        "lease      {}\nstate      {}\nsubject    {}\nscopes     {}\naudience   {}\nissued     {}\nexpires    {}\nmax expiry {}\nrenewals   {}\nkid        {}\n",
        l.id,
        lease_state_name(l.state),
        l.subject,
        l.scopes.join(" "),
        l.audience,
        fmt_ts(&l.issued_at),
        fmt_ts(&l.expires_at),
        fmt_ts(&l.max_expires_at),
        l.renewals,
        l.kid
    );
    if l.revoked_at.is_some() {
        s.push_str(&format!(
            "revoked    {} by {} ({})\n",
            fmt_ts(&l.revoked_at),
            l.revoked_by,
            l.revoke_reason
        ));
    }
    s
}

fn request_json(r: &pb::TokenRequest) -> serde_json::Value {
    json!({
        "id": r.id, "requester": r.requester, "scopes": r.scopes, "audience": r.audience,
        "ttl_seconds": r.ttl.as_ref().map(|d| d.seconds), "state": request_state_name(r.state),
        "created_at": ts_json(&r.created_at), "expires_at": ts_json(&r.expires_at),
        "justification": r.justification, "digest": r.digest, "lease_id": r.lease_id,
        "waiting_for": r.waiting_for.iter().map(|w| json!({
            "scope": w.scope, "approver_groups": w.approver_groups,
            "approvals_required": w.approvals_required, "approvals_received": w.approvals_received, "rule": w.rule,
        })).collect::<Vec<_>>(),
        "history": r.history.iter().map(|t| json!({
            "from": request_state_name(t.from), "to": request_state_name(t.to), "actor": t.actor,
            "at": ts_json(&t.at), "reason": t.reason,
        })).collect::<Vec<_>>(),
    })
}

fn request_text(r: &pb::TokenRequest) -> String {
    let mut s = format!(
        "request    {}\nstate      {}\nrequester  {}\nscopes     {}\nexpires    {}\n",
        r.id,
        request_state_name(r.state),
        r.requester,
        r.scopes.join(" "),
        fmt_ts(&r.expires_at)
    );
    for w in &r.waiting_for {
        s.push_str(&format!(
            "waits for  {} of {} approval(s) for `{}` from group(s) {}\n",
            w.approvals_received,
            w.approvals_required,
            w.scope,
            w.approver_groups.join(", ")
        ));
    }
    s
}

/// Everything an approver needs to decide.
fn request_detail(r: &pb::TokenRequest) -> String {
    let mut s = request_text(r);
    s.push_str(&format!(
        "audience   {}\nttl        {}s\ncreated    {}\nreason     {}\ndigest     {}\n",
        r.audience,
        r.ttl.as_ref().map_or(0, |d| d.seconds),
        fmt_ts(&r.created_at),
        r.justification,
        r.digest
    ));
    for w in &r.waiting_for {
        s.push_str(&format!("rule       {}\n", w.rule));
    }
    for a in &r.approvals {
        s.push_str(&format!(
            "approved   by {} at {} ({})\n",
            a.approver,
            fmt_ts(&a.at),
            a.reason
        ));
    }
    for t in &r.history {
        s.push_str(&format!(
            "history    {} {} -> {} by {} ({})\n",
            fmt_ts(&t.at),
            request_state_name(t.from),
            request_state_name(t.to),
            t.actor,
            t.reason
        ));
    }
    if r.break_glass {
        s.push_str(&format!(
            "break-glass {}\n",
            if r.review_pending {
                "awaiting review".to_owned()
            } else {
                format!("acknowledged by {} ({})", r.reviewed_by, r.review_reason)
            }
        ));
    }
    s
}

/// One line of live status while waiting.
fn status_line(r: &pb::TokenRequest) -> String {
    let left = r.expires_at.as_ref().map_or(String::new(), |t| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        format!(
            ", {} left",
            humantime::format_duration(Duration::from_secs((t.seconds - now).max(0) as u64))
        )
    });
    let needs: Vec<String> = r
        .waiting_for
        .iter()
        .filter(|w| w.approvals_received < w.approvals_required)
        .map(|w| {
            format!(
                "{} needs {}/{} from {}",
                w.scope,
                w.approvals_received,
                w.approvals_required,
                w.approver_groups.join("|")
            )
        })
        .collect();
    match pb::RequestState::try_from(r.state) {
        Ok(pb::RequestState::Pending) => format!("[{}] pending: {}{left}", r.id, needs.join("; ")),
        Ok(pb::RequestState::Approved) => format!("[{}] approved; claiming the token", r.id),
        _ => format!("[{}] {}", r.id, request_state_name(r.state)),
    }
}

/// The end of a listed page: a word when it is empty, how to go on.
fn page_footer(text: &mut String, empty: bool, when_empty: &str, next: &str) {
    if empty {
        text.push_str(when_empty);
        text.push('\n');
    }
    if !next.is_empty() {
        text.push_str(&format!("more: --page-token {next}\n"));
    }
}

fn print(out: Output, text: &str, value: serde_json::Value) {
    match out {
        Output::Text => print!("{text}"),
        Output::Json => println!("{value}"),
    }
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

/// Run a client or offline command (everything except `serve`).
pub async fn run_client(cli: Cli) -> Result<i32, Failure> {
    let out = cli.output;
    match cli.command {
        Command::Serve(_) => Err(usage("serve is run by the binary's main")),
        Command::Policy { cmd } => policy_cmd(out, cmd),
        Command::Agent {
            scopes,
            out: file,
            audience,
            ttl,
            reason,
            client,
        } => {
            let cfg = crate::agent::AgentConfig {
                scopes,
                audience: audience.unwrap_or_default(),
                ttl,
                out: file,
                reason,
            };
            crate::agent::run(client, cfg, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
            Ok(exit::OK)
        }
        Command::Audit { cmd, client } => audit_cmd(out, cmd, &client).await,
        Command::Token { cmd, client } => token_cmd(out, cmd, &client).await,
        Command::Lease { cmd, client } => lease_cmd(out, cmd, &client).await,
        Command::Requests { cmd, client } => requests_cmd(out, cmd, &client).await,
        Command::Keys { cmd, client } => {
            let mut k = KeysClient::new(client.connect().await?);
            match cmd {
                KeysCmd::Jwks => {
                    let r = k.get_jwks(pb::GetJwksRequest {}).await?.into_inner();
                    println!("{}", r.jwks_json);
                }
                KeysCmd::Rotate { emergency, reason } => {
                    let r = k
                        .rotate(pb::RotateRequest {
                            emergency,
                            reason: reason.unwrap_or_default(),
                        })
                        .await?
                        .into_inner();
                    let text: String = r.keys.iter().map(key_line).collect();
                    print(
                        out,
                        &text,
                        json!(r.keys.iter().map(key_json).collect::<Vec<_>>()),
                    );
                }
                KeysCmd::List => {
                    let r = k.list_keys(pb::ListKeysRequest {}).await?.into_inner();
                    let text: String = r.keys.iter().map(key_line).collect();
                    print(
                        out,
                        &text,
                        json!(r.keys.iter().map(key_json).collect::<Vec<_>>()),
                    );
                }
            }
            Ok(exit::OK)
        }
        Command::Bench {
            scopes,
            clients,
            duration,
            client,
        } => {
            if clients == 0 {
                return Err(usage("--clients must be at least 1"));
            }
            let r = crate::bench::run(&client, scopes, clients, duration).await?;
            let text = format!(
                "clients {}  duration {:.1}s  grants {}  errors {}\ngrants/s {:.0}  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n",
                r.clients,
                r.seconds,
                r.grants,
                r.errors,
                r.grants_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.max_ms
            );
            print(out, &text, serde_json::to_value(&r).unwrap_or_default());
            Ok(if r.errors > 0 && r.grants == 0 {
                exit::FAILURE
            } else {
                exit::OK
            })
        }
    }
}

fn policy_cmd(out: Output, cmd: PolicyCmd) -> Result<i32, Failure> {
    match cmd {
        PolicyCmd::Check { file } => match Policy::load(&file) {
            Ok(p) => {
                let text = format!(
                    "ok: {} scope(s), {} group(s)\n",
                    p.scopes.len(),
                    p.groups.len()
                );
                print(
                    out,
                    &text,
                    json!({"ok": true, "scopes": p.scopes.len(), "groups": p.groups.len()}),
                );
                Ok(exit::OK)
            }
            Err(crate::policy::PolicyError::Invalid(problems)) => {
                let text: String = problems
                    .iter()
                    .map(|p| format!("{}: {p}\n", file.display()))
                    .collect();
                let problems_json: Vec<_> = problems
                    .iter()
                    .map(|p| json!({"line": p.line, "message": p.message}))
                    .collect();
                match out {
                    Output::Text => eprint!("{text}"),
                    Output::Json => println!("{}", json!({"ok": false, "problems": problems_json})),
                }
                Ok(exit::FAILURE)
            }
            Err(e) => Err(Failure {
                code: exit::FAILURE,
                message: e.to_string(),
            }),
        },
        PolicyCmd::Explain {
            policy,
            identity,
            scopes,
            ttl,
        } => {
            let path = policy.unwrap_or_else(|| {
                let dir = std::env::var_os("PORTCULLIS_DEV_DIR")
                    .map_or_else(|| PathBuf::from("portcullis-dev"), PathBuf::from);
                dir.join("policy.toml")
            });
            let p = Policy::load(&path).map_err(|e| Failure {
                code: exit::FAILURE,
                message: e.to_string(),
            })?;
            let who = Identity::parse(&identity).map_err(|e| usage(format!("--identity: {e}")))?;
            match p.decide(&who, &scopes, ttl) {
                Ok(Decision::Grant {
                    ttl,
                    max_ttl,
                    rules,
                }) => {
                    let text = format!(
                        "grant at once: ttl {}, renewable to {}\nallowed by: {}\n",
                        humantime::format_duration(ttl),
                        humantime::format_duration(max_ttl),
                        rules.join("; ")
                    );
                    print(
                        out,
                        &text,
                        json!({"decision": "grant", "ttl_seconds": ttl.as_secs(), "max_ttl_seconds": max_ttl.as_secs(), "rules": rules}),
                    );
                    Ok(exit::OK)
                }
                Ok(Decision::Park {
                    ttl,
                    pending_ttl,
                    requirements,
                    ..
                }) => {
                    let mut text = format!(
                        "park for approval (waits up to {}), then ttl {}\n",
                        humantime::format_duration(pending_ttl),
                        humantime::format_duration(ttl)
                    );
                    for r in &requirements {
                        let members: Vec<String> = r
                            .approver_groups
                            .iter()
                            .flat_map(|g| p.groups.get(g).cloned().unwrap_or_default())
                            .collect();
                        text.push_str(&format!(
                            "  `{}` needs {} approval(s) from {} ({}) — {}\n",
                            r.scope,
                            r.approvals_required,
                            r.approver_groups.join(", "),
                            members.join(", "),
                            r.rule
                        ));
                    }
                    let reqs: Vec<_> = requirements.iter().map(|r| json!({"scope": r.scope, "approver_groups": r.approver_groups, "approvals_required": r.approvals_required, "rule": r.rule})).collect();
                    print(
                        out,
                        &text,
                        json!({"decision": "park", "ttl_seconds": ttl.as_secs(), "pending_ttl_seconds": pending_ttl.as_secs(), "requirements": reqs}),
                    );
                    Ok(exit::PENDING)
                }
                Err(r) => {
                    print(
                        out,
                        &format!("refuse: {r}\n"),
                        json!({"decision": "refuse", "scope": r.scope, "reason": r.reason}),
                    );
                    Ok(exit::DENIED)
                }
            }
        }
    }
}

async fn token_cmd(out: Output, cmd: TokenCmd, client: &ClientOpts) -> Result<i32, Failure> {
    let mut b = BrokerClient::new(client.connect().await?);
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
                ttl: ttl.map(|d| convert::dur(crate::clock::millis(d))),
                audience: audience.unwrap_or_default(),
                justification: reason.unwrap_or_default(),
                client_request_id: client_request_id.unwrap_or_default(),
                break_glass,
            };
            let resp = b.request_token(req).await?.into_inner();
            match resp.outcome {
                Some(pb::request_token_response::Outcome::Granted(g)) => {
                    print_grant(out, &g);
                    Ok(exit::OK)
                }
                Some(pb::request_token_response::Outcome::Pending(r)) => {
                    if !wait {
                        match out {
                            Output::Text => eprintln!(
                                "{}parked for approval; follow it with: portcullis requests watch {}",
                                request_text(&r),
                                r.id
                            ),
                            Output::Json => println!("{}", json!({"pending": request_json(&r)})),
                        }
                        return Ok(exit::PENDING);
                    }
                    watch(out, &mut b, &r.id, timeout).await
                }
                None => Err(Failure {
                    code: exit::FAILURE,
                    message: "empty response from broker".into(),
                }),
            }
        }
        TokenCmd::Inspect { token } => {
            let token = parse_token_arg(token)?;
            let r = b
                .introspect(pb::IntrospectRequest { token })
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
    }
}

fn print_grant(out: Output, g: &pb::Grant) {
    match out {
        Output::Text => {
            if let Some(l) = &g.lease {
                eprintln!(
                    "granted lease {} ({}) until {}",
                    l.id,
                    l.scopes.join(" "),
                    fmt_ts(&l.expires_at)
                );
            }
            println!("{}", g.token);
        }
        Output::Json => println!(
            "{}",
            json!({"token": g.token, "lease": g.lease.as_ref().map(lease_json)})
        ),
    }
}

async fn watch(
    out: Output,
    b: &mut BrokerClient<tonic::transport::Channel>,
    id: &str,
    timeout: Duration,
) -> Result<i32, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = b
        .watch_request(pb::WatchRequestRequest {
            request_id: id.to_owned(),
        })
        .await?
        .into_inner();
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        let msg = match next {
            Err(_) => {
                eprintln!("timed out waiting for request {id}");
                return Ok(exit::PENDING);
            }
            Ok(r) => r?,
        };
        let Some(msg) = msg else {
            return Err(Failure {
                code: exit::FAILURE,
                message: "watch ended before the request did; watch again to resume".into(),
            });
        };
        if let Some(g) = &msg.grant {
            print_grant(out, g);
            return Ok(exit::OK);
        }
        let Some(r) = msg.request else { continue };
        let state = pb::RequestState::try_from(r.state).unwrap_or(pb::RequestState::Unspecified);
        match out {
            Output::Text => eprintln!("{}", status_line(&r)),
            Output::Json => println!("{}", json!({"request": request_json(&r)})),
        }
        match state {
            pb::RequestState::Denied => return Ok(exit::DENIED),
            pb::RequestState::Expired | pb::RequestState::Withdrawn => return Ok(exit::PENDING),
            pb::RequestState::Issued => {
                return Err(Failure {
                    code: exit::FAILURE,
                    message: format!(
                        "request {id} was issued, but its token went to another session (a token is delivered once)"
                    ),
                });
            }
            _ => {}
        }
    }
}

async fn lease_cmd(out: Output, cmd: LeaseCmd, client: &ClientOpts) -> Result<i32, Failure> {
    let mut b = BrokerClient::new(client.connect().await?);
    match cmd {
        LeaseCmd::List {
            subject,
            state,
            limit,
            page_token,
        } => {
            let state = match state {
                None => pb::LeaseState::Unspecified,
                Some(StateArg::Active) => pb::LeaseState::Active,
                Some(StateArg::Expired) => pb::LeaseState::Expired,
                Some(StateArg::Revoked) => pb::LeaseState::Revoked,
            };
            let r = b
                .list_leases(pb::ListLeasesRequest {
                    subject: subject.unwrap_or_default(),
                    state: state as i32,
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut text: String = r
                .leases
                .iter()
                .map(|l| {
                    format!(
                        "{}  {:<8} {}  expires {}\n",
                        l.id,
                        lease_state_name(l.state),
                        l.scopes.join(" "),
                        fmt_ts(&l.expires_at)
                    )
                })
                .collect();
            page_footer(
                &mut text,
                r.leases.is_empty(),
                "no leases",
                &r.next_page_token,
            );
            print(
                out,
                &text,
                json!({"leases": r.leases.iter().map(lease_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token}),
            );
        }
        LeaseCmd::Show { id } => {
            let l = b
                .get_lease(pb::GetLeaseRequest { lease_id: id })
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
            print(out, &lease_text(&l), lease_json(&l));
        }
        LeaseCmd::Renew { id, ttl } => {
            let g = b
                .renew_lease(pb::RenewLeaseRequest {
                    lease_id: id,
                    ttl: ttl.map(|d| convert::dur(crate::clock::millis(d))),
                })
                .await?
                .into_inner()
                .grant
                .unwrap_or_default();
            print_grant(out, &g);
        }
        LeaseCmd::Revoke { id, reason } => {
            let l = b
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: id,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .lease
                .unwrap_or_default();
            print(out, &lease_text(&l), lease_json(&l));
        }
        LeaseCmd::RevokeAll { subject, reason } => {
            let r = b
                .revoke_leases(pb::RevokeLeasesRequest {
                    subject: subject.clone(),
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print(
                out,
                &format!("revoked {} active lease(s) of {subject}\n", r.revoked),
                json!({"subject": subject, "revoked": r.revoked}),
            );
        }
    }
    Ok(exit::OK)
}

async fn requests_cmd(out: Output, cmd: RequestsCmd, client: &ClientOpts) -> Result<i32, Failure> {
    let mut b = BrokerClient::new(client.connect().await?);
    match cmd {
        RequestsCmd::Show { id } => {
            // The reviewer's view: reading never claims a token.
            let mut a = ApprovalsClient::new(client.connect().await?);
            let r = a
                .get_request(pb::GetRequestRequest { request_id: id })
                .await?
                .into_inner()
                .request
                .unwrap_or_default();
            print(out, &request_detail(&r), request_json(&r));
            Ok(exit::OK)
        }
        RequestsCmd::List { limit, page_token } => {
            let mut a = ApprovalsClient::new(client.connect().await?);
            let r = a
                .list_pending(pb::ListPendingRequest {
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut text: String = r
                .requests
                .iter()
                .map(|q| {
                    let kind = if q.review_pending {
                        "break-glass review"
                    } else {
                        "pending"
                    };
                    format!(
                        "{}  {kind:<18} {}  {}  \"{}\"\n",
                        q.id,
                        q.requester,
                        q.scopes.join(" "),
                        q.justification
                    )
                })
                .collect();
            page_footer(
                &mut text,
                r.requests.is_empty(),
                "nothing to decide",
                &r.next_page_token,
            );
            print(
                out,
                &text,
                json!({"requests": r.requests.iter().map(request_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token}),
            );
            Ok(exit::OK)
        }
        RequestsCmd::Approve {
            id,
            reason,
            ttl,
            digest,
        } => {
            let mut a = ApprovalsClient::new(client.connect().await?);
            let r = a
                .approve(pb::ApproveRequest {
                    request_id: id,
                    reason: reason.unwrap_or_default(),
                    ttl: ttl.map(|d| convert::dur(crate::clock::millis(d))),
                    digest: digest.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .request
                .unwrap_or_default();
            print(out, &request_text(&r), request_json(&r));
            Ok(exit::OK)
        }
        RequestsCmd::Deny { id, reason } => {
            let mut a = ApprovalsClient::new(client.connect().await?);
            let r = a
                .deny(pb::DenyRequest {
                    request_id: id,
                    reason,
                })
                .await?
                .into_inner()
                .request
                .unwrap_or_default();
            print(out, &request_text(&r), request_json(&r));
            Ok(exit::OK)
        }
        RequestsCmd::Ack { id, reason, revoke } => {
            let mut a = ApprovalsClient::new(client.connect().await?);
            let r = a
                .acknowledge(pb::AcknowledgeRequest {
                    request_id: id,
                    reason: reason.unwrap_or_default(),
                    revoke,
                })
                .await?
                .into_inner()
                .request
                .unwrap_or_default();
            print(out, &request_text(&r), request_json(&r));
            Ok(exit::OK)
        }
        RequestsCmd::Watch { id } => watch(out, &mut b, &id, Duration::from_secs(24 * 3600)).await,
        RequestsCmd::Withdraw { id, reason } => {
            let r = b
                .withdraw_request(pb::WithdrawRequestRequest {
                    request_id: id,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .request
                .unwrap_or_default();
            print(out, &request_text(&r), request_json(&r));
            Ok(exit::OK)
        }
    }
}

/// Resolve `serve` flags into a config, creating the dev setup when asked.
pub fn serve_config(
    args: &ServeArgs,
) -> Result<(crate::server::ServeConfig, Option<DevDir>), Failure> {
    let dev = if args.dev {
        let dir = DevDir::new(
            args.data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("portcullis-dev")),
        );
        let created = dir.prepare().map_err(|e| Failure {
            code: exit::FAILURE,
            message: e.to_string(),
        })?;
        if created {
            tracing::info!(dir = %dir.root.display(), "created dev CA, identities, policy and key-encryption key");
        }
        Some(dir)
    } else {
        None
    };
    let need = |v: &Option<PathBuf>, dev_name: &str, flag: &str| -> Result<PathBuf, Failure> {
        match (v, &dev) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(d)) => Ok(d.path(dev_name)),
            (None, None) => Err(usage(format!("--{flag} is required without --dev"))),
        }
    };
    let data_dir = match (&args.data_dir, &dev) {
        (_, Some(d)) => d.data(),
        (Some(p), None) => p.clone(),
        (None, None) => return Err(usage("--data-dir is required without --dev")),
    };
    let mut cfg = crate::server::ServeConfig::new(
        data_dir,
        need(&args.tls_cert, "server.pem", "tls-cert")?,
        need(&args.tls_key, "server-key.pem", "tls-key")?,
        need(&args.client_ca, "ca.pem", "client-ca")?,
        need(&args.policy, "policy.toml", "policy")?,
        need(&args.kek_file, "kek", "kek-file")?,
    );
    cfg.listen = args.listen;
    cfg.http_listen = Some(args.http_listen);
    cfg.issuer = args.issuer.clone();
    cfg.alg = args.alg;
    cfg.in_memory = args.in_memory;
    if args.rotation_period < Duration::from_secs(3600) {
        return Err(usage(
            "--rotation-period must be at least 1h (a next key is pre-published 10m ahead)",
        ));
    }
    cfg.rotation.period = args.rotation_period;
    cfg.audit_retention = args.audit_retention;
    cfg.http_tls = args.http_tls;
    cfg.retention = args.retention;
    Ok((cfg, dev))
}

/// What `serve --dev` prints once it is listening.
pub fn dev_banner(
    dir: &DevDir,
    grpc: std::net::SocketAddr,
    http: Option<std::net::SocketAddr>,
) -> String {
    let d = dir.root.display();
    let http = http.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let mut s = format!(
        "portcullis dev broker ready\n  gRPC (mTLS)  {grpc}\n  HTTP         http://{http}  (/.well-known/jwks.json, /healthz)\n  data         {d}\n\nIn another terminal:\n  export PORTCULLIS_DEV_DIR={d}\n"
    );
    let bin = "cargo run --release --";
    for line in [
        format!(
            "{bin} token request --scope orders.read --reason 'read orders'   # auto: granted at once"
        ),
        format!("{bin} lease list"),
        format!(
            "{bin} token request --scope orders.admin --reason 'fix a bad row'   # approval: parked"
        ),
        format!(
            "{bin} policy explain --identity {} --scope orders.admin",
            crate::dev::WORKLOAD
        ),
    ] {
        s.push_str("  ");
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str(&format!(
        "Identities: --as workload ({}), approver ({}), admin ({})\n",
        crate::dev::WORKLOAD,
        crate::dev::APPROVER,
        crate::dev::ADMIN
    ));
    s
}

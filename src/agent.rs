//! `portcullis agent`: keeps a fresh token in a file for a workload that
//! only reads files (like Vault Agent, the SPIRE agent or tbot). It renews
//! at about two thirds of the token's life, asks for a new lease when the
//! old one cannot be renewed (max_ttl, revoked, expired), waits for
//! approval when the scope needs it, backs off on errors, and keeps the last
//! good token in place until it expires.
//!
//! With a parent token file it keeps a *delegated* token instead: a child
//! exchanged from the parent (narrower, never outliving it), renewed while
//! the parent lives and exchanged afresh from the file when it cannot be.
//!
//! With an env file it keeps a login scope's database login there too: a
//! renewal keeps the login (and moves its end), a new lease brings a new
//! login, written before the old one ends.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::{ClientError, ClientOpts, convert};
use crate::fsutil::{Access, write_atomic};
use crate::pb;
use crate::pb::broker_client::BrokerClient;

/// What to keep fresh.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Scopes.
    pub scopes: Vec<String>,
    /// Audience (empty: policy default).
    pub audience: String,
    /// Wanted TTL per lease.
    pub ttl: Option<Duration>,
    /// Token file (`None`: the env file only).
    pub out: Option<PathBuf>,
    /// Env file: the lease, its token and — for a login scope — its
    /// database login as `PG*` variables, rewritten at every renewal and
    /// re-issue (`None`: the token file only).
    pub env_file: Option<PathBuf>,
    /// Why (recorded, shown to approvers).
    pub reason: String,
    /// Keep a *delegated* token instead: exchange the token in this file
    /// (re-read at every new lease, so it follows whatever keeps the parent
    /// fresh) for a child with `scopes` (empty: all of the parent's).
    pub from_token: Option<PathBuf>,
    /// With `from_token`: who the child is for (empty: this agent).
    pub for_identity: String,
    /// Sign in with the platform token in this file (a Kubernetes
    /// projected token, a CI job's OIDC token), re-read for each new lease,
    /// on the federation listener. Such a lease is never renewed: a new
    /// one is asked for with the file's current token.
    pub id_token: Option<PathBuf>,
}

/// Why a refresh failed; the variant, not the text, says what to do next.
#[derive(Debug, thiserror::Error)]
enum RefreshError {
    /// The lease cannot be renewed any more (max_ttl reached, revoked,
    /// expired, gone): ask for a new one.
    #[error("lease cannot be renewed ({}); asking for a new one", .0.message())]
    LeaseEnded(tonic::Status),
    /// No connection.
    #[error("{0}")]
    Connect(#[from] ClientError),
    /// The broker said no, or the call failed.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The request ended without a token for this agent.
    #[error("request {0} ended without a token for this agent")]
    NoToken(String),
    /// The parent token file could not be read.
    #[error("parent token: {0}")]
    ParentToken(String),
    /// The watch stream or response ended early.
    #[error("{0}")]
    Incomplete(&'static str),
}

/// When to renew: two thirds into the remaining life, at least 1 s.
fn renew_after(lease: &pb::Lease) -> Duration {
    let left = convert::until(lease.expires_at.as_ref());
    (left * 2 / 3).max(Duration::from_secs(1))
}

/// A new lease with the platform token in `path`, on the federation
/// listener (waiting for approval with the claim secret when it parks).
async fn sign_in(
    opts: &ClientOpts,
    cfg: &AgentConfig,
    path: &std::path::Path,
) -> Result<pb::Grant, RefreshError> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| RefreshError::ParentToken(format!("reading {}: {e}", path.display())))?;
    let mut c = BrokerClient::new(opts.connect_federation().await?);
    let req = pb::ExchangeTokenRequest {
        subject_token: token.trim().to_owned(),
        subject_token_type: pb::JWT_TOKEN_TYPE.to_owned(),
        scopes: cfg.scopes.clone(),
        ttl: cfg.ttl.map(convert::duration),
        audience: cfg.audience.clone(),
        justification: cfg.reason.clone(),
        ..Default::default()
    };
    let resp = c.exchange_token(req).await?.into_inner();
    match resp.outcome {
        Some(pb::request_token_response::Outcome::Granted(g)) => Ok(g),
        Some(pb::request_token_response::Outcome::Pending(r)) => {
            tracing::warn!(request_id = %r.id, "waiting for approval");
            await_approval(&mut c, r.id, Some(&resp.claim_secret)).await
        }
        None => Err(RefreshError::Incomplete("empty response")),
    }
}

async fn obtain(opts: &ClientOpts, cfg: &AgentConfig) -> Result<pb::Grant, RefreshError> {
    if let Some(path) = &cfg.id_token {
        return sign_in(opts, cfg, path).await;
    }
    let mut c = BrokerClient::new(opts.connect().await?);
    let outcome = match &cfg.from_token {
        None => {
            let req = pb::RequestTokenRequest {
                scopes: cfg.scopes.clone(),
                ttl: cfg.ttl.map(convert::duration),
                audience: cfg.audience.clone(),
                justification: cfg.reason.clone(),
                ..Default::default()
            };
            c.request_token(req).await?.into_inner().outcome
        }
        Some(path) => {
            let parent = std::fs::read_to_string(path).map_err(|e| {
                RefreshError::ParentToken(format!("reading {}: {e}", path.display()))
            })?;
            let req = pb::ExchangeTokenRequest {
                subject_token: parent.trim().to_owned(),
                scopes: cfg.scopes.clone(),
                ttl: cfg.ttl.map(convert::duration),
                audience: cfg.audience.clone(),
                for_identity: cfg.for_identity.clone(),
                justification: cfg.reason.clone(),
                ..Default::default()
            };
            c.exchange_token(req).await?.into_inner().outcome
        }
    };
    match outcome {
        Some(pb::request_token_response::Outcome::Granted(g)) => Ok(g),
        Some(pb::request_token_response::Outcome::Pending(r)) => {
            tracing::warn!(request_id = %r.id, "waiting for approval");
            await_approval(&mut c, r.id, None).await
        }
        None => Err(RefreshError::Incomplete("empty response")),
    }
}

async fn await_approval(
    c: &mut BrokerClient<tonic::transport::Channel>,
    request_id: String,
    claim_secret: Option<&str>,
) -> Result<pb::Grant, RefreshError> {
    loop {
        let mut call = tonic::Request::new(pb::WatchRequestRequest {
            request_id: request_id.clone(),
        });
        if let Some(secret) = claim_secret {
            let value = secret
                .parse()
                .map_err(|_| RefreshError::Incomplete("the claim secret is not metadata"))?;
            call.metadata_mut().insert(pb::CLAIM_SECRET_METADATA, value);
        }
        let mut s = c.watch_request(call).await?.into_inner();
        loop {
            let m = match s.message().await {
                Ok(Some(m)) => m,
                // The connection ended under the watch (the federation
                // listener's connections live 5 minutes; a broker
                // restarted): watch the same request again.
                Ok(None) => break,
                Err(e)
                    if matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(g) = m.grant {
                return Ok(g);
            }
            if let Some(r) = m.request
                && matches!(
                    pb::RequestState::try_from(r.state),
                    Ok(pb::RequestState::Denied
                        | pb::RequestState::Expired
                        | pb::RequestState::Withdrawn
                        | pb::RequestState::Issued)
                )
            {
                return Err(RefreshError::NoToken(r.id));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn renew(
    opts: &ClientOpts,
    lease: &pb::Lease,
    ttl: Option<Duration>,
) -> Result<pb::Grant, RefreshError> {
    let mut c = BrokerClient::new(opts.connect().await?);
    let r = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: ttl.map(convert::duration),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied
            | tonic::Code::NotFound => RefreshError::LeaseEnded(s),
            _ => RefreshError::Rpc(s),
        })?
        .into_inner();
    r.grant.ok_or(RefreshError::Incomplete("empty renewal"))
}

/// What the agent keeps written: the token file, the env file, and the
/// login of the current lease (given once, when the lease was granted).
struct Files<'c> {
    cfg: &'c AgentConfig,
    login: Option<pb::DatabaseLogin>,
}

impl Files<'_> {
    /// Write the files for grant `g` (a renewal of the current lease, or a
    /// new one); one line per refresh on stdout, for people and tests.
    fn store(&mut self, g: &pb::Grant, lease: &pb::Lease, renewal: bool) -> bool {
        if let Some(l) = &g.login {
            self.login = Some(l.clone());
        } else if !renewal {
            self.login = None;
        }
        if g.login.is_some() && self.cfg.env_file.is_none() {
            tracing::error!(lease = %lease.id, "the lease holds a database login, whose password only --env-file keeps: it is not written anywhere");
        }
        let mut ok = true;
        if let Some(out) = &self.cfg.out {
            ok &= write(out, g.token.as_bytes());
        }
        if let Some(env) = &self.cfg.env_file {
            let text = crate::client::login::env_file(&lease.id, &g.token, self.login.as_ref());
            ok &= write(env, text.as_bytes());
        }
        if ok {
            println!(
                "token written: lease {} renewals {} expires in {}",
                lease.id,
                lease.renewals,
                convert::fmt_dur(convert::until(lease.expires_at.as_ref()))
            );
        }
        ok
    }
}

/// Write `bytes` to `path` (atomically, mode 0600), or say why not.
fn write(path: &std::path::Path, bytes: &[u8]) -> bool {
    match write_atomic(path, bytes, Access::Private) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot write the agent's file");
            false
        }
    }
}

/// Is there a file to keep, and can the agent write each one?
fn check_files(cfg: &AgentConfig) -> Result<(), String> {
    if cfg.out.is_none() && cfg.env_file.is_none() {
        return Err("nowhere to keep the token: give --out, --env-file, or both".into());
    }
    cfg.out
        .iter()
        .chain(&cfg.env_file)
        .try_for_each(|p| check_writable(p))
}

/// Can the agent write its token file? Checked before it takes a lease,
/// so a wrong path costs no lease (and no approver's time).
fn check_writable(out: &std::path::Path) -> Result<(), String> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "cannot write {}: {} is not a directory (create it, mode 0700, first)",
            out.display(),
            dir.display()
        ));
    }
    let probe = dir.join(format!(".portcullis-agent-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// How many times in a row the same parent token may be refused before
/// the agent gives up (whatever refreshes the parent file had 1 + 2 + 4 s
/// to replace it).
const PARENT_REFUSALS: u32 = 3;

/// Count one more refusal of the parent token in `path`: an error once the
/// same token was refused [`PARENT_REFUSALS`] times in a row.
fn give_up_on_parent(
    refused: &mut (Option<String>, u32),
    path: &std::path::Path,
    e: &RefreshError,
) -> Result<(), String> {
    let now = std::fs::read_to_string(path).ok();
    *refused = if refused.0 == now {
        (now, refused.1 + 1)
    } else {
        (now, 1)
    };
    if refused.1 >= PARENT_REFUSALS {
        return Err(format!(
            "the parent token in {} is no longer active ({e}), and nothing replaced it: stopping",
            path.display()
        ));
    }
    Ok(())
}

/// Say that a refresh failed, and whether a token is still in place; an
/// error when retrying cannot help: what the broker refuses as malformed
/// before the agent ever had a token is its configuration.
fn failed(
    e: &RefreshError,
    written: bool,
    retry_in: Duration,
    cfg: &AgentConfig,
) -> Result<(), String> {
    if written {
        tracing::warn!(error = %e, ?retry_in, "token refresh failed; keeping the last good token");
        return Ok(());
    }
    tracing::warn!(error = %e, ?retry_in, "no token yet: refresh failed, trying again");
    if config_refused(e) && cfg.from_token.is_none() {
        return Err(format!("the broker refused the agent's request: {e}"));
    }
    Ok(())
}

/// The request itself is malformed (a missing `--reason`, a bad TTL).
fn config_refused(e: &RefreshError) -> bool {
    matches!(e, RefreshError::Rpc(s) if s.code() == tonic::Code::InvalidArgument)
}

/// A refusal of the parent token itself (revoked, expired, not ours).
fn parent_refused(e: &RefreshError) -> bool {
    matches!(e, RefreshError::Rpc(s)
        if s.code() == tonic::Code::InvalidArgument && s.message().contains("`subject_token`"))
}

/// Run until `stop` resolves; an error when it cannot go on (its token
/// file cannot be written, its parent token is gone and nothing replaced
/// it).
pub async fn run(
    opts: ClientOpts,
    cfg: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    check_files(&cfg)?;
    let mut files = Files {
        cfg: &cfg,
        login: None,
    };
    tokio::pin!(stop);
    let mut current: Option<pb::Lease> = None;
    let mut backoff = Duration::from_secs(1);
    let mut written = false;
    let mut refused_parent: (Option<String>, u32) = (None, 0);
    loop {
        // A lease from a platform token is not renewed: the file's current
        // token signs in again.
        let renewal = cfg.id_token.is_none()
            && matches!(&current, Some(l) if l.expires_at != l.max_expires_at);
        let attempt = match &current {
            // Renew while the lease can still grow; else start a new one.
            Some(l) if renewal => renew(&opts, l, cfg.ttl).await,
            _ => obtain(&opts, &cfg).await,
        };
        let wait = match attempt {
            Ok(g) => {
                let lease = g.lease.clone().unwrap_or_default();
                if files.store(&g, &lease, renewal) {
                    backoff = Duration::from_secs(1);
                    written = true;
                }
                refused_parent = (None, 0);
                let w = renew_after(&lease);
                current = Some(lease);
                w
            }
            Err(e) => {
                let expired = current
                    .as_ref()
                    .is_some_and(|l| convert::until(l.expires_at.as_ref()).is_zero());
                if expired || matches!(e, RefreshError::LeaseEnded(_)) {
                    current = None;
                }
                if let (true, Some(path)) = (parent_refused(&e), &cfg.from_token) {
                    give_up_on_parent(&mut refused_parent, path, &e)?;
                }
                failed(&e, written, backoff, &cfg)?;
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                w
            }
        };
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

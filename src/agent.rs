//! `portcullis agent`: keeps a fresh token in a file for a workload that
//! only reads files (like Vault Agent, the SPIRE agent or tbot). It renews
//! at about two thirds of the token's life, asks for a new lease when the
//! old one cannot be renewed (max_ttl, revoked, expired), waits for
//! approval when the scope needs it, backs off on errors, and keeps the last
//! good token in place until it expires.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::{ClientError, ClientOpts};
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
    /// Token file.
    pub out: PathBuf,
    /// Why (recorded, shown to approvers).
    pub reason: String,
}

fn secs_until(t: &Option<prost_types::Timestamp>) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Duration::from_secs(t.as_ref().map_or(0, |t| (t.seconds - now).max(0) as u64))
}

/// When to renew: two thirds into the remaining life, at least 1 s.
fn renew_after(lease: &pb::Lease) -> Duration {
    let left = secs_until(&lease.expires_at);
    (left * 2 / 3).max(Duration::from_secs(1))
}

async fn obtain(opts: &ClientOpts, cfg: &AgentConfig) -> Result<pb::Grant, String> {
    let mut c = BrokerClient::new(
        opts.connect()
            .await
            .map_err(|e: ClientError| e.to_string())?,
    );
    let req = pb::RequestTokenRequest {
        scopes: cfg.scopes.clone(),
        ttl: cfg
            .ttl
            .map(|d| crate::api::convert::dur(crate::clock::millis(d))),
        audience: cfg.audience.clone(),
        justification: cfg.reason.clone(),
        ..Default::default()
    };
    match c
        .request_token(req)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner()
        .outcome
    {
        Some(pb::request_token_response::Outcome::Granted(g)) => Ok(g),
        Some(pb::request_token_response::Outcome::Pending(r)) => {
            tracing::warn!(request_id = %r.id, "waiting for approval");
            let mut s = c
                .watch_request(pb::WatchRequestRequest {
                    request_id: r.id.clone(),
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
            while let Some(m) = s.message().await.map_err(|s| s.message().to_owned())? {
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
                    return Err(format!(
                        "request {} ended without a token for this agent",
                        r.id
                    ));
                }
            }
            Err("watch ended".into())
        }
        None => Err("empty response".into()),
    }
}

async fn renew(
    opts: &ClientOpts,
    lease: &pb::Lease,
    ttl: Option<Duration>,
) -> Result<pb::Grant, tonic::Status> {
    let mut c = BrokerClient::new(
        opts.connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?,
    );
    let r = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.id.clone(),
            ttl: ttl.map(|d| crate::api::convert::dur(crate::clock::millis(d))),
        })
        .await?
        .into_inner();
    r.grant
        .ok_or_else(|| tonic::Status::internal("empty renewal"))
}

/// Run until `stop` resolves.
pub async fn run(opts: ClientOpts, cfg: AgentConfig, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut current: Option<pb::Lease> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let attempt = match &current {
            // Renew while the lease can still grow; else start a new one.
            Some(l) if l.expires_at != l.max_expires_at => {
                renew(&opts, l, cfg.ttl).await.map_err(|s| {
                    if matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition
                            | tonic::Code::PermissionDenied
                            | tonic::Code::NotFound
                    ) {
                        "lease cannot be renewed; asking for a new one".to_owned()
                    } else {
                        s.message().to_owned()
                    }
                })
            }
            _ => obtain(&opts, &cfg).await,
        };
        let wait = match attempt {
            Ok(g) => {
                let lease = g.lease.unwrap_or_default();
                match write_atomic(&cfg.out, g.token.as_bytes(), Access::Private) {
                    Ok(()) => {
                        // One line per refresh, for people and tests.
                        println!(
                            "token written: lease {} renewals {} expires in {}s",
                            lease.id,
                            lease.renewals,
                            secs_until(&lease.expires_at).as_secs()
                        );
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        tracing::error!(path = %cfg.out.display(), error = %e, "cannot write the token file")
                    }
                }
                let w = renew_after(&lease);
                current = Some(lease);
                w
            }
            Err(e) => {
                if current
                    .as_ref()
                    .is_some_and(|l| secs_until(&l.expires_at).is_zero())
                    || e.contains("new one")
                {
                    current = None;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "token refresh failed; keeping the last good token");
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                w
            }
        };
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

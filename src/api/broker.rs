//! The `Broker` service.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{caller, convert, holder, status};
use crate::engine::requests::Watch;
use crate::engine::{Engine, EngineError, ExchangeAsk, Outcome, TokenAsk};
use crate::pb;
use crate::pb::broker_server::Broker;
use crate::text::FieldError;

/// `Broker` over an [`Engine`].
pub struct BrokerService {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

impl BrokerService {
    /// A service; open watch streams end when `shutdown` fires.
    pub fn new(engine: Arc<Engine>, shutdown: CancellationToken) -> Self {
        Self { engine, shutdown }
    }
}

pub(super) type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchRequestResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn request_token(
        &self,
        req: Request<pb::RequestTokenRequest>,
    ) -> Result<Response<pb::RequestTokenResponse>, Status> {
        let started = std::time::Instant::now();
        let holder = holder(&req)?;
        let who = holder.who.clone();
        let m = req.into_inner();
        let ask = TokenAsk {
            x5t: holder.x5t,
            ttl: convert::ttl(m.ttl, "ttl")?,
            scopes: m.scopes,
            audience: m.audience,
            justification: m.justification,
            client_request_id: m.client_request_id,
            break_glass: m.break_glass,
            ..TokenAsk::default()
        };
        let outcome = match self.engine.request_token(&who, ask).await {
            Ok(o) => o,
            Err(e) => {
                match &e {
                    EngineError::Invalid { .. } => self.engine.metrics().request("invalid"),
                    EngineError::Refused(_) => {}
                    _ => self.engine.metrics().request("error"),
                }
                tracing::info!(sub = %who, error = %e, "token request not granted");
                return Err(e.into());
            }
        };
        if matches!(outcome, Outcome::Granted { .. }) {
            self.engine
                .metrics()
                .issuance
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(Response::new(convert::outcome(outcome)))
    }

    async fn exchange_token(
        &self,
        req: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::RequestTokenResponse>, Status> {
        let holder = holder(&req)?;
        let m = req.into_inner();
        if !matches!(
            m.subject_token_type.as_str(),
            "" | "urn:ietf:params:oauth:token-type:access_token"
        ) {
            return Err(FieldError::new(
                "subject_token_type",
                "here a portcullis token is exchanged (empty, or `urn:ietf:params:oauth:token-type:access_token`); a platform token goes to the federation listener",
            )
            .into());
        }
        let ask = ExchangeAsk {
            ttl: convert::ttl(m.ttl, "ttl")?,
            subject_token: m.subject_token,
            scopes: m.scopes,
            audience: m.audience,
            for_identity: m.for_identity,
            justification: m.justification,
            client_request_id: m.client_request_id,
        };
        match self.engine.exchange(&holder, ask).await {
            Ok(outcome) => Ok(Response::new(convert::outcome(outcome))),
            Err(e) => {
                match &e {
                    EngineError::Invalid { .. } => self.engine.metrics().exchange("invalid"),
                    EngineError::Refused(_) => {}
                    _ => self.engine.metrics().exchange("error"),
                }
                tracing::info!(sub = %holder.who, error = %e, "token exchange refused");
                Err(e.into())
            }
        }
    }

    async fn get_request(
        &self,
        req: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::GetRequestResponse>, Status> {
        let holder = holder(&req)?;
        get_request_as(&self.engine, &holder, &req.get_ref().request_id).await
    }

    type WatchRequestStream = WatchStream;

    async fn watch_request(
        &self,
        req: Request<pb::WatchRequestRequest>,
    ) -> Result<Response<Self::WatchRequestStream>, Status> {
        let holder = holder(&req)?;
        watch_as(
            &self.engine,
            &holder,
            &req.get_ref().request_id,
            &self.shutdown,
        )
        .await
    }

    async fn withdraw_request(
        &self,
        req: Request<pb::WithdrawRequestRequest>,
    ) -> Result<Response<pb::WithdrawRequestResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let r = self
            .engine
            .withdraw_request(&who, &m.request_id, &m.reason)
            .await?;
        Ok(Response::new(pb::WithdrawRequestResponse {
            request: Some(convert::request(&r)),
        }))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let ttl = convert::ttl(m.ttl, "ttl")?;
        let (token, lease) = self.engine.renew(&who, &m.lease_id, ttl).await?;
        Ok(Response::new(pb::RenewLeaseResponse {
            grant: Some(convert::grant(token, &lease)),
        }))
    }

    async fn revoke_lease(
        &self,
        req: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let (lease, descendants_revoked) = self
            .engine
            .revoke_counted(&who, &m.lease_id, &m.reason)
            .await?;
        Ok(Response::new(pb::RevokeLeaseResponse {
            lease: Some(convert::lease(&lease)),
            descendants_revoked,
        }))
    }

    async fn revoke_leases(
        &self,
        req: Request<pb::RevokeLeasesRequest>,
    ) -> Result<Response<pb::RevokeLeasesResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let (revoked, descendants_revoked) =
            self.engine.revoke_all(&who, &m.subject, &m.reason).await?;
        Ok(Response::new(pb::RevokeLeasesResponse {
            revoked,
            descendants_revoked,
        }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let state = convert::lease_state_filter(m.state)?;
        let (leases, next) = if m.parent_id.is_empty() {
            self.engine
                .list_leases(&who, &m.subject, state, m.page_size as usize, &m.page_token)
                .await?
        } else if !m.subject.is_empty() {
            return Err(FieldError::new("subject", "must be empty when parent_id is set").into());
        } else {
            self.engine
                .list_children(&who, &m.parent_id, m.page_size as usize, &m.page_token)
                .await?
        };
        Ok(Response::new(pb::ListLeasesResponse {
            leases: leases.iter().map(convert::lease).collect(),
            next_page_token: next,
        }))
    }

    async fn get_lease(
        &self,
        req: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::GetLeaseResponse>, Status> {
        let who = caller(&req)?;
        let lease = self.engine.get_lease(&who, &req.get_ref().lease_id).await?;
        Ok(Response::new(pb::GetLeaseResponse {
            lease: Some(convert::lease(&lease)),
        }))
    }

    async fn list_my_requests(
        &self,
        req: Request<pb::ListMyRequestsRequest>,
    ) -> Result<Response<pb::ListMyRequestsResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let (reqs, next) = self
            .engine
            .list_my_requests(&who, m.page_size as usize, &m.page_token)
            .await?;
        Ok(Response::new(pb::ListMyRequestsResponse {
            requests: reqs.iter().map(convert::request).collect(),
            next_page_token: next,
        }))
    }

    async fn introspect(
        &self,
        req: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let _who = caller(&req)?;
        let m = req.get_ref();
        let claims = self.engine.introspect(&m.token).await?;
        let presented = (!m.cnf_x5t_s256.is_empty()).then_some(m.cnf_x5t_s256.as_str());
        let answer = match claims.filter(|c| bound_as_presented(c, presented)) {
            None => pb::IntrospectResponse::default(),
            Some(c) => pb::IntrospectResponse {
                cnf_checked: presented.is_some() && c.cnf.is_some(),
                cnf_x5t_s256: c.cnf.map(|x| x.x5t_s256).unwrap_or_default(),
                actors: c.act.map(|a| a.flatten()).unwrap_or_default(),
                active: true,
                scope: c.scope,
                client_id: c.client_id,
                sub: c.sub,
                exp: i64::try_from(c.exp).unwrap_or(i64::MAX),
                iat: i64::try_from(c.iat).unwrap_or(i64::MAX),
                nbf: i64::try_from(c.nbf).unwrap_or(i64::MAX),
                aud: vec![c.aud],
                iss: c.iss,
                jti: c.jti,
                token_type: "Bearer".into(),
            },
        };
        Ok(Response::new(answer))
    }
}

/// Request `id` as `holder` sees it, claimed on the way when approved.
pub(super) async fn get_request_as(
    engine: &Engine,
    holder: &crate::engine::Holder,
    id: &str,
) -> Result<Response<pb::GetRequestResponse>, Status> {
    let (r, grant) = engine.read_and_claim(holder, id).await?;
    Ok(Response::new(pb::GetRequestResponse {
        request: Some(convert::request(&r)),
        grant: grant.as_ref().map(convert::delivered),
    }))
}

/// Follow request `id` as `holder` until it is final.
pub(super) async fn watch_as(
    engine: &Arc<Engine>,
    holder: &crate::engine::Holder,
    id: &str,
    shutdown: &CancellationToken,
) -> Result<Response<WatchStream>, Status> {
    // Unknown or invisible ids fail here, before a stream exists.
    let watch = engine.watch(holder, id).await?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(follow(watch, tx, shutdown.clone()));
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// RFC 8705 §3: a bound token is active only with the certificate it is
/// bound to, when the relying party says which one it was presented with.
/// (A thumbprint is public: no constant-time comparison is needed.)
fn bound_as_presented(c: &crate::token::Claims, presented: Option<&str>) -> bool {
    match (&c.cnf, presented) {
        (Some(bound), Some(p)) => bound.x5t_s256 == p,
        _ => true,
    }
}

/// Send each change of a watched request until it is final, the client
/// goes away or the broker stops. A token that cannot be handed over is
/// revoked, so no copy can ever be used.
async fn follow(
    mut watch: Watch,
    tx: mpsc::Sender<Result<pb::WatchRequestResponse, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        // Awaited to completion: a claim may be under way.
        match watch.read().await {
            Ok(Some(update)) => {
                let msg = pb::WatchRequestResponse {
                    request: Some(convert::request(&update.request)),
                    grant: update.grant.as_ref().map(convert::delivered),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    if let Some((_, lease, _)) = &update.grant {
                        watch.undelivered(lease).await;
                    }
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
        if watch.finished() {
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = tx.send(Err(status::shutting_down("watch"))).await;
                return;
            }
            () = tx.closed() => return,
            more = watch.changed() => if !more { return },
        }
    }
}

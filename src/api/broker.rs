//! The `Broker` service.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{caller, convert};
use crate::grant::{Engine, GrantError, Outcome, TokenAsk};
use crate::pb;
use crate::pb::broker_server::Broker;

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

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRequestResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn request_token(
        &self,
        req: Request<pb::RequestTokenRequest>,
    ) -> Result<Response<pb::RequestTokenResponse>, Status> {
        let started = std::time::Instant::now();
        let who = caller(&self.engine, &req)?;
        let m = req.into_inner();
        let ask = TokenAsk {
            ttl: convert::ttl(m.ttl, "ttl")?,
            scopes: m.scopes,
            audience: m.audience,
            justification: m.justification,
            client_request_id: m.client_request_id,
            break_glass: m.break_glass,
        };
        let outcome = match self.engine.request_token(&who, ask).await {
            Ok(o) => o,
            Err(e) => {
                match &e {
                    GrantError::Invalid { .. } => self.engine.metrics().request("invalid"),
                    GrantError::Refused(_) => {}
                    _ => self.engine.metrics().request("error"),
                }
                tracing::info!(sub = %who, error = %e, "token request not granted");
                return Err(e.into());
            }
        };
        let outcome = match outcome {
            Outcome::Granted { token, lease } => {
                self.engine
                    .metrics()
                    .issuance
                    .observe(started.elapsed().as_secs_f64());
                pb::request_token_response::Outcome::Granted(pb::Grant {
                    token,
                    lease: Some(convert::lease(&lease)),
                })
            }
            Outcome::Parked(r) => {
                pb::request_token_response::Outcome::Pending(convert::request(&r))
            }
        };
        Ok(Response::new(pb::RequestTokenResponse {
            outcome: Some(outcome),
        }))
    }

    async fn get_request(
        &self,
        req: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::GetRequestResponse>, Status> {
        let who = caller(&self.engine, &req)?;
        let (r, grant) = self
            .engine
            .read_and_claim(&who, &req.get_ref().request_id)
            .await?;
        Ok(Response::new(pb::GetRequestResponse {
            request: Some(convert::request(&r)),
            grant: grant.map(|(token, lease)| convert::grant(token, &lease)),
        }))
    }

    type WatchRequestStream = WatchStream;

    async fn watch_request(
        &self,
        req: Request<pb::WatchRequestRequest>,
    ) -> Result<Response<Self::WatchRequestStream>, Status> {
        let who = caller(&self.engine, &req)?;
        let id = req.into_inner().request_id;
        // Subscribe before the first read so no change can slip between.
        let mut events = self.engine.request_events();
        // Unknown or invisible ids fail here, before a stream exists.
        self.engine.get_request(&who, &id)?;
        let (tx, rx) = mpsc::channel(8);
        let engine = self.engine.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut last: Option<crate::store::TokenRequest> = None;
            loop {
                // The requester claims an approved request on the way; the
                // claim is a compare-and-swap, so among any number of
                // watchers and GetRequest callers exactly one gets the token.
                let (current, grant) = match engine.read_and_claim(&who, &id).await {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if last.as_ref() != Some(&current) || grant.is_some() {
                    let msg = pb::WatchRequestResponse {
                        request: Some(convert::request(&current)),
                        grant: grant.as_ref().map(|(t, l)| convert::grant(t.clone(), l)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        if let Some((_, lease)) = &grant {
                            engine.revoke_undelivered(lease).await;
                        }
                        return;
                    }
                    last = Some(current.clone());
                }
                if current.state.is_terminal() {
                    return;
                }
                // Wait for a change to this request (others' events are
                // skipped without a read).
                loop {
                    let ours = tokio::select! {
                        () = shutdown.cancelled() => {
                            let _ = tx.send(Err(Status::unavailable("broker is shutting down; watch again to resume"))).await;
                            return;
                        }
                        () = tx.closed() => return,
                        ev = events.recv() => match ev {
                            Ok(changed) => changed == id,
                            // Missed events: re-read to be safe.
                            Err(broadcast::error::RecvError::Lagged(_)) => true,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    };
                    if ours {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn withdraw_request(
        &self,
        req: Request<pb::WithdrawRequestRequest>,
    ) -> Result<Response<pb::WithdrawRequestResponse>, Status> {
        let who = caller(&self.engine, &req)?;
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
        let who = caller(&self.engine, &req)?;
        let m = req.into_inner();
        let ttl = convert::ttl(m.ttl, "ttl")?;
        let (token, lease) = self.engine.renew(&who, &m.lease_id, ttl).await?;
        Ok(Response::new(pb::RenewLeaseResponse {
            grant: Some(pb::Grant {
                token,
                lease: Some(convert::lease(&lease)),
            }),
        }))
    }

    async fn revoke_lease(
        &self,
        req: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let who = caller(&self.engine, &req)?;
        let m = req.into_inner();
        let lease = self.engine.revoke(&who, &m.lease_id, &m.reason).await?;
        Ok(Response::new(pb::RevokeLeaseResponse {
            lease: Some(convert::lease(&lease)),
        }))
    }

    async fn revoke_leases(
        &self,
        req: Request<pb::RevokeLeasesRequest>,
    ) -> Result<Response<pb::RevokeLeasesResponse>, Status> {
        let who = caller(&self.engine, &req)?;
        let m = req.into_inner();
        let revoked = self.engine.revoke_all(&who, &m.subject, &m.reason).await?;
        Ok(Response::new(pb::RevokeLeasesResponse { revoked }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let who = caller(&self.engine, &req)?;
        let m = req.into_inner();
        let state = convert::lease_state_filter(m.state)?;
        let (leases, next) = self.engine.list_leases(
            &who,
            &m.subject,
            state,
            m.page_size as usize,
            &m.page_token,
        )?;
        Ok(Response::new(pb::ListLeasesResponse {
            leases: leases.iter().map(convert::lease).collect(),
            next_page_token: next,
        }))
    }

    async fn get_lease(
        &self,
        req: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::GetLeaseResponse>, Status> {
        let who = caller(&self.engine, &req)?;
        let lease = self.engine.get_lease(&who, &req.get_ref().lease_id)?;
        Ok(Response::new(pb::GetLeaseResponse {
            lease: Some(convert::lease(&lease)),
        }))
    }

    async fn introspect(
        &self,
        req: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let _who = caller(&self.engine, &req)?;
        let answer = match self.engine.introspect(&req.get_ref().token)? {
            None => pb::IntrospectResponse::default(),
            Some(c) => pb::IntrospectResponse {
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

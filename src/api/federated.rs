//! The `Broker` service on the federation listener (issue 24,
//! docs/design-federation.md): server-authenticated TLS, no client
//! certificate. It serves three calls: `ExchangeToken` with a platform
//! token (the token names the caller), and `WatchRequest` / `GetRequest`
//! for a parked request whose claim secret the caller presents. Every
//! other call needs a certificate, on the mTLS listener.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::broker::{WatchStream, get_request_as, watch_as};
use super::convert;
use crate::engine::{Engine, EngineError, Holder, TokenAsk};
use crate::federation::Federation;
use crate::pb;
use crate::pb::broker_server::Broker;
use crate::text::FieldError;

use crate::pb::{CLAIM_SECRET_METADATA as CLAIM_SECRET, JWT_TOKEN_TYPE};

/// `Broker` for callers without a certificate.
pub struct FederatedBroker {
    engine: Arc<Engine>,
    federation: Arc<Federation>,
    shutdown: CancellationToken,
    /// Exchanges in flight: what a flood of tokens (each waiting for a
    /// key fetch, say) can hold, beyond which callers are told to retry.
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Exchanges verified at once on the federation listener.
const IN_FLIGHT: usize = 256;

impl FederatedBroker {
    /// A service verifying platform tokens against `federation`.
    pub fn new(
        engine: Arc<Engine>,
        federation: Arc<Federation>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            engine,
            federation,
            shutdown,
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        }
    }

    /// The requester of the request a call names, proven by its claim
    /// secret.
    async fn claimant<T>(&self, req: &Request<T>, id: &str) -> Result<Holder, Status> {
        let secret = req
            .metadata()
            .get(CLAIM_SECRET)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .ok_or_else(needs_certificate)?;
        Ok(self.engine.holder_by_claim_secret(id, secret).await?)
    }
}

/// What every call but the three is answered with.
fn needs_certificate() -> Status {
    Status::unauthenticated(
        "this listener serves ExchangeToken with a platform token, and WatchRequest or GetRequest with a claim secret; other calls need a client certificate",
    )
}

/// A platform token exchange's own fields, checked before its token is.
fn check_exchange(m: &pb::ExchangeTokenRequest) -> Result<(), FieldError> {
    if m.subject_token_type != JWT_TOKEN_TYPE {
        return Err(FieldError::new(
            "subject_token_type",
            format!(
                "must be `{JWT_TOKEN_TYPE}` here (a platform token); a portcullis token is exchanged over mTLS"
            ),
        ));
    }
    if !m.for_identity.is_empty() {
        return Err(FieldError::new(
            "for_identity",
            "must be empty: the platform token names who asks",
        ));
    }
    if m.scopes.is_empty() {
        return Err(FieldError::new(
            "scopes",
            "name the scopes wanted (there is no parent token to take them from)",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl Broker for FederatedBroker {
    async fn exchange_token(
        &self,
        req: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::RequestTokenResponse>, Status> {
        let m = req.into_inner();
        check_exchange(&m)?;
        let Ok(_slot) = self.in_flight.try_acquire() else {
            return Err(Status::resource_exhausted(
                "too many platform-token exchanges in flight; retry shortly",
            ));
        };
        let ttl = convert::ttl(m.ttl, "ttl")?;
        let now = self.engine.clock().now() / 1000;
        let policy = self.engine.policy();
        let verified = match self.federation.verify(&policy, &m.subject_token, now).await {
            Ok(v) => v,
            Err(refusal) => return Err(self.engine.sign_in_refused(refusal).into()),
        };
        let who = verified.identity.clone();
        let ask = TokenAsk {
            ttl,
            scopes: m.scopes,
            audience: m.audience,
            justification: m.justification,
            client_request_id: m.client_request_id,
            ..TokenAsk::default()
        };
        match self.engine.request_federated(verified, ask).await {
            Ok((outcome, claim_secret)) => {
                let mut resp = convert::outcome(outcome);
                resp.claim_secret = claim_secret.unwrap_or_default();
                Ok(Response::new(resp))
            }
            Err(e) => {
                match &e {
                    EngineError::Invalid { .. } => self.engine.metrics().request("invalid"),
                    EngineError::Refused(_) | EngineError::SignIn(_) => {}
                    _ => self.engine.metrics().request("error"),
                }
                tracing::info!(sub = %who, error = %e, "platform token exchange not granted");
                Err(e.into())
            }
        }
    }

    async fn get_request(
        &self,
        req: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::GetRequestResponse>, Status> {
        let id = req.get_ref().request_id.clone();
        let holder = self.claimant(&req, &id).await?;
        get_request_as(&self.engine, &holder, &id).await
    }

    type WatchRequestStream = WatchStream;

    async fn watch_request(
        &self,
        req: Request<pb::WatchRequestRequest>,
    ) -> Result<Response<Self::WatchRequestStream>, Status> {
        let id = req.get_ref().request_id.clone();
        let holder = self.claimant(&req, &id).await?;
        watch_as(&self.engine, &holder, &id, &self.shutdown).await
    }

    async fn request_token(
        &self,
        _: Request<pb::RequestTokenRequest>,
    ) -> Result<Response<pb::RequestTokenResponse>, Status> {
        Err(needs_certificate())
    }

    async fn withdraw_request(
        &self,
        _: Request<pb::WithdrawRequestRequest>,
    ) -> Result<Response<pb::WithdrawRequestResponse>, Status> {
        Err(needs_certificate())
    }

    async fn renew_lease(
        &self,
        _: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        Err(needs_certificate())
    }

    async fn revoke_lease(
        &self,
        _: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        Err(needs_certificate())
    }

    async fn revoke_leases(
        &self,
        _: Request<pb::RevokeLeasesRequest>,
    ) -> Result<Response<pb::RevokeLeasesResponse>, Status> {
        Err(needs_certificate())
    }

    async fn list_leases(
        &self,
        _: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        Err(needs_certificate())
    }

    async fn get_lease(
        &self,
        _: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::GetLeaseResponse>, Status> {
        Err(needs_certificate())
    }

    async fn list_my_requests(
        &self,
        _: Request<pb::ListMyRequestsRequest>,
    ) -> Result<Response<pb::ListMyRequestsResponse>, Status> {
        Err(needs_certificate())
    }

    async fn introspect(
        &self,
        _: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        Err(needs_certificate())
    }
}

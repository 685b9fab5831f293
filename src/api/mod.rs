//! `api` translates gRPC to the domain and back. [`Authenticate`] names the
//! caller of every RPC once (identity from the client certificate);
//! handlers convert messages ([`convert`]) and delegate to the engine;
//! [`status`] is the one place a `Status` is made.

pub mod approvals;
pub mod audit;
pub mod broker;
pub mod convert;
pub mod federated;
pub mod keys;
pub mod status;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Request, Status};

use std::sync::Arc;

use crate::audit::{Action, CALL, CallCtx, Entry, Outcome};
use crate::engine::Engine;
use crate::identity::{self, Identity};

/// The authenticated caller and the thumbprint of its certificate, put in
/// each request's extensions by [`Authenticate`].
#[derive(Clone, Debug)]
struct Caller(Identity, String);

/// Interceptor on every portcullis service: the caller's identity from the
/// verified client certificate, once per RPC. Failures are generic on the
/// wire, detailed in the log, and recorded in the trail.
#[derive(Clone)]
pub struct Authenticate {
    engine: Arc<Engine>,
    seen: Arc<identity::SeenCerts>,
}

impl Authenticate {
    /// Authenticate against `engine`'s trail.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            seen: Arc::default(),
        }
    }
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let certs = req.peer_certs();
        let chain: &[tonic::transport::CertificateDer<'static>] =
            certs.as_deref().map_or(&[], |c| c.as_slice());
        match self.seen.identify(chain).and_then(|(who, x5t)| {
            // A trust domain an `[[issuer]]` owns names workloads that
            // sign in with platform tokens: no certificate may take one of
            // their identities (or claim their parked requests).
            match self.engine.policy().issuer_owning(&who) {
                Some(issuer) => Err(identity::IdentityError::Owned(issuer)),
                None => Ok((who, x5t)),
            }
        }) {
            Ok((who, x5t)) => {
                tracing::Span::current().record("caller", who.as_str());
                req.extensions_mut().insert(Caller(who, x5t));
                Ok(req)
            }
            Err(e) => {
                tracing::warn!(peer = ?req.remote_addr(), error = %e, "unauthenticated call");
                let entry = Entry::ok("-", Action::AuthFailed, "", &[], &e.to_string())
                    .outcome(Outcome::Refused);
                if let Err(err) = self.engine.note(vec![entry]) {
                    tracing::error!(error = %err, "could not record an authentication failure");
                }
                Err(status::unauthenticated())
            }
        }
    }
}

/// The caller [`Authenticate`] named for `req`.
pub fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    req.extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .ok_or_else(status::unauthenticated)
}

/// The caller, and the RFC 8705 thumbprint (`x5t#S256`) of the client
/// certificate it authenticated with: what a bound token is bound to.
pub fn holder<T>(req: &Request<T>) -> Result<crate::engine::Holder, Status> {
    req.extensions()
        .get::<Caller>()
        .map(|c| crate::engine::Holder {
            who: c.0.clone(),
            x5t: Some(c.1.clone()),
        })
        .ok_or_else(status::unauthenticated)
}

/// Tower layer that runs every RPC inside a [`CallCtx`] (peer address and a
/// correlation id, from `x-request-id` when the client sends one), so audit
/// records carry them without threading them through every signature.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallLayer;

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallService { inner }
    }
}

/// See [`CallLayer`].
#[derive(Clone, Debug)]
pub struct CallService<S> {
    inner: S,
}

fn call_id(req: &http::Request<impl Sized>) -> String {
    if let Some(v) = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 128
        && v.bytes().all(|b| b.is_ascii_graphic())
    {
        return v.to_owned();
    }
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl<S, B, RB> tower::Service<http::Request<B>> for CallService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let ctx = CallCtx {
            peer,
            call_id: call_id(&req),
        };
        let call_id = ctx.call_id.clone();
        let fut = self.inner.call(req);
        Box::pin(CALL.scope(ctx, async move {
            tracing::Span::current().record("call_id", call_id.as_str());
            let res = fut.await;
            // Polled inside the per-RPC span (the server's `trace_fn`).
            let span = tracing::Span::current();
            if let Ok(r) = &res {
                // Errors travel as trailers-only responses, so the status is
                // in the headers; a success (or an opened stream) has none.
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0");
                span.record("grpc_status", code);
                tracing::debug!(grpc_status = code, "rpc finished");
            }
            res
        }))
    }
}

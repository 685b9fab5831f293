//! `api` translates gRPC to the domain and back. It authenticates the caller
//! (identity from the channel), converts messages, and maps every domain
//! error to a status in one table ([`status`]).

pub mod approvals;
pub mod audit;
pub mod broker;
pub mod convert;
pub mod keys;
pub mod status;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Request, Status};

use crate::audit::{CALL, CallCtx, Entry};
use crate::grant::Engine;
use crate::identity::{self, Identity};

/// The caller's identity, from the verified client certificate. Failures are
/// generic on the wire, detailed in the log, and recorded in the trail.
pub fn caller<T>(engine: &Engine, req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs();
    let chain: &[tonic::transport::CertificateDer<'static>] =
        certs.as_deref().map_or(&[], |c| c.as_slice());
    match identity::from_peer_certs(chain) {
        Ok(who) => {
            tracing::Span::current().record("caller", who.as_str());
            Ok(who)
        }
        Err(e) => {
            tracing::warn!(peer = ?req.remote_addr(), error = %e, "unauthenticated call");
            let entry = Entry::ok("-", "auth.failed", "", &[], &e.to_string()).outcome("refused");
            if let Err(err) = engine.record(vec![entry]) {
                tracing::error!(error = %err, "could not record an authentication failure");
            }
            Err(Status::unauthenticated(
                "a client certificate with one spiffe:// URI SAN is required",
            ))
        }
    }
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

//! The mTLS gRPC listener: every service, reflection and health, behind the
//! per-call layer that names the caller and the call in the trail.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, Router, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};

use super::{ConnLimits, ServeConfig, ServeError, read};
use crate::api::Authenticate;
use crate::api::approvals::ApprovalsService;
use crate::api::audit::AuditService;
use crate::api::broker::BrokerService;
use crate::api::keys::KeysService;
use crate::engine::Engine;
use crate::pb::approvals_server::ApprovalsServer;
use crate::pb::audit_server::AuditServer;
use crate::pb::broker_server::BrokerServer;
use crate::pb::keys_server::KeysServer;

/// Largest gRPC message accepted (a request with 64 max-size scopes and a
/// 4 KiB justification is far below this).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// How long a client's TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive pings, and how long to wait for their answer before
/// the connection is dropped.
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The router with its per-call layer.
pub(super) type GrpcRouter =
    Router<tower::layer::util::Stack<crate::api::CallLayer, tower::layer::util::Identity>>;

/// mTLS: the server certificate, and client certificates required to chain
/// to the configured CA.
pub(super) fn tls(cfg: &ServeConfig) -> Result<ServerTlsConfig, ServeError> {
    Ok(ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            read(&cfg.tls_cert)?,
            read(&cfg.tls_key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&cfg.client_ca)?))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

fn tls_error(path: &Path, e: &dyn std::fmt::Display) -> ServeError {
    ServeError::Tls {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Every service on one router.
pub(super) fn router(
    cfg: &ServeConfig,
    tls: ServerTlsConfig,
    engine: &Arc<Engine>,
    console: Option<Arc<crate::console::Console>>,
    rotate_wake: Arc<Notify>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    cancel: &CancellationToken,
) -> Result<GrpcRouter, ServeError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| tls_error(Path::new("reflection"), &e))?;
    let broker = BrokerService::new(engine.clone(), cancel.clone());
    let approvals = ApprovalsService::new(engine.clone(), console);
    let audit = AuditService::new(engine.clone(), cancel.clone());
    let keys = KeysService::new(engine.clone(), cfg.rotation, rotate_wake);
    let auth = Authenticate::new(engine.clone());
    let server = Server::builder()
        .tls_config(tls)
        .map_err(|e| tls_error(&cfg.tls_cert, &e))?;
    Ok(with_calls(server, "mtls")
        .max_concurrent_streams(cfg.conn_limits.streams_per_connection)
        .add_service(InterceptedService::new(
            BrokerServer::new(broker).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            ApprovalsServer::new(approvals).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            AuditServer::new(audit).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            KeysServer::new(keys).max_decoding_message_size(MAX_MESSAGE),
            auth,
        ))
        .add_service(health)
        .add_service(reflection))
}

/// What every gRPC listener shares: no Nagle delay, the per-call span
/// (`listener` names which) and layer, HTTP/2 keep-alive.
fn with_calls(
    server: Server,
    listener: &'static str,
) -> Server<tower::layer::util::Stack<crate::api::CallLayer, tower::layer::util::Identity>> {
    server
        .tcp_nodelay(true)
        .trace_fn(move |req| {
            tracing::info_span!(
                "rpc",
                listener,
                method = %req.uri().path(),
                caller = tracing::field::Empty,
                call_id = tracing::field::Empty,
                grpc_status = tracing::field::Empty
            )
        })
        .layer(crate::api::CallLayer)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// The federation listener's TLS: the server certificate only; no client
/// certificate is asked for (issue 24).
pub(super) fn federation_tls(cfg: &ServeConfig) -> Result<ServerTlsConfig, ServeError> {
    Ok(ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            read(&cfg.tls_cert)?,
            read(&cfg.tls_key)?,
        ))
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The federation listener's router: the `Broker` calls a workload without
/// a certificate may make, and nothing else.
pub(super) fn federation_router(
    cfg: &ServeConfig,
    tls: ServerTlsConfig,
    engine: &Arc<Engine>,
    federation: Arc<crate::federation::Federation>,
    cancel: &CancellationToken,
) -> Result<GrpcRouter, ServeError> {
    let broker =
        crate::api::federated::FederatedBroker::new(engine.clone(), federation, cancel.clone());
    // Anyone on the network completes its handshake here: a connection
    // lives 5 minutes (and 30 s of grace for its calls) at most, a watch
    // for approval reconnecting on a new one (the CLI and the agent do);
    // it holds 16 calls at once, each answered (a watch: started) within
    // 30 s; the service bounds its exchanges in flight.
    let server = Server::builder()
        .tls_config(tls)
        .map_err(|e| tls_error(&cfg.tls_cert, &e))?
        .max_connection_age(FEDERATION_CONNECTION_AGE)
        .max_connection_age_grace(FEDERATION_CONNECTION_GRACE)
        .timeout(FEDERATION_CALL_TIMEOUT)
        .concurrency_limit_per_connection(16);
    Ok(with_calls(server, "federation")
        .max_concurrent_streams(16)
        .add_service(BrokerServer::new(broker).max_decoding_message_size(MAX_MESSAGE)))
}

/// How long a federation listener connection lives.
const FEDERATION_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// How long its calls may go on after that.
const FEDERATION_CONNECTION_GRACE: Duration = Duration::from_secs(30);
/// How long a call may take to be answered (a watch: to start).
const FEDERATION_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections on the federation listener.
pub(super) const FEDERATION_CONNECTIONS: usize = 1024;

/// Serve `router` on `listener` until `cancel`, holding at most
/// `limits.grpc_connections` connections (more are closed as they arrive).
pub(super) async fn serve(
    router: GrpcRouter,
    listener: TcpListener,
    limits: ConnLimits,
    cancel: CancellationToken,
) {
    use tokio_stream::StreamExt as _;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.grpc_connections));
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .filter_map(move |r| match r {
            Ok(tcp) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(Ok(Limited { tcp, _slot: slot })),
                Err(_) => {
                    tracing::debug!("gRPC connection limit reached; closing the new connection");
                    None
                }
            },
            Err(e) => Some(Err(e)),
        });
    if let Err(e) = router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "gRPC server stopped");
    }
}

/// A connection that holds one of the listener's slots while it lives.
struct Limited {
    tcp: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

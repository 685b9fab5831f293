//! The mTLS gRPC listener: every service, reflection and health, behind the
//! per-call layer that names the caller and the call in the trail.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};

use super::{ServeConfig, ServeError, read};
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
/// HTTP/2 keep-alive pings.
const KEEPALIVE: Duration = Duration::from_secs(30);

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
    let approvals = ApprovalsService::new(engine.clone());
    let audit = AuditService::new(engine.clone(), cancel.clone());
    let keys = KeysService::new(engine.clone(), cfg.rotation, rotate_wake);
    let auth = Authenticate::new(engine.clone());
    Ok(Server::builder()
        .tls_config(tls)
        .map_err(|e| tls_error(&cfg.tls_cert, &e))?
        .tcp_nodelay(true)
        .trace_fn(|req| {
            tracing::info_span!(
                "rpc",
                method = %req.uri().path(),
                caller = tracing::field::Empty,
                call_id = tracing::field::Empty,
                grpc_status = tracing::field::Empty
            )
        })
        .layer(crate::api::CallLayer)
        .http2_keepalive_interval(Some(KEEPALIVE))
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

/// Serve `router` on `listener` until `cancel`.
pub(super) async fn serve(router: GrpcRouter, listener: TcpListener, cancel: CancellationToken) {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Err(e) = router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "gRPC server stopped");
    }
}

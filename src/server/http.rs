//! The HTTP listener: JWKS, OIDC discovery, health and metrics — plain on
//! loopback development, or TLS with the server certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ConnLimits, SHUTDOWN_GRACE, ServeError};
use crate::engine::Engine;
use crate::keys::JWKS_MAX_AGE;

/// How long a TLS handshake on the HTTP listener may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keep-alive pings (and how long to wait for their answer).
const KEEPALIVE: Duration = Duration::from_secs(20);

/// Serve `app` on `listener` (over TLS when `tls` is set) until `cancel`:
/// one task per connection (a slow handshake never holds up the accept
/// loop), at most `limits.http_connections` at once (more are closed at
/// once), each bounded in how long it may take to send its headers and how
/// long it may live.
pub(super) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnLimits,
    cancel: CancellationToken,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.http_connections));
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP connection limit reached; closing the new connection");
            continue;
        };
        let (acceptor, app, cancel) = (acceptor.clone(), app.clone(), cancel.clone());
        conns.spawn(async move {
            let _slot = slot;
            // A peer that connects and says nothing gives its slot back
            // after the header-read timeout (hyper's own timer only starts
            // with the first byte).
            let mut first = [0u8; 1];
            match tokio::time::timeout(limits.header_read_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    tracing::debug!(%peer, "HTTP peer sent nothing in time; closed");
                    return;
                }
            }
            match acceptor {
                None => serve_conn(tcp, peer, app, limits, cancel).await,
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        tracing::debug!(%peer, "HTTPS handshake failed");
                        return;
                    };
                    serve_conn(stream, peer, app, limits, cancel).await;
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conns.wait()).await;
}

/// One HTTP/1.1 or HTTP/2 connection, within `limits`.
async fn serve_conn<IO>(
    io: IO,
    peer: std::net::SocketAddr,
    app: axum::Router,
    limits: ConnLimits,
    cancel: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    // Handlers that record who did what from where read the peer address.
    let app =
        tower::ServiceExt::map_request(app, move |mut r: http::Request<hyper::body::Incoming>| {
            r.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            r
        });
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.streams_per_connection)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(error = %e, "HTTP connection ended") },
        () = tokio::time::sleep(limits.connection_lifetime) => {
            tracing::debug!("HTTP connection reached its lifetime; closed");
        }
        () = cancel.cancelled() => {}
    }
}

/// The routes.
pub(super) fn router(engine: Arc<Engine>) -> axum::Router {
    let cache_control = format!("public, max-age={}", JWKS_MAX_AGE.as_secs());
    let jwks_engine = engine.clone();
    let metrics_engine = engine.clone();
    let health_engine = engine.clone();
    // 503 while the store is unusable or the last commit failed (the gRPC
    // health service says NOT_SERVING then too): a load balancer stops
    // sending calls that could only be refused.
    let healthz = move || {
        let e = health_engine.clone();
        async move {
            if e.serving() {
                (axum::http::StatusCode::OK, "ok\n")
            } else {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
            }
        }
    };
    let jwks = move || {
        let (e, cache_control) = (jwks_engine.clone(), cache_control.clone());
        async move {
            (
                [
                    (
                        axum::http::header::CONTENT_TYPE,
                        "application/jwk-set+json".to_owned(),
                    ),
                    (axum::http::header::CACHE_CONTROL, cache_control),
                ],
                e.keys().current().jwks_json.clone(),
            )
        }
    };
    let discovery = move || {
        let e = engine.clone();
        async move { axum::Json(discovery_document(e.issuer())) }
    };
    let metrics = move || {
        let e = metrics_engine.clone();
        async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                e.render_metrics(),
            )
        }
    };
    axum::Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

fn discovery_document(iss: &str) -> serde_json::Value {
    serde_json::json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "id_token_signing_alg_values_supported": ["ES256", "EdDSA"],
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
    })
}

/// TLS for the HTTP listener: the gRPC server certificate, no client
/// authentication (JWKS and discovery are public), HTTP/2 and HTTP/1.1.
pub(super) fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |p: &Path, e: &dyn std::fmt::Display| ServeError::Tls {
        path: p.display().to_string(),
        detail: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(cert, &e))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| err(cert, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

//! The HTTP listener: JWKS, OIDC discovery, health and metrics — plain on
//! loopback development, or TLS with the server certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{SHUTDOWN_GRACE, ServeError};
use crate::engine::Engine;
use crate::keys::JWKS_MAX_AGE;

/// How long a TLS handshake on the HTTP listener may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `app` on `listener` (over TLS when `tls` is set) until `cancel`.
pub(super) async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    cancel: CancellationToken,
) {
    match tls {
        Some(tls) => serve_https(listener, app, tls, cancel).await,
        None => {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }
    }
}

/// The routes.
pub(super) fn router(engine: Arc<Engine>) -> axum::Router {
    let cache_control = format!("public, max-age={}", JWKS_MAX_AGE.as_secs());
    let jwks_engine = engine.clone();
    let metrics_engine = engine.clone();
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
        .route("/healthz", get(|| async { "ok\n" }))
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

/// The HTTP router over TLS: one task per connection (a slow handshake
/// never holds up the accept loop), bounded handshake time.
async fn serve_https(
    listener: TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    continue;
                }
            },
        };
        let (acceptor, app, cancel) = (acceptor.clone(), app.clone(), cancel.clone());
        conns.spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                tracing::debug!(%peer, "HTTPS handshake failed");
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "HTTPS connection ended") },
                () = cancel.cancelled() => {}
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conns.wait()).await;
}

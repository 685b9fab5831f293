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
    let per_peer = PeerCounts::default();
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
        let Some(from_peer) = PeerSlot::take(
            &per_peer,
            crate::engine::peer_key(peer.ip()),
            limits.http_connections_per_peer,
        ) else {
            tracing::debug!(%peer, "HTTP connections from this peer at their limit; closing the new one");
            continue;
        };
        let (acceptor, app, cancel) = (acceptor.clone(), app.clone(), cancel.clone());
        conns.spawn(async move {
            let _slots = (slot, from_peer);
            accepted(tcp, peer, acceptor, app, limits, cancel).await;
        });
    }
    conns.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conns.wait()).await;
}

/// One accepted connection, from its first byte (and TLS handshake) on.
async fn accepted(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    limits: ConnLimits,
    cancel: CancellationToken,
) {
    // A peer that connects and says nothing gives its slot back after the
    // header-read timeout (hyper's own timer only starts with the first
    // byte).
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.header_read_timeout, tcp.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => {
            tracing::debug!(%peer, "HTTP peer sent nothing in time; closed");
            return;
        }
    }
    let Some(acceptor) = acceptor else {
        return serve_conn(tcp, peer, app, limits, cancel).await;
    };
    let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
        tracing::debug!(%peer, "HTTPS handshake failed");
        return;
    };
    // The same after the handshake: the request's first byte within the
    // header-read timeout.
    let Some(stream) = first_bytes(stream, limits.header_read_timeout).await else {
        tracing::debug!(%peer, "HTTPS peer sent nothing after the handshake; closed");
        return;
    };
    serve_conn(stream, peer, app, limits, cancel).await;
}

/// Open connections per peer: an IPv4 address (IPv4-mapped IPv6 too), or an
/// IPv6 /64 (one host usually holds a whole /64).
type PeerCounts = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One of a peer's connections; given back when dropped.
struct PeerSlot {
    counts: PeerCounts,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    /// A slot for `ip`, unless it holds `max` already.
    fn take(counts: &PeerCounts, ip: std::net::IpAddr, max: usize) -> Option<Self> {
        let mut c = counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = c.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = c.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// `io` once its first bytes arrived within `within`, with those bytes put
/// back in front; `None` when nothing came (or the peer closed).
async fn first_bytes<IO>(mut io: IO, within: Duration) -> Option<Prefixed<IO>>
where
    IO: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(within, io.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.truncate(n);
            Some(Prefixed {
                prefix: buf,
                at: 0,
                io,
            })
        }
        _ => None,
    }
}

/// A stream whose first bytes were read already: they are read again first.
struct Prefixed<IO> {
    prefix: Vec<u8>,
    at: usize,
    io: IO,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A stream whose writes fail once one has waited `within` for a peer that
/// does not read (a full send buffer): such a peer gives its slot back
/// instead of holding it for the connection's lifetime.
struct WriteDeadline<IO> {
    io: IO,
    within: Duration,
    /// Armed while a write waits; cleared when one goes through.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    fn new(io: IO, within: Duration) -> Self {
        Self {
            io,
            within,
            stalled: None,
        }
    }

    /// `poll` (a write or a flush) with the deadline: pending past it is an
    /// error.
    fn timed<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: impl FnOnce(&mut IO, &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        match poll(&mut self.io, cx) {
            std::task::Poll::Ready(r) => {
                self.stalled = None;
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => {
                let within = self.within;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
                if timer.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the peer did not read its answer in time",
                    )));
                }
                std::task::Poll::Pending
            }
        }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.timed(cx, |io, cx| std::pin::Pin::new(io).poll_write(cx, data))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.timed(cx, |io, cx| std::pin::Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.timed(cx, |io, cx| std::pin::Pin::new(io).poll_shutdown(cx))
    }
}

/// Most bytes a request body on this listener may have: the console's
/// largest form (`console::routes` `MAX_FORM`).
const BODY_MAX: usize = 16 * 1024;

/// Read the whole request body within `within` before the handler runs:
/// a body sent slowly gets 408 and the connection closes; a body too large
/// gets 413.
async fn bounded_body(
    axum::extract::State(within): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let (parts, body) = req.into_parts();
    let closing = |code: http::StatusCode, text: &'static str| {
        let mut r = (code, text).into_response();
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        r
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > BODY_MAX) {
        return closing(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large\n",
        );
    }
    match tokio::time::timeout(within, axum::body::to_bytes(body, BODY_MAX)).await {
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
        Ok(Err(_)) => closing(
            http::StatusCode::BAD_REQUEST,
            "request body too large or cut short\n",
        ),
        Err(_) => closing(
            http::StatusCode::REQUEST_TIMEOUT,
            "request body not sent in time\n",
        ),
    }
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
    use hyper_util::rt::{TokioIo, TokioTimer};
    // A body that trickles in holds its connection no longer than this.
    let app = app.layer(axum::middleware::from_fn_with_state(
        limits.body_read_timeout,
        bounded_body,
    ));
    // Handlers that record who did what from where read the peer address.
    let app =
        tower::ServiceExt::map_request(app, move |mut r: http::Request<hyper::body::Incoming>| {
            r.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            r
        });
    let service = hyper_util::service::TowerToHyperService::new(app);
    // HTTP/1.1 only: JWKS, discovery, health, metrics and the console need
    // nothing more, and every phase of an HTTP/1.1 connection has a timer
    // (the first byte above, the headers and idle keep-alive here, the
    // body in `bounded_body`); HTTP/2 would add streams, pings and its
    // preface, each a way to hold a connection (issue 21).
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(
            TokioIo::new(WriteDeadline::new(io, limits.write_timeout)),
            service,
        );
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(error = %e, "HTTP connection ended") },
        () = tokio::time::sleep(limits.connection_lifetime) => {
            tracing::debug!("HTTP connection reached its lifetime; closed");
        }
        () = cancel.cancelled() => {}
    }
}

/// The health listener's bounds: a few slots, short timers (a probe is one
/// quick request).
pub(super) const HEALTH_LIMITS: ConnLimits = ConnLimits {
    http_connections: 32,
    http_connections_per_peer: 8,
    grpc_connections: 0,
    header_read_timeout: Duration::from_secs(5),
    body_read_timeout: Duration::from_secs(5),
    connection_lifetime: Duration::from_secs(30),
    write_timeout: Duration::from_secs(5),
    streams_per_connection: 0,
};

/// `/healthz` and `/metrics`: on the HTTP listener, and alone on the
/// health listener.
pub(super) fn health_router(engine: Arc<Engine>) -> axum::Router {
    let metrics_engine = engine.clone();
    let health_engine = engine;
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
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// The routes of the HTTP listener.
pub(super) fn router(engine: Arc<Engine>) -> axum::Router {
    let cache_control = format!("public, max-age={}", JWKS_MAX_AGE.as_secs());
    let jwks_engine = engine.clone();
    let health = health_router(engine.clone());
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
    axum::Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .merge(health)
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
    // HTTP/1.1 only (see `serve_conn`).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt as _;

    use super::WriteDeadline;

    /// Issue 21, finding 1: a peer that does not read its answers holds its
    /// connection for the write timeout, not the connection's lifetime.
    #[tokio::test(start_paused = true)]
    async fn a_write_no_one_reads_fails_after_the_write_timeout() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut ours = WriteDeadline::new(ours, Duration::from_secs(10));
        let start = tokio::time::Instant::now();
        let err = ours.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // A peer that reads keeps the stream working, however long it takes
        // in all: the timer covers one stalled write, not the whole answer.
        let (ours, mut theirs2) = tokio::io::duplex(64);
        let mut ours = WriteDeadline::new(ours, Duration::from_secs(10));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < 1024 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let n = theirs2.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got.len()
        });
        ours.write_all(&[1u8; 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 1024);
        drop(theirs);
    }
}

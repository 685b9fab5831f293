//! `server` wires the broker together: store, group commit, key ring,
//! policy, the mTLS gRPC listener, the HTTP listener (JWKS, discovery,
//! health), the expiry task and policy reload — all under one cancellation
//! token, stopped by [`Running::shutdown`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};

use crate::api::approvals::ApprovalsService;
use crate::api::audit::AuditService;
use crate::api::broker::BrokerService;
use crate::api::keys::KeysService;
use crate::clock::{Clock, SystemClock};
use crate::grant::Engine;
use crate::keys::{Kek, KeyRing, SigningAlg};
use crate::pb::approvals_server::ApprovalsServer;
use crate::pb::audit_server::AuditServer;
use crate::pb::broker_server::BrokerServer;
use crate::pb::keys_server::KeysServer;
use crate::policy::Policy;
use crate::store::Store;
use crate::store::commit::GroupCommit;
use crate::store::mem::MemStore;
use crate::store::sled_store::SledStore;

/// Largest gRPC message accepted (a request with 64 max-size scopes and a
/// 4 KiB justification is far below this).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// `Cache-Control: max-age` of the JWKS; NEXT keys are published at least
/// twice this long before they sign.
pub const JWKS_MAX_AGE_SECS: u64 = 300;
const JWKS_CACHE_CONTROL: &str = "public, max-age=300";
/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything `serve` needs.
pub struct ServeConfig {
    /// sled directory (ignored with `in_memory`).
    pub data_dir: PathBuf,
    /// Keep state in memory only (tests, benchmarks of the non-durable path).
    pub in_memory: bool,
    /// gRPC listen address (port 0: pick one).
    pub listen: SocketAddr,
    /// HTTP listen address for JWKS/discovery/health; `None` disables it.
    pub http_listen: Option<SocketAddr>,
    /// Server certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// Server private key (PEM).
    pub tls_key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Policy file.
    pub policy: PathBuf,
    /// Key-encryption key file (64 hex characters).
    pub kek_file: PathBuf,
    /// `iss` of tokens; default `http://<http address>`.
    pub issuer: Option<String>,
    /// Algorithm for newly generated signing keys.
    pub alg: SigningAlg,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// How often to look for policy file changes (SIGHUP also reloads).
    pub policy_poll: Duration,
    /// Signing-key rotation timing.
    pub rotation: crate::rotation::Schedule,
    /// Keep audit records at least this long (compacted up to a signed
    /// checkpoint); `None` keeps everything.
    pub audit_retention: Option<Duration>,
    /// Serve the HTTP listener over TLS with the server certificate.
    pub http_tls: bool,
    /// Delete leases and requests this long after they ended; `None` keeps
    /// them forever.
    pub retention: Option<Duration>,
}

impl ServeConfig {
    /// Defaults around the given files, real clock.
    pub fn new(
        data_dir: PathBuf,
        tls_cert: PathBuf,
        tls_key: PathBuf,
        client_ca: PathBuf,
        policy: PathBuf,
        kek_file: PathBuf,
    ) -> Self {
        Self {
            data_dir,
            in_memory: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            tls_cert,
            tls_key,
            client_ca,
            policy,
            kek_file,
            issuer: None,
            alg: SigningAlg::Es256,
            clock: Arc::new(SystemClock),
            policy_poll: Duration::from_secs(2),
            rotation: crate::rotation::Schedule::default(),
            audit_retention: None,
            http_tls: false,
            retention: None,
        }
    }
}

/// Start-up failures; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A TLS file is missing or bad.
    #[error("tls: `{path}`: {detail}")]
    Tls {
        /// File.
        path: String,
        /// Problem.
        detail: String,
    },
    /// Policy problems.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// Key ring problems (KEK, sealed keys).
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// Store problems.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Could not listen.
    #[error("cannot listen on {addr}: {detail}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Problem.
        detail: String,
    },
}

/// A running broker.
pub struct Running {
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// The engine (tests read expiry progress through it).
    pub engine: Arc<Engine>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    flusher: tokio::task::JoinHandle<()>,
}

impl Running {
    /// A token that fires when the broker shuts down.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop: cancel every task, wait a bounded time, then the final sync.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("tasks did not stop within {SHUTDOWN_GRACE:?}; abandoning them");
        }
        let _ = self.flusher.await;
        // Connection tasks of the gRPC and HTTP servers (spawned by hyper,
        // outside our tracker) and per-call streams hold the engine, and so
        // the store's file lock, until they unwind. Return only once they
        // have, so a restart in the same process can open the store again.
        let until = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while Arc::strong_count(&self.engine) > 1 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if Arc::strong_count(&self.engine) > 1 {
            tracing::warn!(
                "the engine is still referenced after {SHUTDOWN_GRACE:?}; the store may stay locked"
            );
        }
        tracing::info!("stopped");
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Tls {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Start the broker; returns once both listeners are bound.
pub async fn start(cfg: ServeConfig) -> Result<Running, ServeError> {
    crate::jose::install();
    let _ = rustls::crypto::ring::default_provider().install_default();

    let policy = Policy::load(&cfg.policy)?;
    let store: Arc<dyn Store> = if cfg.in_memory {
        Arc::new(MemStore::new())
    } else {
        let dir = cfg.data_dir.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || SledStore::open(&dir))
                .await
                .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))??,
        )
    };
    let kek = Kek::from_file(&cfg.kek_file)?;
    let ring = Arc::new(KeyRing::load_or_create(
        store.as_ref(),
        &kek,
        cfg.alg,
        cfg.clock.now(),
    )?);

    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            read(&cfg.tls_cert)?,
            read(&cfg.tls_key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&cfg.client_ca)?))
        .client_auth_optional(false)
        .timeout(Duration::from_secs(10));
    let grpc_listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServeError::Listen {
            addr: cfg.listen,
            detail: e.to_string(),
        })?;
    let grpc_addr = grpc_listener.local_addr().map_err(|e| ServeError::Listen {
        addr: cfg.listen,
        detail: e.to_string(),
    })?;
    let http_listener = match cfg.http_listen {
        Some(a) => Some(TcpListener::bind(a).await.map_err(|e| ServeError::Listen {
            addr: a,
            detail: e.to_string(),
        })?),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let http_tls = if cfg.http_tls {
        Some(https_config(&cfg.tls_cert, &cfg.tls_key)?)
    } else {
        None
    };
    let scheme = if cfg.http_tls { "https" } else { "http" };
    let issuer = cfg.issuer.clone().unwrap_or_else(|| match http_addr {
        Some(a) => format!("{scheme}://{a}"),
        None => format!("https://{grpc_addr}"),
    });

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (commit, flusher) = GroupCommit::start(store.clone(), cancel.child_token());
    let audit = crate::audit::AuditLog::open(store.as_ref())?;
    let engine = Arc::new(Engine::new(
        store,
        commit,
        policy,
        ring.clone(),
        cfg.clock.clone(),
        issuer.clone(),
        audit,
    ));
    // The start itself is part of the trail.
    let mut start_entries = vec![crate::audit::Entry::ok(
        crate::grant::SYSTEM_ACTOR,
        "policy.loaded",
        &cfg.policy.display().to_string(),
        &[],
        "start",
    )];
    if let Some(kid) = ring.created() {
        start_entries.push(crate::audit::Entry::ok(
            crate::grant::SYSTEM_ACTOR,
            "key.created",
            kid,
            &[],
            "first signing key",
        ));
    }
    engine
        .record(start_entries)
        .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))?;

    let rotate_wake = Arc::new(tokio::sync::Notify::new());
    tracker.spawn(rotate(
        engine.clone(),
        cfg.rotation,
        rotate_wake.clone(),
        cancel.clone(),
    ));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Tls {
            path: "reflection".into(),
            detail: e.to_string(),
        })?;
    tracker.spawn(health(engine.clone(), health_reporter, cancel.clone()));
    let router = Server::builder()
        .tls_config(tls)
        .map_err(|e| ServeError::Tls {
            path: cfg.tls_cert.display().to_string(),
            detail: e.to_string(),
        })?
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
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(
            BrokerServer::new(BrokerService::new(engine.clone(), cancel.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            ApprovalsServer::new(ApprovalsService::new(engine.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            AuditServer::new(AuditService::new(engine.clone(), cancel.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            KeysServer::new(KeysService::new(
                engine.clone(),
                cfg.rotation,
                rotate_wake.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(health_service)
        .add_service(reflection);
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let c = cancel.clone();
    tracker.spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    });

    if let Some(listener) = http_listener {
        let app = http_router(engine.clone());
        let c = cancel.clone();
        match http_tls {
            Some(tls) => {
                tracker.spawn(serve_https(listener, app, tls, c));
            }
            None => {
                tracker.spawn(async move {
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(c.cancelled_owned())
                        .await
                    {
                        tracing::error!(error = %e, "HTTP server stopped");
                    }
                });
            }
        }
    }
    tracker.spawn(crate::expiry::run(engine.clone(), cancel.clone()));
    if let Some(keep) = cfg.retention {
        tracker.spawn(retention(engine.clone(), keep, cancel.clone()));
    }
    tracker.spawn(checkpoints(
        engine.clone(),
        cfg.audit_retention,
        cancel.clone(),
    ));
    // Gauges start from the store's counts, taken off the start-up path.
    let counting = engine.clone();
    tracker.spawn(async move {
        let store = counting.store().clone();
        match tokio::task::spawn_blocking(move || store.counts()).await {
            Ok(Ok((leases, requests))) => {
                counting
                    .metrics()
                    .active_leases
                    .inc_by(i64::try_from(leases).unwrap_or(i64::MAX));
                counting
                    .metrics()
                    .open_requests
                    .inc_by(i64::try_from(requests).unwrap_or(i64::MAX));
            }
            _ => tracing::warn!("could not count leases for the gauges"),
        }
    });
    if let Some(rx) = engine.take_notifications() {
        let e = engine.clone();
        let stats = engine.notifier().stats().clone();
        tracker.spawn(crate::notify::run(
            rx,
            stats,
            move || e.policy(),
            cancel.clone(),
        ));
    }
    tracker.spawn(reload_policy(
        engine.clone(),
        cfg.policy.clone(),
        cfg.policy_poll,
        cancel.clone(),
    ));
    tracing::info!(%grpc_addr, http_addr = ?http_addr, %issuer, kid = %ring.current().active.kid, "broker ready");
    Ok(Running {
        grpc_addr,
        http_addr,
        engine,
        cancel,
        tracker,
        flusher,
    })
}

fn http_router(engine: Arc<Engine>) -> axum::Router {
    let jwks_engine = engine.clone();
    let metrics_engine = engine.clone();
    let jwks = move || {
        let e = jwks_engine.clone();
        async move {
            (
                [
                    (axum::http::header::CONTENT_TYPE, "application/jwk-set+json"),
                    (axum::http::header::CACHE_CONTROL, JWKS_CACHE_CONTROL),
                ],
                e.keys().current().jwks_json.clone(),
            )
        }
    };
    let discovery = move || {
        let e = engine.clone();
        async move {
            let iss = e.issuer().to_owned();
            axum::Json(serde_json::json!({
                "issuer": iss,
                "jwks_uri": format!("{iss}/.well-known/jwks.json"),
                "id_token_signing_alg_values_supported": ["ES256", "EdDSA"],
                "token_endpoint_auth_methods_supported": ["tls_client_auth"],
                "response_types_supported": ["token"],
                "subject_types_supported": ["public"],
            }))
        }
    };
    axum::Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let e = metrics_engine.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        e.metrics().render(&e),
                    )
                }
            }),
        )
}

async fn reload_policy(
    engine: Arc<Engine>,
    path: PathBuf,
    poll: Duration,
    cancel: CancellationToken,
) {
    // Compare contents, not mtimes: two writes inside one timestamp tick
    // (coarse on many filesystems) would otherwise go unnoticed.
    let read = |p: &PathBuf| std::fs::read(p).ok();
    let mut seen = read(&path);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup_fut = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fut = std::future::pending::<()>();
        let forced = tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(poll) => false,
            () = hup_fut => true,
        };
        let now = read(&path);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        match Policy::load(&path) {
            Ok(p) => {
                let entry = crate::audit::Entry::ok(
                    crate::grant::SYSTEM_ACTOR,
                    "policy.loaded",
                    &path.display().to_string(),
                    &[],
                    "reload",
                );
                // Fail closed: a policy whose load cannot be recorded is not swapped in.
                match engine.record_durable(entry).await {
                    Ok(()) => {
                        engine.set_policy(p);
                        tracing::info!(path = %path.display(), "policy reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "policy reload not recorded; the previous policy stays in force")
                    }
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "new policy rejected; the previous policy stays in force");
                let entry = crate::audit::Entry::ok(
                    crate::grant::SYSTEM_ACTOR,
                    "policy.rejected",
                    &path.display().to_string(),
                    &[],
                    &e.to_string(),
                )
                .outcome("refused");
                if let Err(e) = engine.record_durable(entry).await {
                    tracing::error!(error = %e, "could not record the rejected policy");
                }
                engine.policy_rejected();
            }
        }
    }
}

/// Sign an audit checkpoint every `CHECKPOINT_EVERY` records or
/// `CHECKPOINT_INTERVAL`, whichever comes first, and once more at shutdown.
async fn checkpoints(engine: Arc<Engine>, retention: Option<Duration>, cancel: CancellationToken) {
    const CHECKPOINT_EVERY: u64 = 1000;
    const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
    let mut last = tokio::time::Instant::now();
    loop {
        let stop = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        if stop
            || engine.audit().since_checkpoint() >= CHECKPOINT_EVERY
            || last.elapsed() >= CHECKPOINT_INTERVAL
        {
            match engine.checkpoint_audit().await {
                Ok(Some(seq)) => {
                    tracing::debug!(seq, "audit checkpoint signed");
                    if let Some(keep) = retention {
                        let before = engine
                            .clock()
                            .now()
                            .saturating_sub(crate::clock::millis(keep));
                        if let Err(e) = engine.compact_audit(before).await {
                            tracing::error!(error = %e, "audit compaction failed");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "audit checkpoint failed"),
            }
            last = tokio::time::Instant::now();
        }
        if stop {
            return;
        }
    }
}

/// Report `grpc.health.v1` SERVING while the store answers and the last
/// group commit succeeded, NOT_SERVING otherwise.
async fn health(
    engine: Arc<Engine>,
    reporter: tonic_health::server::HealthReporter,
    cancel: CancellationToken,
) {
    let mut serving = None;
    loop {
        let ok = engine.healthy();
        if serving != Some(ok) {
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in [
                "",
                "portcullis.v1.Broker",
                "portcullis.v1.Approvals",
                "portcullis.v1.Keys",
                "portcullis.v1.Audit",
            ] {
                reporter.set_service_status(name, status).await;
            }
            if !ok {
                tracing::error!("store unhealthy: reporting NOT_SERVING");
            }
            serving = Some(ok);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Carry out key rotation steps as they fall due; an operator's
/// `Keys.Rotate` wakes it early. The schedule is derived from the stored key
/// records, so it survives restarts.
async fn rotate(
    engine: Arc<Engine>,
    schedule: crate::rotation::Schedule,
    wake: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    loop {
        let now = engine.clock().now();
        let next = match engine.rotate_due(&schedule, now).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "key rotation step failed; the current keys stay in use");
                Some(now + 5_000)
            }
        };
        let clock = engine.clock().clone();
        let sleep = async {
            match next {
                Some(at) => clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// TLS for the HTTP listener: the gRPC server certificate, no client
/// authentication (JWKS and discovery are public), HTTP/2 and HTTP/1.1.
fn https_config(cert: &PathBuf, key: &PathBuf) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |p: &PathBuf, e: &dyn std::fmt::Display| ServeError::Tls {
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
            let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
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

/// Hourly: delete leases and requests that ended more than `keep` ago.
async fn retention(engine: Arc<Engine>, keep: Duration, cancel: CancellationToken) {
    loop {
        let before = engine
            .clock()
            .now()
            .saturating_sub(crate::clock::millis(keep));
        if let Err(e) = engine.purge_ended(before).await {
            tracing::error!(error = %e, "retention sweep failed");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

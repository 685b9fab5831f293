//! `server` wires the broker together: store, group commit, key ring,
//! policy, the mTLS gRPC listener ([`grpc`]), the HTTP listener ([`http`]:
//! JWKS, discovery, health, metrics) and the background loops ([`tasks`]) —
//! all under one cancellation token, stopped by [`Running::shutdown`].

mod grpc;
mod http;
mod tasks;

pub use self::grpc::MAX_MESSAGE;
pub use crate::engine::{Limits, Rate};
pub use crate::store::copy::Copied;
pub use crate::store::postgres::PgOptions;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Action, AuditLog, Entry};
use crate::clock::{Clock, SystemClock};
use crate::engine::{Engine, Parts, SYSTEM_ACTOR};
use crate::keys::{Kek, KeyRing, SigningAlg};
use crate::policy::Policy;
use crate::store::Store;
use crate::store::commit::GroupCommit;
use crate::store::mem::MemStore;
use crate::store::postgres::PgStore;
use crate::store::sled_store::{SledOptions, SledStore};
/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything `serve` needs.
pub struct ServeConfig {
    /// sled directory (ignored with `in_memory`).
    pub data_dir: PathBuf,
    /// Keep state in memory only (tests, benchmarks of the non-durable path).
    pub in_memory: bool,
    /// Tuning of the embedded store.
    pub sled: SledOptions,
    /// Keep state in PostgreSQL, shared with every broker on the same
    /// database, instead of sled in `data_dir`.
    pub database: Option<PgOptions>,
    /// gRPC listen address (port 0: pick one).
    pub listen: SocketAddr,
    /// HTTP listen address for JWKS/discovery/health; `None` disables it.
    pub http_listen: Option<SocketAddr>,
    /// A listener of its own for `/healthz` and `/metrics` (plain HTTP, its
    /// own few connection slots), so probes answer while the HTTP listener
    /// is busy or flooded; `None`: none.
    pub health_listen: Option<SocketAddr>,
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
    /// `iss` of tokens. Default: the one recorded in the store, or on the
    /// first start `http://<http address>`.
    pub issuer: Option<String>,
    /// Accept a configured issuer that differs from the stored one
    /// (every token issued before stops verifying).
    pub allow_issuer_change: bool,
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
    /// Append every signed audit checkpoint to this file (put it where the
    /// broker's store writer cannot rewrite it: another disk, an append-only
    /// mount, a log shipper); `audit verify --witness` checks against it.
    pub audit_witness: Option<PathBuf>,
    /// POST every signed audit checkpoint (`{"checkpoint", "seq"}` JSON) to
    /// this URL as well, with the webhooks' retries.
    pub audit_witness_url: Option<String>,
    /// Per-identity bounds (open requests, watch streams).
    pub limits: crate::engine::Limits,
    /// Bounds on connections, for every listener.
    pub conn_limits: ConnLimits,
    /// Run the expiry task (always, in a broker; tests that check what is
    /// enforced at decision time, before any sweep, turn it off).
    pub expiry_task: bool,
    /// Serve the approver console on the HTTP listener (`None`: no console).
    pub console: Option<ConsoleOptions>,
    /// Where workloads without a client certificate sign in with their
    /// platform's token (server-authenticated TLS; `None`: nowhere).
    pub federation_listen: Option<SocketAddr>,
}

pub use crate::console::oidc::OidcConfig;

/// How the approver console is served.
#[derive(Clone, Debug, Default)]
pub struct ConsoleOptions {
    /// Base URL people reach the HTTP listener at; default
    /// `http(s)://<http address>`.
    pub public_url: Option<String>,
    /// Sign-in with the organisation's OpenID provider.
    pub oidc: Option<OidcConfig>,
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
            sled: SledOptions::default(),
            database: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            health_listen: None,
            tls_cert,
            tls_key,
            client_ca,
            policy,
            kek_file,
            issuer: None,
            allow_issuer_change: false,
            alg: SigningAlg::Es256,
            clock: Arc::new(SystemClock),
            policy_poll: Duration::from_secs(2),
            rotation: crate::rotation::Schedule::default(),
            audit_retention: None,
            http_tls: false,
            retention: None,
            expiry_task: true,
            limits: crate::engine::Limits::default(),
            conn_limits: ConnLimits::default(),
            audit_witness: None,
            audit_witness_url: None,
            console: None,
            federation_listen: None,
        }
    }
}

/// What one connection, and all of them together, may hold: an
/// unauthenticated peer must not be able to starve the broker of file
/// descriptors or tasks by opening connections and saying nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections on the HTTP listener (JWKS, discovery, health,
    /// metrics); more are closed as they arrive.
    pub http_connections: usize,
    /// Open HTTP connections from one peer address: one client cannot take
    /// every slot.
    pub http_connections_per_peer: usize,
    /// Open connections on the gRPC listener.
    pub grpc_connections: usize,
    /// How long an HTTP client may take to send a request's headers
    /// (idle keep-alive connections, and the time after a TLS handshake
    /// until the first byte, included).
    pub header_read_timeout: Duration,
    /// How long an HTTP client may take to send a request's body.
    pub body_read_timeout: Duration,
    /// How long one HTTP connection may live.
    pub connection_lifetime: Duration,
    /// How long an HTTP write may wait for a peer that does not read its
    /// answers before the connection is closed.
    pub write_timeout: Duration,
    /// Concurrent streams on one gRPC (HTTP/2) connection (the HTTP
    /// listener speaks HTTP/1.1 only).
    pub streams_per_connection: u32,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            http_connections: 512,
            http_connections_per_peer: 64,
            grpc_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
            streams_per_connection: 256,
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
    /// A setting is malformed.
    #[error("{0}")]
    Config(String),
    /// The broker failed while starting (a start-up task died, the trail
    /// could not be appended to).
    #[error("start-up failed: {0}")]
    Internal(String),
    /// The configured issuer is not the one this store's tokens carry.
    #[error(
        "the store's tokens were issued as `{stored}` but --issuer says `{configured}`; every token issued so far would stop verifying. Pass --change-issuer to switch anyway"
    )]
    IssuerChanged {
        /// The issuer recorded in the store.
        stored: String,
        /// The issuer configured now.
        configured: String,
    },
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
    /// Bound address of the health listener, if any.
    pub health_addr: Option<SocketAddr>,
    /// Bound address of the federation listener, if any.
    pub federation_addr: Option<SocketAddr>,
    /// Where people open the approver console (`<public-url>/ui/`), if
    /// it is served.
    pub console_url: Option<String>,
    /// The engine (tests read expiry progress through it).
    pub engine: Arc<Engine>,
    cancel: CancellationToken,
    /// Stops the group committer, after every task has stopped.
    commit_cancel: CancellationToken,
    tracker: TaskTracker,
    flusher: tokio::task::JoinHandle<()>,
    /// This broker's name in leadership terms.
    node: String,
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
        // Only now: the last leader-only steps (a final checkpoint) ran
        // under the term; another broker may take over at once.
        if let Err(e) = self
            .engine
            .store()
            .resign(tasks::UPKEEP_ROLE, &self.node)
            .await
        {
            tracing::warn!(error = %e, "could not give up upkeep leadership; it lapses with its term");
        }
        self.commit_cancel.cancel();
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

fn read(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Tls {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Start the broker; returns once both listeners are bound. Everything that
/// can fail on a bad file (policy, store, KEK, TLS) is read before the group
/// commit starts or anything is recorded; a later failure stops what was
/// started.
pub async fn start(cfg: ServeConfig) -> Result<Running, ServeError> {
    crate::jose::install();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let policy = Policy::load(&cfg.policy)?;
    check_config(&cfg)?;
    let (grpc_tls, http_tls) = read_tls(&cfg)?;
    let (store, ring, node) = open_state(&cfg).await?;
    let listeners = bind_all(&cfg, grpc_tls, http_tls).await?;
    let (grpc_addr, http_addr) = (listeners.grpc_addr, listeners.http_addr());
    let health_addr = listeners.health.as_ref().map(|(_, a)| *a);
    let federation_addr = listeners.federation.as_ref().map(|(_, a, _)| *a);
    let issuer = settle_issuer(&cfg, &store, grpc_addr, http_addr).await?;
    store.resign(START_ROLE, &node).await?;
    let audit = AuditLog::open(store.as_ref()).await?;

    let cancel = CancellationToken::new();
    // The committer outlives the tasks: what they write while stopping (the
    // last checkpoint) is still made durable.
    let commit_cancel = CancellationToken::new();
    let (commit, flusher) = GroupCommit::start(store.clone(), commit_cancel.clone());
    let engine = Arc::new(Engine::new(Parts {
        audit,
        store,
        commit,
        policy,
        keys: ring.clone(),
        clock: cfg.clock.clone(),
        issuer: issuer.clone(),
        limits: cfg.limits,
    }));
    // The first leadership verdict before any task starts: a store of its
    // own leads from the start.
    tasks::lead_round(&engine, &node).await;
    let (tracker, console_url) = match serve(&cfg, &engine, listeners, &node, &cancel) {
        Ok(t) => t,
        Err(e) => {
            cancel.cancel();
            commit_cancel.cancel();
            return Err(e);
        }
    };
    // A first checkpoint before "ready", over the start's own records: a
    // fresh trail verifies at once (one no checkpoint covers does not).
    tasks::first_checkpoint(&engine, &tasks::Witness::of(&cfg)).await;
    log_ready(&engine, grpc_addr, http_addr, &node);
    Ok(Running {
        grpc_addr,
        http_addr,
        health_addr,
        federation_addr,
        console_url,
        engine,
        cancel,
        commit_cancel,
        tracker,
        flusher,
        node,
    })
}

/// Settings that can be wrong without a file being involved.
fn check_config(cfg: &ServeConfig) -> Result<(), ServeError> {
    if cfg.console.is_some() {
        match cfg.http_listen {
            None => {
                return Err(ServeError::Config(
                    "the approver console needs the HTTP listener".into(),
                ));
            }
            Some(a) if !cfg.http_tls && !a.ip().is_loopback() => {
                return Err(ServeError::Config(format!(
                    "the approver console is served only over HTTPS outside loopback: add --http-tls (HTTP listener {a})"
                )));
            }
            Some(_) => {}
        }
    }
    let cache_max = cache_capacity_max();
    if !cfg.in_memory && cfg.database.is_none() && cfg.sled.cache_capacity > cache_max {
        return Err(ServeError::Config(format!(
            "--cache-capacity {} is more than half of this machine's memory ({} bytes at most)",
            cfg.sled.cache_capacity, cache_max
        )));
    }
    if let Some(url) = &cfg.audit_witness_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(ServeError::Config(format!(
            "--audit-witness-url `{url}` must start with https:// or http://"
        )));
    }
    Ok(())
}

/// The largest page cache the embedded store may be given: half of this
/// machine's memory (`/proc/meminfo`), or 64 GiB where that is unknown.
fn cache_capacity_max() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    total_kib.map_or(64 << 30, |kib| kib.saturating_mul(1024) / 2)
}

/// The gRPC listener's mTLS and, with `http_tls`, the HTTP listener's TLS.
fn read_tls(
    cfg: &ServeConfig,
) -> Result<
    (
        tonic::transport::ServerTlsConfig,
        Option<Arc<rustls::ServerConfig>>,
    ),
    ServeError,
> {
    let grpc = grpc::tls(cfg)?;
    let http = cfg
        .http_tls
        .then(|| http::tls_config(&cfg.tls_cert, &cfg.tls_key))
        .transpose()?;
    Ok((grpc, http))
}

/// Bound listeners and their TLS.
struct Listeners {
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    grpc_tls: tonic::transport::ServerTlsConfig,
    http: Option<(TcpListener, SocketAddr)>,
    http_tls: Option<Arc<rustls::ServerConfig>>,
    health: Option<(TcpListener, SocketAddr)>,
    federation: Option<(TcpListener, SocketAddr, tonic::transport::ServerTlsConfig)>,
}

/// Record the start, then serve both listeners and run every background
/// loop. Nothing is spawned unless every step that can fail succeeded.
fn serve(
    cfg: &ServeConfig,
    engine: &Arc<Engine>,
    l: Listeners,
    node: &str,
    cancel: &CancellationToken,
) -> Result<(TaskTracker, Option<String>), ServeError> {
    let rotate_wake = Arc::new(tokio::sync::Notify::new());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let console = console(cfg, engine, &l)?;
    let router = grpc::router(
        cfg,
        l.grpc_tls,
        engine,
        console.clone(),
        rotate_wake.clone(),
        health_service,
        cancel,
    )?;
    let federation = l.federation.map(|f| federation(cfg, engine, f, cancel));
    let federation = federation.transpose()?;
    record_start(engine, cfg)?;
    let tracker = TaskTracker::new();
    tracker.spawn(grpc::serve(router, l.grpc, cfg.conn_limits, cancel.clone()));
    if let Some(f) = federation {
        serve_federation(&tracker, cfg, engine, f, cancel);
    }
    if let Some((listener, _)) = l.http {
        let tls = l.http_tls;
        serve_http(
            &tracker,
            cfg,
            engine,
            (listener, tls),
            console.as_ref(),
            cancel,
        );
    }
    if let Some((listener, addr)) = l.health {
        tracing::info!(%addr, "health listener (/healthz, /metrics)");
        tracker.spawn(http::serve(
            listener,
            http::health_router(engine.clone()),
            None,
            http::HEALTH_LIMITS,
            cancel.clone(),
        ));
    }
    spawn_tasks(
        &tracker,
        engine,
        (cfg, console.as_ref().map(|c| c.public_url().to_owned())),
        rotate_wake,
        health_reporter,
        node,
        cancel,
    );
    Ok((tracker, console.map(|c| format!("{}/ui/", c.public_url()))))
}

/// The HTTP listener (JWKS, discovery, health, metrics, the console).
fn serve_http(
    tracker: &TaskTracker,
    cfg: &ServeConfig,
    engine: &Arc<Engine>,
    (listener, tls): (TcpListener, Option<Arc<rustls::ServerConfig>>),
    console: Option<&Arc<crate::console::Console>>,
    cancel: &CancellationToken,
) {
    let mut app = http::router(engine.clone());
    if let Some(console) = console {
        app = app.merge(crate::console::router(console.clone()));
        tracker.spawn(console.clone().sweep(cancel.clone()));
        tracker.spawn(console.clone().follow_policy(cancel.clone()));
    }
    let limits = cfg.conn_limits;
    tracker.spawn(http::serve(listener, app, tls, limits, cancel.clone()));
}

/// Serve the federation listener, and keep its issuers' keys fresh.
fn serve_federation(
    tracker: &TaskTracker,
    cfg: &ServeConfig,
    engine: &Arc<Engine>,
    (f, router, listener): (
        Arc<crate::federation::Federation>,
        grpc::GrpcRouter,
        TcpListener,
    ),
    cancel: &CancellationToken,
) {
    let limits = ConnLimits {
        grpc_connections: grpc::FEDERATION_CONNECTIONS,
        ..cfg.conn_limits
    };
    tracker.spawn(grpc::serve(router, listener, limits, cancel.clone()));
    tracker.spawn(tasks::follow_issuers(engine.clone(), f, cancel.clone()));
}

/// The federation listener's router and the issuers it trusts.
fn federation(
    cfg: &ServeConfig,
    engine: &Arc<Engine>,
    (listener, addr, tls): (TcpListener, SocketAddr, tonic::transport::ServerTlsConfig),
    cancel: &CancellationToken,
) -> Result<
    (
        Arc<crate::federation::Federation>,
        grpc::GrpcRouter,
        TcpListener,
    ),
    ServeError,
> {
    let policy = engine.policy();
    let f = crate::federation::Federation::new(&policy, engine.metrics().jwks_fetches.clone());
    let router = grpc::federation_router(cfg, tls, engine, f.clone(), cancel)?;
    tracing::info!(%addr, issuers = policy.issuers.len(), "federation listener (platform tokens, no client certificate)");
    Ok((f, router, listener))
}

/// The approver console, when configured: only on an HTTP listener that is
/// HTTPS or on loopback (plain HTTP elsewhere would carry session cookies
/// and decisions in the clear).
fn console(
    cfg: &ServeConfig,
    engine: &Arc<Engine>,
    l: &Listeners,
) -> Result<Option<Arc<crate::console::Console>>, ServeError> {
    let Some(opts) = &cfg.console else {
        return Ok(None);
    };
    // `check_config` made sure of an HTTP listener that is HTTPS or on
    // loopback.
    let Some((_, addr)) = &l.http else {
        return Ok(None);
    };
    let tls = l.http_tls.is_some();
    let scheme = if tls { "https" } else { "http" };
    let public_url = match &opts.public_url {
        Some(u) => u.clone(),
        // No browser can reach `0.0.0.0`: links and the origin check
        // would name an address nobody opens.
        None if addr.ip().is_unspecified() => {
            return Err(ServeError::Config(format!(
                "the approver console needs --public-url when the HTTP listener is {addr} (how do people reach it?)"
            )));
        }
        None => format!("{scheme}://{addr}"),
    };
    let console = crate::console::Console::new(
        engine.clone(),
        crate::console::ConsoleConfig {
            public_url,
            oidc: opts.oidc.clone(),
            secure: tls,
        },
    )
    .map_err(ServeError::Config)?;
    tracing::info!(url = %format!("{}/ui/", console.public_url()), "approver console");
    Ok(Some(console))
}

fn log_ready(engine: &Engine, grpc_addr: SocketAddr, http_addr: Option<SocketAddr>, node: &str) {
    let (issuer, kid) = (engine.issuer(), engine.keys().current().active.kid.clone());
    match http_addr {
        Some(http_addr) => tracing::info!(%grpc_addr, %http_addr, %issuer, %kid, "broker ready"),
        None => tracing::info!(%grpc_addr, %issuer, %kid, "broker ready"),
    }
    tracing::info!(%node, "broker node name (its leadership terms on a shared store)");
}

/// Meta key: the `iss` every token in this store was issued under.
const ISSUER_META: &str = "issuer";

/// `iss`, stable for the life of the store: tokens issued before a restart
/// must verify after it, whatever port the broker comes back on. The first
/// start keeps the configured issuer (or, without one, the HTTP listener's
/// URL, where JWKS and discovery live); later starts use the stored one. A
/// configured issuer that differs from the stored one is refused unless
/// `allow_issuer_change` says to switch.
async fn issuer(
    cfg: &IssuerAsk,
    store: &dyn Store,
    grpc: SocketAddr,
    http: Option<SocketAddr>,
) -> Result<String, ServeError> {
    let stored = store
        .meta(ISSUER_META)
        .await?
        .and_then(|v| String::from_utf8(v).ok())
        .filter(|s| !s.is_empty());
    let chosen = match (&cfg.configured, stored) {
        (Some(c), Some(s)) if *c != s && !cfg.allow_change => {
            return Err(ServeError::IssuerChanged {
                stored: s,
                configured: c.clone(),
            });
        }
        (Some(c), _) => c.clone(),
        (None, Some(s)) => return Ok(s),
        (None, None) => match http {
            Some(a) if cfg.https => format!("https://{a}"),
            Some(a) => format!("http://{a}"),
            None => format!("https://{grpc}"),
        },
    };
    crate::store::batch::write_one(
        store,
        crate::store::Write::PutMeta(ISSUER_META.into(), chosen.as_bytes().to_vec()),
    )
    .await?;
    Ok(chosen)
}

/// [`issuer`], as the configuration asks.
async fn settle_issuer(
    cfg: &ServeConfig,
    store: &Arc<dyn Store>,
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
) -> Result<String, ServeError> {
    let asked = IssuerAsk {
        configured: cfg.issuer.clone(),
        allow_change: cfg.allow_issuer_change,
        https: cfg.http_tls,
    };
    issuer(&asked, store.as_ref(), grpc_addr, http_addr).await
}

/// What the configuration says of the issuer.
struct IssuerAsk {
    configured: Option<String>,
    allow_change: bool,
    https: bool,
}

/// The role brokers starting on one shared store take in turn, so only
/// one of them creates the first signing key and records the issuer.
const START_ROLE: &str = "start";
/// How long a starting broker holds [`START_ROLE`] at most.
const START_TERM: Duration = Duration::from_secs(30);

/// Wait for this broker's turn to start (at once on a store of its own).
async fn take_turn(store: &Arc<dyn Store>, node: &str) -> Result<(), ServeError> {
    let until = tokio::time::Instant::now() + 2 * START_TERM;
    loop {
        let term = u64::try_from(START_TERM.as_millis()).unwrap_or(u64::MAX);
        let mine = store.lead(START_ROLE, node, term).await?;
        if mine.is_some() {
            return Ok(());
        }
        tracing::debug!(node, "waiting for another broker to finish starting");
        if tokio::time::Instant::now() > until {
            return Err(ServeError::Internal(
                "another broker has been starting on this database for over a minute".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The store, the key ring, and this broker's name among the brokers of a
/// shared store, whose start-up turn it then holds (see [`take_turn`]).
async fn open_state(
    cfg: &ServeConfig,
) -> Result<(Arc<dyn Store>, Arc<KeyRing>, String), ServeError> {
    let store = open_store(cfg).await?;
    let kek = Kek::from_file(&cfg.kek_file)?;
    let node = crate::text::new_id("broker_", cfg.clock.now())
        .map_err(|e| ServeError::Internal(e.to_string()))?;
    take_turn(&store, &node).await?;
    // It may write the first key and the KEK check value.
    let ring =
        Arc::new(KeyRing::load_or_create(store.as_ref(), &kek, cfg.alg, cfg.clock.now()).await?);
    Ok((store, ring, node))
}

/// Where `portcullis store copy` reads or writes: a PostgreSQL URL, or a
/// sled data directory (`sled:DIR` or just `DIR`).
async fn open_named(spec: &str, ca_file: Option<&Path>) -> Result<Arc<dyn Store>, ServeError> {
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        return Ok(Arc::new(
            PgStore::connect(&PgOptions {
                url: spec.to_owned(),
                ca_file: ca_file.map(Path::to_path_buf),
                pool_size: 4,
            })
            .await?,
        ));
    }
    let dir = spec.strip_prefix("sled:").unwrap_or(spec);
    if dir.is_empty() {
        return Err(ServeError::Config(
            "name a sled data directory or a postgres:// URL".into(),
        ));
    }
    Ok(Arc::new(SledStore::open_with(
        Path::new(dir),
        SledOptions::default(),
    )?))
}

/// Copy every record of the store `from` names into the empty store `to`
/// names (`portcullis store copy`); both must be quiet.
pub async fn copy_store(
    from: &str,
    to: &str,
    ca_file: Option<&Path>,
) -> Result<crate::store::copy::Copied, ServeError> {
    let source = open_named(from, ca_file).await?;
    let target = open_named(to, ca_file).await?;
    Ok(crate::store::copy::copy(source.as_ref(), target.as_ref()).await?)
}

/// The store `cfg` names: PostgreSQL, sled in its data directory, or memory.
async fn open_store(cfg: &ServeConfig) -> Result<Arc<dyn Store>, ServeError> {
    if cfg.in_memory {
        return Ok(Arc::new(MemStore::new()));
    }
    if let Some(opts) = cfg.database.clone() {
        return Ok(Arc::new(PgStore::connect(&opts).await?));
    }
    // Opening sled reads and recovers its log: blocking file work.
    let (dir, opts) = (cfg.data_dir.clone(), cfg.sled);
    let store = tokio::task::spawn_blocking(move || SledStore::open_with(&dir, opts))
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))??;
    Ok(Arc::new(store))
}

/// The HTTP listener, when one is asked for.
/// Bind every listener `cfg` asks for.
async fn bind_all(
    cfg: &ServeConfig,
    grpc_tls: tonic::transport::ServerTlsConfig,
    http_tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<Listeners, ServeError> {
    let (grpc, grpc_addr) = bind(cfg.listen).await?;
    Ok(Listeners {
        grpc,
        grpc_addr,
        grpc_tls,
        http: bind_http(cfg.http_listen).await?,
        http_tls,
        health: bind_http(cfg.health_listen).await?,
        federation: match cfg.federation_listen {
            Some(a) => {
                let (l, addr) = bind(a).await?;
                Some((l, addr, grpc::federation_tls(cfg)?))
            }
            None => None,
        },
    })
}

impl Listeners {
    fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(_, a)| *a)
    }
}

async fn bind_http(
    addr: Option<SocketAddr>,
) -> Result<Option<(TcpListener, SocketAddr)>, ServeError> {
    match addr {
        Some(a) => Ok(Some(bind(a).await?)),
        None => Ok(None),
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let err = |e: std::io::Error| ServeError::Listen {
        addr,
        detail: e.to_string(),
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// The start itself is part of the trail (durable with the first commit).
fn record_start(engine: &Engine, cfg: &ServeConfig) -> Result<(), ServeError> {
    let issuers = engine.policy().issuers.len();
    if issuers > 0 && cfg.federation_listen.is_none() {
        tracing::warn!(
            issuers,
            "the policy has [[issuer]] tables, but no --federation-listen: no workload can sign in with their tokens"
        );
    }
    let ring = engine.keys();
    let policy = cfg.policy.display().to_string();
    let mut entries = vec![Entry::ok(
        SYSTEM_ACTOR,
        Action::PolicyLoaded,
        &policy,
        &[],
        "start",
    )];
    if let Some(kid) = ring.created() {
        entries.push(Entry::ok(
            SYSTEM_ACTOR,
            Action::KeyCreated,
            kid,
            &[],
            "first signing key",
        ));
    }
    engine
        .note(entries)
        .map_err(|e| ServeError::Internal(e.to_string()))
}

/// Every background loop, tracked for shutdown.
fn spawn_tasks(
    tracker: &TaskTracker,
    engine: &Arc<Engine>,
    (cfg, console_url): (&ServeConfig, Option<String>),
    rotate_wake: Arc<tokio::sync::Notify>,
    health: tonic_health::server::HealthReporter,
    node: &str,
    cancel: &CancellationToken,
) {
    let c = || cancel.clone();
    tracker.spawn(tasks::rotate(
        engine.clone(),
        cfg.rotation,
        rotate_wake,
        c(),
    ));
    tracker.spawn(tasks::health(engine.clone(), health, c()));
    if cfg.expiry_task {
        tracker.spawn(engine.clone().run_expiry(c()));
    }
    if let Some(keep) = cfg.retention {
        tracker.spawn(tasks::retention(engine.clone(), keep, c()));
    }
    tracker.spawn(tasks::checkpoints(
        engine.clone(),
        cfg.audit_retention,
        tasks::Witness::of(cfg),
        c(),
    ));
    tracker.spawn(tasks::count_gauges(engine.clone()));
    tracker.spawn(engine.clone().end_logins(c()));
    tracker.spawn(tasks::reconcile_logins(engine.clone(), c()));
    // On every store: one of its own grants leadership at once and has
    // no news from others (`hear` returns).
    tracker.spawn(tasks::lead(engine.clone(), node.to_owned(), c()));
    tracker.spawn(tasks::hear(engine.clone(), c()));
    if let Some(rx) = engine.take_notifications() {
        let e = engine.clone();
        let stats = engine.notifier().stats().clone();
        tracker.spawn(crate::notify::run(
            rx,
            stats,
            move || e.policy(),
            console_url,
            c(),
        ));
    }
    tracker.spawn(tasks::reload_policy(
        engine.clone(),
        cfg.policy.clone(),
        cfg.policy_poll,
        c(),
    ));
}

//! Reaching the database: the connection string, TLS, the pool, the
//! listener for other brokers' news, and the time limit on every call.
//!
//! # TLS
//! rustls with full verification (certificate chain and host name, what
//! libpq calls `sslmode=verify-full`) whenever TLS is used: against
//! `--database-ca` when given, else the system roots. `sslmode=prefer` (the
//! libpq default) is kept only for a database on the loopback interface or
//! a Unix socket; anywhere else it becomes `require`, so a broker never
//! falls back to plaintext across a network by accident. `sslmode=disable`
//! is honoured, with a warning when the database is not local.
//!
//! # Time
//! Every read gives up after [`CALL_TIMEOUT`] as unavailable: a database
//! that stopped answering fails the operation, it does not hang it. The
//! committer's group transactions have no time limit (`statement_timeout
//! = 0`): a commit waiting for a synchronous standby must not be reported
//! as failed while it may still succeed; a lost connection fails them
//! (TCP keepalive and `tcp_user_timeout` notice it).

use std::future::Future;
use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::broadcast;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{AsyncMessage, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::pg_err;
use crate::store::StoreError;

/// The channel every broker listens on and notifies.
pub const CHANNEL: &str = "portcullis";
/// Longest a single store call may take before it fails as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a caller waits for a pooled connection or a new one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts to re-establish the listener.
const RELISTEN: Duration = Duration::from_secs(1);

/// How to reach the database. (`Debug` leaves the URL out: it may hold a
/// password.)
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/db?sslmode=…` (libpq URL or key=value).
    pub url: String,
    /// PEM bundle of the CAs that may sign the server's certificate.
    pub ca_file: Option<std::path::PathBuf>,
    /// Connections in the pool.
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// Parsed connection settings and the TLS connector for them.
#[derive(Clone)]
pub(crate) struct Target {
    pub config: Config,
    pub tls: MakeRustlsConnect,
}

fn bad_url(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Refused(format!("database URL: {detail}"))
}

fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

impl Target {
    pub(crate) fn parse(opts: &PgOptions) -> Result<Self, StoreError> {
        let mut config = Config::from_str(&opts.url).map_err(bad_url)?;
        // `hostaddr` is where the connection really goes.
        let local = config.get_hosts().iter().all(is_local)
            && config.get_hostaddrs().iter().all(|a| a.is_loopback());
        match config.get_ssl_mode() {
            SslMode::Prefer if !local => {
                config.ssl_mode(SslMode::Require);
            }
            SslMode::Disable if !local => {
                tracing::warn!(
                    "sslmode=disable: the database connection is not encrypted and the database is not on this host"
                );
            }
            _ => {}
        }
        if config.get_application_name().is_none() {
            config.application_name("portcullis");
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        // A database that vanishes without a reset (a failover, a cut
        // cable) is noticed in seconds, not after the kernel's defaults.
        config.keepalives_idle(Duration::from_secs(5));
        config.tcp_user_timeout(CALL_TIMEOUT);
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(tls_config(opts.ca_file.as_deref())?),
        })
    }
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, StoreError> {
    crate::tls::client_config(ca_file, "database").map_err(|e| match ca_file {
        Some(_) => bad_url(e),
        None => StoreError::Refused(e),
    })
}

impl Target {
    /// The settings of a connection that commits asynchronously unless a
    /// transaction says otherwise (the committer's groups set their
    /// durable level; see the module docs of `postgres` for why that is
    /// safe).
    pub(super) fn committing(&self) -> Config {
        let mut config = self.config.clone();
        let options = match config.get_options() {
            Some(o) => format!("{o} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_owned(),
        };
        config.options(&options);
        config
    }
}

/// The pool the reads use, its connections set up as
/// [`Target::committing`] says.
pub(super) fn pool(target: &Target, size: usize) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        target.committing(),
        target.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Refused(format!("database pool: {e}")))
}

/// `fut`, or unavailable after [`CALL_TIMEOUT`].
pub(super) async fn timed<T>(
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable("database call timed out".into())))
}

/// `LISTEN` on [`CHANNEL`] and forward every payload to `tx`, reconnecting
/// after any failure. After each (re)connect it sends `*`: whatever was
/// announced while nobody listened may have changed.
pub(super) async fn listen(target: Target, tx: broadcast::Sender<String>) {
    loop {
        match target.config.connect(target.tls.clone()).await {
            Ok((client, mut connection)) => {
                let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(Ok(message)) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        if let AsyncMessage::Notification(n) = message
                            && ntx.send(n.payload().to_owned()).is_err()
                        {
                            return;
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        let _ = tx.send("*".to_owned());
                        while let Some(payload) = nrx.recv().await {
                            let _ = tx.send(payload);
                        }
                        tracing::warn!("database listener lost; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %pg_err(e), "database LISTEN failed"),
                }
                driver.abort();
            }
            Err(e) => tracing::debug!(error = %pg_err(e), "database listener cannot connect"),
        }
        tokio::time::sleep(RELISTEN).await;
    }
}

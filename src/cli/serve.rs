//! `serve`: its flags, the resolved server configuration (creating the dev
//! setup when asked), the data-directory lock, and the dev start-up banner.

use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;

use super::exit::{Failure, failure, usage};
use crate::dev::DevDir;
use crate::keys::SigningAlg;
use crate::server::{ConsoleOptions, OidcConfig, ServeConfig};

/// `serve` flags (each also from `PORTCULLIS_*`).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Zero-config dev mode: dev CA, identities, policy and KEK are created
    /// in the data directory if missing.
    #[arg(long)]
    pub dev: bool,
    /// Data directory (dev mode keeps everything there; default
    /// `./portcullis-dev` with `--dev`).
    #[arg(long, env = "PORTCULLIS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC (mTLS) listen address; port 0 picks a free port.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: std::net::SocketAddr,
    /// HTTP listen address (JWKS, OIDC discovery, health, metrics).
    #[arg(long, env = "PORTCULLIS_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: std::net::SocketAddr,
    /// A listener of its own for `/healthz` and `/metrics` (plain HTTP, a
    /// few slots of its own): point probes here so they answer while the
    /// HTTP listener is busy or flooded.
    #[arg(long, env = "PORTCULLIS_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,
    /// Where workloads without a client certificate sign in with their
    /// platform's token (GitHub Actions, Kubernetes, JWT-SVIDs; the
    /// policy's `[[issuer]]` tables): gRPC over server-authenticated TLS.
    /// With --dev: the port after --listen's.
    #[arg(long, env = "PORTCULLIS_FEDERATION_LISTEN")]
    pub federation_listen: Option<std::net::SocketAddr>,
    /// Open connections one address may hold on the HTTP listener (of 512);
    /// raise it when every browser reaches the broker through one proxy.
    #[arg(long, env = "PORTCULLIS_HTTP_CONNECTIONS_PER_PEER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub http_connections_per_peer: u32,
    /// Server certificate (PEM). Dev default: `<data-dir>/server.pem`.
    #[arg(long, env = "PORTCULLIS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server key (PEM). Dev default: `<data-dir>/server-key.pem`.
    #[arg(long, env = "PORTCULLIS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle client certificates must chain to. Dev default: `<data-dir>/ca.pem`.
    #[arg(long, env = "PORTCULLIS_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Policy file. Dev default: `<data-dir>/policy.toml`.
    #[arg(long, env = "PORTCULLIS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Key-encryption key file (64 hex characters). Dev default: `<data-dir>/kek`.
    #[arg(long, env = "PORTCULLIS_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Serve the approver console under `/ui/` on the HTTP listener
    /// (always with --dev). Outside loopback it needs --http-tls.
    #[arg(long, env = "PORTCULLIS_CONSOLE")]
    pub console: bool,
    /// The base URL people reach the HTTP listener at (console links,
    /// the OpenID redirect, links in notifications). Default
    /// `http(s)://<http-listen>`.
    #[arg(long, env = "PORTCULLIS_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Console sign-in with this OpenID Connect provider (issuer URL).
    #[arg(long, env = "PORTCULLIS_OIDC_ISSUER", requires = "oidc_client_id")]
    pub oidc_issuer: Option<String>,
    /// The console's client id at the provider.
    #[arg(long, env = "PORTCULLIS_OIDC_CLIENT_ID", requires = "oidc_issuer")]
    pub oidc_client_id: Option<String>,
    /// File holding the console's client secret (or set
    /// PORTCULLIS_OIDC_CLIENT_SECRET).
    #[arg(long, env = "PORTCULLIS_OIDC_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// The ID-token claim naming the person: policy groups list them as
    /// `oidc:<value>`. `email` must be verified by the provider.
    #[arg(long, env = "PORTCULLIS_OIDC_CLAIM", default_value = "email")]
    pub oidc_claim: String,
    /// The provider's name on the sign-in button.
    #[arg(
        long,
        env = "PORTCULLIS_OIDC_NAME",
        default_value = "your identity provider"
    )]
    pub oidc_name: String,
    /// Issuer URL for `iss`. Default: the one recorded in the data
    /// directory, or on the first start `http://<http-listen>`; it then
    /// stays the same across restarts.
    #[arg(long, env = "PORTCULLIS_ISSUER")]
    pub issuer: Option<String>,
    /// Append every signed audit checkpoint to this file, kept where the
    /// store's writer cannot rewrite it; `audit verify --witness` checks it.
    #[arg(long, env = "PORTCULLIS_AUDIT_WITNESS")]
    pub audit_witness: Option<PathBuf>,
    /// POST every signed audit checkpoint to this URL too (another system's
    /// append-only log), with the webhooks' retries.
    #[arg(long, env = "PORTCULLIS_AUDIT_WITNESS_URL")]
    pub audit_witness_url: Option<String>,
    /// Open requests (pending, approved and unclaimed) one identity may have.
    #[arg(long, env = "PORTCULLIS_MAX_OPEN_REQUESTS", default_value_t = 20)]
    pub max_open_requests: usize,
    /// `WatchRequest` streams one identity may hold at once.
    #[arg(long, env = "PORTCULLIS_MAX_WATCHES", default_value_t = 64)]
    pub max_watches: usize,
    /// `ExchangeToken` calls one identity may make a second (as many at
    /// once); 0: no limit.
    #[arg(
        long,
        env = "PORTCULLIS_MAX_EXCHANGES_PER_SECOND",
        default_value_t = 100
    )]
    pub max_exchanges_per_second: u32,
    /// Leases one lease may hand on by token exchange over its life (a
    /// revocation ends a bounded subtree); 0: no limit.
    #[arg(
        long,
        env = "PORTCULLIS_MAX_CHILDREN_PER_LEASE",
        default_value_t = 1000
    )]
    pub max_children_per_lease: usize,
    /// Accept an --issuer that differs from the one recorded in the data
    /// directory (every token issued before stops verifying).
    #[arg(long)]
    pub change_issuer: bool,
    /// Algorithm for new signing keys.
    #[arg(
        long,
        env = "PORTCULLIS_SIGNING_ALG",
        value_enum,
        default_value = "es256"
    )]
    pub alg: AlgArg,
    /// Keep audit records at least this long (e.g. `400d`); older ones are
    /// compacted up to a signed checkpoint. Default: keep everything.
    #[arg(long, env = "PORTCULLIS_AUDIT_RETENTION", value_parser = humantime::parse_duration)]
    pub audit_retention: Option<Duration>,
    /// How long a signing key signs before the next one takes over.
    #[arg(long, env = "PORTCULLIS_ROTATION_PERIOD", default_value = "24h", value_parser = humantime::parse_duration)]
    pub rotation_period: Duration,
    /// Delete leases and requests this long after they ended (e.g. `90d`);
    /// default: keep them. The deletion is recorded in the audit trail.
    #[arg(long, env = "PORTCULLIS_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Serve the HTTP listener (JWKS, discovery, metrics) over TLS with the
    /// server certificate. Recommended outside loopback development.
    #[arg(long, env = "PORTCULLIS_HTTP_TLS")]
    pub http_tls: bool,
    /// Keep all state in memory: nothing survives a restart and nothing is
    /// fsynced. For benchmarks and experiments only.
    #[arg(long)]
    pub in_memory: bool,
    /// Memory for the embedded store's page cache (e.g. `32MiB`, `1GiB`; at
    /// most half of this machine's memory). The store itself may be far
    /// larger: what is not cached is read back from the OS page cache when
    /// needed.
    #[arg(long, env = "PORTCULLIS_CACHE_CAPACITY", default_value = "32MiB", value_parser = parse_bytes)]
    pub cache_capacity: u64,
    /// Keep state in PostgreSQL instead of the embedded store: every broker
    /// given the same database serves the same leases, requests, keys and
    /// trail (`postgres://user:pass@host:5432/db?sslmode=require`). TLS is
    /// verified in full; see docs/operations.md.
    #[arg(
        long,
        env = "PORTCULLIS_DATABASE_URL",
        hide_env_values = true,
        conflicts_with = "in_memory"
    )]
    pub database_url: Option<String>,
    /// PEM bundle of the CAs the database's certificate must chain to
    /// (default: the system's roots).
    #[arg(long, env = "PORTCULLIS_DATABASE_CA", requires = "database_url")]
    pub database_ca: Option<PathBuf>,
    /// Connections this broker keeps to the database.
    #[arg(long, env = "PORTCULLIS_DATABASE_POOL", default_value_t = 16)]
    pub database_pool: usize,
}

/// `N`, `NKiB`, `NMiB` or `NGiB` (also `KB`/`MB`/`GB`, as powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 128MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "kb" | "k" => 1 << 10,
        "mib" | "mb" | "m" => 1 << 20,
        "gib" | "gb" | "g" => 1 << 30,
        _ => return Err(format!("`{s}`: unit must be KiB, MiB or GiB")),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes < (1 << 20) {
        return Err(format!("`{s}` is below the 1MiB minimum"));
    }
    Ok(bytes)
}

/// `--alg` values (the command line's names for [`SigningAlg`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AlgArg {
    /// ECDSA P-256 with SHA-256 (default; what every JOSE library verifies).
    Es256,
    /// Ed25519.
    EdDsa,
}

impl From<AlgArg> for SigningAlg {
    fn from(a: AlgArg) -> Self {
        match a {
            AlgArg::Es256 => Self::Es256,
            AlgArg::EdDsa => Self::EdDsa,
        }
    }
}

fn prepare_dev(args: &ServeArgs) -> Result<Option<DevDir>, Failure> {
    if !args.dev {
        return Ok(None);
    }
    let dir = DevDir::new(
        args.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("portcullis-dev")),
    );
    let created = dir.prepare().map_err(|e| failure(e.to_string()))?;
    if created {
        tracing::info!(dir = %dir.root.display(), "created dev CA, identities, policy and key-encryption key");
    }
    Ok(Some(dir))
}

/// `--federation-listen`; with `--dev`, the port after the gRPC one (0
/// stays 0, for tests that let the system pick).
fn federation_listen(args: &ServeArgs) -> Option<std::net::SocketAddr> {
    args.federation_listen.or_else(|| {
        let mut a = args.listen;
        a.set_port(
            a.port()
                .checked_add(1)
                .filter(|_| a.port() != 0)
                .unwrap_or(0),
        );
        args.dev.then_some(a)
    })
}

/// Resolve `serve` flags into a config, creating the dev setup when asked.
pub fn serve_config(args: &ServeArgs) -> Result<(ServeConfig, Option<DevDir>), Failure> {
    let dev = prepare_dev(args)?;
    let need = |v: &Option<PathBuf>, dev_name: &str, flag: &str| -> Result<PathBuf, Failure> {
        match (v, &dev) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(d)) => Ok(d.path(dev_name)),
            (None, None) => Err(usage(format!("--{flag} is required without --dev"))),
        }
    };
    let data_dir = match (&args.data_dir, &dev) {
        (_, Some(d)) => d.data(),
        (Some(p), None) => p.clone(),
        (None, None) => return Err(usage("--data-dir is required without --dev")),
    };
    let mut cfg = ServeConfig::new(
        data_dir,
        need(&args.tls_cert, "server.pem", "tls-cert")?,
        need(&args.tls_key, "server-key.pem", "tls-key")?,
        need(&args.client_ca, "ca.pem", "client-ca")?,
        need(&args.policy, "policy.toml", "policy")?,
        need(&args.kek_file, "kek", "kek-file")?,
    );
    cfg.listen = args.listen;
    cfg.http_listen = Some(args.http_listen);
    cfg.health_listen = args.health_listen;
    cfg.federation_listen = federation_listen(args);
    cfg.conn_limits.http_connections_per_peer =
        usize::try_from(args.http_connections_per_peer).unwrap_or(usize::MAX);
    cfg.issuer = args.issuer.clone();
    cfg.allow_issuer_change = args.change_issuer;
    cfg.audit_witness = args.audit_witness.clone();
    cfg.audit_witness_url = args.audit_witness_url.clone();
    cfg.limits = limits(args);
    cfg.alg = args.alg.into();
    cfg.in_memory = args.in_memory;
    cfg.sled.cache_capacity = args.cache_capacity;
    cfg.database = args
        .database_url
        .clone()
        .map(|url| crate::server::PgOptions {
            url,
            ca_file: args.database_ca.clone(),
            pool_size: args.database_pool,
        });
    if args.rotation_period < Duration::from_secs(3600) {
        return Err(usage(
            "--rotation-period must be at least 1h (a next key is pre-published 10m ahead)",
        ));
    }
    cfg.rotation.period = args.rotation_period;
    cfg.audit_retention = args.audit_retention;
    cfg.http_tls = args.http_tls;
    cfg.retention = args.retention;
    cfg.console = console_options(args)?;
    Ok((cfg, dev))
}

/// The per-caller bounds from the flags.
fn limits(args: &ServeArgs) -> crate::server::Limits {
    crate::server::Limits {
        open_requests_per_identity: args.max_open_requests,
        watches_per_identity: args.max_watches,
        children_per_lease: args.max_children_per_lease,
        exchanges: crate::server::Rate {
            burst: args.max_exchanges_per_second,
            per_minute: args.max_exchanges_per_second.saturating_mul(60),
        },
        ..crate::server::Limits::default()
    }
}

/// The console's settings from the flags (`None`: no console).
fn console_options(args: &ServeArgs) -> Result<Option<ConsoleOptions>, Failure> {
    let oidc = match (&args.oidc_issuer, &args.oidc_client_id) {
        (Some(issuer), Some(client_id)) => {
            let client_secret = match (
                &args.oidc_client_secret_file,
                std::env::var("PORTCULLIS_OIDC_CLIENT_SECRET"),
            ) {
                (Some(p), _) => std::fs::read_to_string(p)
                    .map_err(|e| {
                        failure(format!("--oidc-client-secret-file {}: {e}", p.display()))
                    })?
                    .trim()
                    .to_owned(),
                (None, Ok(s)) => s,
                (None, Err(_)) => {
                    return Err(usage(
                        "--oidc-issuer needs --oidc-client-secret-file or PORTCULLIS_OIDC_CLIENT_SECRET",
                    ));
                }
            };
            let c = OidcConfig {
                issuer: issuer.clone(),
                client_id: client_id.clone(),
                client_secret,
                claim: args.oidc_claim.clone(),
                display_name: args.oidc_name.clone(),
            };
            c.check().map_err(usage)?;
            Some(c)
        }
        _ => None,
    };
    if !(args.console || args.dev || oidc.is_some()) {
        return Ok(None);
    }
    Ok(Some(ConsoleOptions {
        public_url: args.public_url.clone(),
        oidc,
    }))
}

/// Held while a broker runs on a data directory: a second `serve` on the
/// same directory stops at once with a clear message. Released when dropped
/// (or when the process ends, however it ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// The name of the lock file (holding the broker's pid) in the directory.
pub const LOCK_FILE: &str = "portcullis.pid";

/// Take the data directory for this process: the dev directory with
/// `--dev`, else `--data-dir`. Nothing to take for `--in-memory`.
pub fn lock_data_dir(
    cfg: &ServeConfig,
    dev: Option<&DevDir>,
) -> Result<Option<DataDirLock>, Failure> {
    if cfg.in_memory || cfg.database.is_some() {
        return Ok(None);
    }
    let dir = dev.map_or(cfg.data_dir.as_path(), |d| d.root.as_path());
    lock_dir(dir).map(Some)
}

fn lock_dir(dir: &Path) -> Result<DataDirLock, Failure> {
    let io = |e: std::io::Error| failure(format!("`{}`: {e}", dir.join(LOCK_FILE).display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            return Err(failure(format!(
                "another broker is already running on {}{holder}",
                dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(DataDirLock { _file: file })
}

/// What `serve --dev` prints once it is listening.
pub fn dev_banner(
    dir: &DevDir,
    grpc: std::net::SocketAddr,
    http: Option<std::net::SocketAddr>,
    console: Option<&str>,
) -> String {
    let d = dir.root.display();
    let http = http.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let console = console.unwrap_or("-");
    let mut s = format!(
        "portcullis dev broker ready\n  gRPC (mTLS)  {grpc}\n  HTTP         http://{http}  (/.well-known/jwks.json, /healthz, /metrics)\n  console      {console}  (sign in: ui login --as approver, below)\n  data         {d}\n\nIn another terminal:\n  export PORTCULLIS_DEV_DIR={d}\n"
    );
    let bin = "cargo run --release --";
    for line in [
        format!(
            "{bin} token request --scope orders.read --reason 'read orders'   # auto: granted at once"
        ),
        format!("{bin} lease list"),
        format!(
            "{bin} token request --scope orders.admin --reason 'fix a bad row'   # approval: parked"
        ),
        format!(
            "{bin} policy explain --identity {} --scope orders.admin",
            crate::dev::WORKLOAD
        ),
        format!("{bin} ui login --as approver   # a one-time link to decide it in the browser"),
    ] {
        s.push_str("  ");
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str(&format!(
        "Identities: --as workload ({}), approver ({}), admin ({})\n",
        crate::dev::WORKLOAD,
        crate::dev::APPROVER,
        crate::dev::ADMIN
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_read_with_binary_units_and_a_floor() {
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("2048 KiB"), Ok(2 << 20));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        for bad in ["", "MiB", "12parsecs", "1KiB", "99999999999999GiB", "-1MiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_second_lock_on_the_same_directory_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let held = lock_dir(tmp.path()).unwrap();
        let e = lock_dir(tmp.path()).unwrap_err();
        assert_eq!(e.code, super::super::exit::FAILURE);
        assert!(
            e.message.contains("another broker is already running on")
                && e.message.contains(&format!("(pid {})", std::process::id())),
            "{}",
            e.message
        );
        drop(held);
        lock_dir(tmp.path()).unwrap();
    }

    #[test]
    fn the_banner_lists_metrics_and_the_console() {
        let dir = DevDir::new("/tmp/x");
        let console = Some("http://127.0.0.1:2/ui/");
        let b = dev_banner(&dir, "127.0.0.1:1".parse().unwrap(), None, console);
        assert!(b.contains("/metrics"), "{b}");
        assert!(b.contains("console      http://127.0.0.1:2/ui/"), "{b}");
        assert!(b.contains("ui login --as approver"), "{b}");
    }
}

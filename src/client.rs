//! Connecting to a broker as a client: mTLS from explicit files or from a
//! dev directory (`--dev-dir`, `--as workload|approver|admin`). The client
//! side speaks only through the generated gRPC types; the few conversions
//! it needs live in [`convert`].

use std::error::Error as StdError;
use std::path::PathBuf;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::dev::{As, DevDir};

/// How to reach and authenticate to the broker. Every flag is global: it is
/// accepted before or after the subcommand.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Connection (every command)")]
pub struct ClientOpts {
    /// Broker gRPC address (`host:port` or `https://host:port`). With
    /// `--dev-dir`, defaults to the address the dev broker recorded.
    #[arg(long, global = true, env = "PORTCULLIS_SERVER")]
    pub server: Option<String>,
    /// Client certificate (PEM) whose URI SAN is your identity.
    #[arg(long, global = true, env = "PORTCULLIS_CERT")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, env = "PORTCULLIS_KEY")]
    pub key: Option<PathBuf>,
    /// CA bundle that signed the broker's certificate (PEM).
    #[arg(long, global = true, env = "PORTCULLIS_CA")]
    pub ca: Option<PathBuf>,
    /// A `serve --dev` data directory: take the address, CA and a dev
    /// identity from it.
    #[arg(long, global = true, env = "PORTCULLIS_DEV_DIR")]
    pub dev_dir: Option<PathBuf>,
    /// The broker's federation listener (`host:port` or `https://…`), for
    /// `--id-token` and `--claim-secret` calls (no client certificate).
    /// With `--dev-dir`, defaults to the address the dev broker recorded.
    #[arg(long, global = true, env = "PORTCULLIS_FEDERATION_SERVER")]
    pub federation_server: Option<String>,
    /// Which dev identity to act as (with `--dev-dir`).
    #[arg(long = "as", global = true, value_enum, default_value = "workload")]
    pub as_: As,
}

/// What a TLS failure usually means, for people.
pub const TLS_HINT: &str = "the TLS handshake failed: check that --cert/--key are a client certificate from the broker's CA and have not expired, and that --ca signed the broker's certificate";

/// What a connection the broker closed under a call usually means: with
/// TLS 1.3 the broker checks the client certificate after the client has
/// finished its side of the handshake, so a refused certificate surfaces as
/// a closed connection (or an alert) on the first call.
pub const CLOSED_HINT: &str = "the broker closed the connection; if every call fails like this, it is refusing the client certificate: check that --cert/--key are a client certificate from the broker's CA and have not expired";

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Missing or unusable connection settings.
    #[error("{0}")]
    Usage(String),
    /// Nothing accepted the connection.
    #[error("no broker answering at {server} (is `portcullis serve` running?)")]
    Refused {
        /// Address.
        server: String,
    },
    /// The TLS handshake failed (certificates, CA, expiry).
    #[error("cannot connect to {server}: {detail} ({TLS_HINT})")]
    Handshake {
        /// Address.
        server: String,
        /// What happened.
        detail: String,
    },
    /// Any other connection failure.
    #[error("cannot connect to {server}: {detail}")]
    Connect {
        /// Address.
        server: String,
        /// What happened.
        detail: String,
    },
}

/// What kind of transport failure an error (or one of its sources) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The TCP connection was refused: nothing listens there.
    Refused,
    /// TLS said no: a rustls error in the chain, or the `InvalidData` I/O
    /// error tokio-rustls turns every TLS failure (alerts included) into,
    /// whose type h2 drops on the way up.
    Tls,
    /// The peer closed or reset the connection under a call.
    Closed,
    /// Anything else.
    Other,
}

/// The error and its sources, outermost first. An `io::Error` wrapping a
/// custom error is followed by that error (`io::Error::source` skips it).
fn chain<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(cur) = next {
        out.push(cur);
        next = match cur
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => cur.source(),
        };
    }
    out
}

/// Classify a transport failure by the types and kinds in its source chain
/// (never by its text).
pub fn fault(e: &(dyn StdError + 'static)) -> Fault {
    use std::io::ErrorKind as K;
    let links = chain(e);
    if links.iter().any(|l| l.is::<rustls::Error>()) {
        return Fault::Tls;
    }
    let kinds: Vec<K> = links
        .iter()
        .filter_map(|l| l.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind)
        .collect();
    if kinds.contains(&K::ConnectionRefused) {
        return Fault::Refused;
    }
    if kinds.contains(&K::InvalidData) {
        return Fault::Tls;
    }
    let closed = kinds.iter().any(|k| {
        matches!(
            k,
            K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof
        )
    }) || links.iter().any(|l| {
        l.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_canceled() || h.is_closed() || h.is_incomplete_message())
    });
    if closed { Fault::Closed } else { Fault::Other }
}

/// Render an error chain as `outer: inner: …`, leaving out a source whose
/// message adds nothing (empty, or already said earlier in the chain).
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    render_sources(&e.to_string(), e)
}

/// Like [`error_chain`], with `head` standing in for `e`'s own message.
pub fn render_sources(head: &str, e: &(dyn StdError + 'static)) -> String {
    let mut out = head.to_owned();
    for link in chain(e).into_iter().skip(1) {
        let msg = link.to_string();
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        out.push_str(": ");
        out.push_str(&msg);
    }
    out
}

fn read(p: &PathBuf, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(p)
        .map_err(|e| ClientError::Usage(format!("cannot read {what} `{}`: {e}", p.display())))
}

impl ClientOpts {
    /// The broker address: `--server`, else what the dev broker recorded.
    fn address(&self, dev: Option<&DevDir>) -> Result<String, ClientError> {
        match (&self.server, dev) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(d)) => Ok(d
                .endpoints()
                .map_err(|e| ClientError::Usage(e.to_string()))?
                .grpc
                .to_string()),
            (None, None) => Err(ClientError::Usage(
                "no broker address: pass --server or --dev-dir (or set PORTCULLIS_DEV_DIR)".into(),
            )),
        }
    }

    /// Client identity and trust anchors, from flags or the dev directory.
    fn tls(&self, dev: Option<&DevDir>) -> Result<ClientTlsConfig, ClientError> {
        let (dev_cert, dev_key) = dev.map(|d| d.identity_files(self.as_)).unzip();
        let pick = |explicit: &Option<PathBuf>, from_dev: Option<PathBuf>, what: &str| {
            explicit
                .clone()
                .or(from_dev)
                .ok_or_else(|| ClientError::Usage(format!("no {what}: pass --{what} or --dev-dir")))
        };
        let cert = pick(&self.cert, dev_cert, "cert")?;
        let key = pick(&self.key, dev_key, "key")?;
        let ca = pick(&self.ca, dev.map(|d| d.path("ca.pem")), "ca")?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca, "CA bundle")?))
            .identity(Identity::from_pem(
                read(&cert, "certificate")?,
                read(&key, "key")?,
            )))
    }

    /// Connect (mTLS) to the broker. One channel serves every client of an
    /// invocation.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        let dev = self.dev_dir.as_ref().map(DevDir::new);
        let server = self.address(dev.as_ref())?;
        let tls = self.tls(dev.as_ref())?;
        open(server, tls).await
    }

    /// Connect to the broker's federation listener: the broker is
    /// authenticated (by `--ca`, the dev CA, or the system's roots), the
    /// caller is not: its platform token or claim secret says who it is.
    pub async fn connect_federation(&self) -> Result<Channel, ClientError> {
        let dev = self.dev_dir.as_ref().map(DevDir::new);
        let server = match (&self.federation_server, &dev) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => d
                .endpoints()
                .map_err(|e| ClientError::Usage(e.to_string()))?
                .federation
                .ok_or_else(|| {
                    ClientError::Usage(
                        "the dev broker has no federation listener (restart `serve --dev`)".into(),
                    )
                })?
                .to_string(),
            (None, None) => {
                return Err(ClientError::Usage(
                    "no federation listener address: pass --federation-server or --dev-dir".into(),
                ));
            }
        };
        // A platform token and a claim secret never travel in the clear.
        if server.contains("://") && !server.starts_with("https://") {
            return Err(ClientError::Usage(format!(
                "--federation-server `{server}`: only https:// (or host:port)"
            )));
        }
        let tls = match self.ca.clone().or(dev.map(|d| d.path("ca.pem"))) {
            Some(ca) => ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(&ca, "CA bundle")?)),
            None => ClientTlsConfig::new().ca_certificates(system_roots()),
        };
        open(server, tls).await
    }
}

/// The system's trust anchors, as PEM for tonic.
fn system_roots() -> Vec<Certificate> {
    use base64::Engine as _;
    rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|c| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
            let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(&String::from_utf8_lossy(line));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
            Certificate::from_pem(pem)
        })
        .collect()
}

/// A channel to `server` with `tls`.
async fn open(server: String, tls: ClientTlsConfig) -> Result<Channel, ClientError> {
    let url = if server.contains("://") {
        server.clone()
    } else {
        format!("https://{server}")
    };
    let failed = |e: &(dyn StdError + 'static)| {
        let (server, detail) = (server.clone(), error_chain(e));
        match fault(e) {
            Fault::Refused => ClientError::Refused { server },
            Fault::Tls => ClientError::Handshake { server, detail },
            Fault::Closed | Fault::Other => ClientError::Connect { server, detail },
        }
    };
    Endpoint::from_shared(url)
        .map_err(|e| failed(&e))?
        .tls_config(tls)
        .map_err(|e| failed(&e))?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| failed(&e))
}

/// A database login (a login scope's grant) as a shell and libpq read it.
pub mod login {
    use crate::pb;

    /// `s` quoted for a POSIX shell.
    fn shell_quoted(s: &str) -> String {
        format!("'{}'", s.replace('\'', "'\\''"))
    }

    /// A database login as `PG…` variables libpq reads.
    fn variables(l: &pb::DatabaseLogin) -> [(&'static str, String); 6] {
        [
            ("PGHOST", l.host.clone()),
            ("PGPORT", l.port.to_string()),
            ("PGDATABASE", l.dbname.clone()),
            ("PGUSER", l.user.clone()),
            ("PGPASSWORD", l.password.clone()),
            ("PGSSLMODE", l.sslmode.clone()),
        ]
    }

    /// `KEY='value'` lines, read alike by a POSIX shell (`set -a; . FILE`),
    /// systemd's `EnvironmentFile=` and dotenv.
    fn assignments<'a>(vars: impl IntoIterator<Item = (&'a str, String)>) -> String {
        vars.into_iter()
            .map(|(k, v)| format!("{k}={}\n", shell_quoted(&v)))
            .collect()
    }

    /// A database login as `export PG…=…` lines (for `eval`).
    pub fn env(l: &pb::DatabaseLogin) -> String {
        variables(l)
            .into_iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quoted(&v)))
            .collect()
    }

    /// The agent's env file: the lease, its token, and its database login
    /// when it holds one (see [`assignments`]).
    pub fn env_file(lease_id: &str, token: &str, l: Option<&pb::DatabaseLogin>) -> String {
        let mut vars = vec![
            ("PORTCULLIS_LEASE_ID", lease_id.to_owned()),
            ("PORTCULLIS_TOKEN", token.to_owned()),
        ];
        vars.extend(l.into_iter().flat_map(variables));
        assignments(vars)
    }

    /// A database login as a `postgresql://` URL (every part percent-encoded).
    pub fn url(l: &pb::DatabaseLogin) -> String {
        let enc = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        let host = if l.host.contains(':') {
            format!("[{}]", l.host)
        } else {
            enc(&l.host)
        };
        let mode = if l.sslmode.is_empty() {
            String::new()
        } else {
            format!("?sslmode={}", enc(&l.sslmode))
        };
        format!(
            "postgresql://{}:{}@{host}:{}/{}{mode}",
            enc(&l.user),
            enc(&l.password),
            l.port,
            enc(&l.dbname)
        )
    }
}

/// Conversions between std time and the protobuf well-known types.
pub mod convert {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// A compact human duration: the largest unit and the next one when it is
    /// not zero (`1d`, `2h 30m`, `45s`), truncated; under a second in ms.
    pub fn fmt_dur(d: Duration) -> String {
        const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
        let secs = d.as_secs();
        if secs == 0 {
            return if d.is_zero() {
                "0s".into()
            } else {
                format!("{}ms", d.as_millis())
            };
        }
        let Some(i) = UNITS.iter().position(|(n, _)| secs >= *n) else {
            return "0s".into();
        };
        let (n, u) = UNITS[i];
        let mut s = format!("{}{u}", secs / n);
        if let Some((m, v)) = UNITS.get(i + 1) {
            let next = (secs % n) / m;
            if next > 0 {
                s.push_str(&format!(" {next}{v}"));
            }
        }
        s
    }

    /// A std duration as a protobuf duration (saturating).
    pub fn duration(d: Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }
    }

    /// A protobuf duration as a std duration (negative is zero).
    pub fn from_duration(d: &prost_types::Duration) -> Duration {
        match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
            (Ok(s), Ok(n)) => Duration::new(s, n.min(999_999_999)),
            _ => Duration::ZERO,
        }
    }

    /// A protobuf timestamp as a system time (before 1970 is 1970).
    pub fn system_time(t: &prost_types::Timestamp) -> SystemTime {
        let secs = u64::try_from(t.seconds).unwrap_or(0);
        let nanos = u32::try_from(t.nanos).unwrap_or(0).min(999_999_999);
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    /// A system time as a protobuf timestamp (whole seconds and nanos).
    pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        prost_types::Timestamp {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }
    }

    /// Time from now until `t` (zero when absent or past).
    pub fn until(t: Option<&prost_types::Timestamp>) -> Duration {
        t.map_or(Duration::ZERO, |t| {
            system_time(t)
                .duration_since(SystemTime::now())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_env_file_quotes_every_value_for_a_posix_shell_and_systemd() {
        let l = crate::pb::DatabaseLogin {
            user: "pc_l_1".into(),
            password: "it's $HOME `x`".into(),
            host: "db.example.org".into(),
            port: 5432,
            dbname: "orders".into(),
            sslmode: "verify-full".into(),
            ..Default::default()
        };
        let text = login::env_file("l_1", "ey.tok", Some(&l));
        assert_eq!(
            text,
            "PORTCULLIS_LEASE_ID='l_1'\nPORTCULLIS_TOKEN='ey.tok'\nPGHOST='db.example.org'\n\
             PGPORT='5432'\nPGDATABASE='orders'\nPGUSER='pc_l_1'\n\
             PGPASSWORD='it'\\''s $HOME `x`'\nPGSSLMODE='verify-full'\n"
        );
        assert_eq!(
            login::env_file("l_2", "t", None),
            "PORTCULLIS_LEASE_ID='l_2'\nPORTCULLIS_TOKEN='t'\n"
        );
        assert!(login::env(&l).starts_with("export PGHOST='db.example.org'\n"));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{msg}")]
    struct Wrap {
        msg: &'static str,
        #[source]
        inner: std::io::Error,
    }

    #[test]
    fn a_refused_connection_is_found_by_its_kind_not_its_text() {
        let e = Wrap {
            msg: "transport error",
            inner: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(fault(&e), Fault::Refused);
        let e = Wrap {
            msg: "connection refused (but only in words)",
            inner: std::io::Error::other("nope"),
        };
        assert_eq!(fault(&e), Fault::Other);
    }

    #[test]
    fn a_rustls_error_inside_an_io_error_is_a_tls_fault() {
        let e = Wrap {
            msg: "error trying to connect",
            inner: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
            ),
        };
        assert_eq!(fault(&e), Fault::Tls);
    }

    #[test]
    fn a_connection_closed_under_a_call_is_told_apart_by_kind() {
        let e = Wrap {
            msg: "transport error",
            inner: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed"),
        };
        assert_eq!(fault(&e), Fault::Closed);
        // What h2 hands up for a TLS alert: the kind survives, the type not.
        let e = Wrap {
            msg: "transport error",
            inner: std::io::Error::new(std::io::ErrorKind::InvalidData, "fatal alert"),
        };
        assert_eq!(fault(&e), Fault::Tls);
    }

    #[test]
    fn the_chain_does_not_repeat_itself() {
        let e = Wrap {
            msg: "tcp connect error",
            inner: std::io::Error::other(Wrap {
                msg: "tcp connect error",
                inner: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            }),
        };
        assert_eq!(error_chain(&e), "tcp connect error: connection refused");
    }

    #[test]
    fn durations_round_trip() {
        let d = std::time::Duration::from_millis(90_500);
        assert_eq!(convert::from_duration(&convert::duration(d)), d);
        let neg = prost_types::Duration {
            seconds: -5,
            nanos: 0,
        };
        assert_eq!(convert::from_duration(&neg), std::time::Duration::ZERO);
    }
}

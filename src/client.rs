//! Connecting to a broker as a client: mTLS from explicit files or from a
//! dev directory (`--dev-dir`, `--as workload|approver|admin`).

use std::path::PathBuf;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::dev::{As, DevDir};

/// How to reach and authenticate to the broker.
#[derive(Clone, Debug, clap::Args)]
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
    /// Which dev identity to act as (with `--dev-dir`).
    #[arg(long = "as", global = true, value_enum, default_value = "workload")]
    pub as_: As,
}

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Missing or unusable connection settings.
    #[error("{0}")]
    Usage(String),
    /// Could not connect or handshake.
    #[error("cannot connect to {server}: {detail}")]
    Connect {
        /// Address.
        server: String,
        /// What happened.
        detail: String,
    },
}

fn read(p: &PathBuf, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(p)
        .map_err(|e| ClientError::Usage(format!("cannot read {what} `{}`: {e}", p.display())))
}

impl ClientOpts {
    /// Connect (mTLS) to the broker.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        let dev = self.dev_dir.as_ref().map(DevDir::new);
        let server = match (&self.server, &dev) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => d
                .endpoints()
                .map_err(|e| ClientError::Usage(e.to_string()))?
                .grpc
                .to_string(),
            (None, None) => {
                return Err(ClientError::Usage(
                    "no broker address: pass --server or --dev-dir (or set PORTCULLIS_DEV_DIR)"
                        .into(),
                ));
            }
        };
        let (dev_cert, dev_key) = dev.as_ref().map(|d| d.identity_files(self.as_)).unzip();
        let pick = |explicit: &Option<PathBuf>, from_dev: Option<PathBuf>, what: &str| {
            explicit
                .clone()
                .or(from_dev)
                .ok_or_else(|| ClientError::Usage(format!("no {what}: pass --{what} or --dev-dir")))
        };
        let cert = pick(&self.cert, dev_cert, "cert")?;
        let key = pick(&self.key, dev_key, "key")?;
        let ca = pick(&self.ca, dev.as_ref().map(|d| d.path("ca.pem")), "ca")?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca, "CA bundle")?))
            .identity(Identity::from_pem(
                read(&cert, "certificate")?,
                read(&key, "key")?,
            ));
        let url = if server.contains("://") {
            server.clone()
        } else {
            format!("https://{server}")
        };
        let connect_err = |detail: String| ClientError::Connect {
            server: server.clone(),
            detail,
        };
        Endpoint::from_shared(url)
            .map_err(|e| connect_err(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| connect_err(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| connect_err(explain_transport(&e)))
    }
}

/// A clearer word for the transport errors a refused mTLS handshake yields.
pub fn explain_transport(e: &dyn std::error::Error) -> String {
    let mut chain = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    if chain.contains("certificate")
        || chain.contains("handshake")
        || chain.contains("alert")
        || chain.contains("transport error")
    {
        format!(
            "{chain} (the TLS handshake was refused: check --cert/--key belong to a client certificate from the broker's CA, that it has not expired, and that --ca signed the broker)"
        )
    } else {
        chain
    }
}

//! Test harness: a real broker on 127.0.0.1:0 with a real sled directory and
//! real mTLS, driven by a manual clock, spoken to through the generated
//! client.
#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test harness: a failure here is a test failure"
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portcullis::client::ClientOpts;
use portcullis::clock::{Clock, ManualClock, SystemClock};
use portcullis::dev::{As, DevCa, DevDir};
use portcullis::pb;
use portcullis::pb::broker_client::BrokerClient;
use portcullis::server::{Running, ServeConfig};
use tonic::transport::Channel;

pub mod issuer;

/// Where the harness says its approver console is.
pub const CONSOLE_URL: &str = "https://portcullis.example.org";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub dev: DevDir,
    pub clock: Arc<ManualClock>,
    /// The CA that issued the dev identities (tests issue more with it).
    pub ca: DevCa,
    /// Serve the HTTP listener over TLS.
    pub https: bool,
    /// Run the expiry task (on unless a test needs decisions checked with
    /// no sweep behind them).
    pub expiry: bool,
    pub running: Option<Running>,
    /// PostgreSQL URL: the brokers share this database instead of sled.
    pub database: Option<String>,
    /// Serve the federation listener (platform tokens) too.
    pub federation: bool,
}

/// A fresh database for a shared-store test, or `None` — after saying on
/// stderr that the test is skipped and how to run it — when the tests were
/// given no PostgreSQL.
pub fn scratch_database(test: &str) -> Option<String> {
    let base = postgres_for(test)?;
    // On a thread of its own with a runtime of its own: callers may be
    // inside a runtime, or not.
    let db = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(portcullis::store::postgres::scratch_database(&base))
            .unwrap_or_else(|e| panic!("a scratch database next to {base}: {e}"))
    })
    .join();
    // A database that cannot be made fails the test; it never skips it.
    Some(db.unwrap_or_else(|_| panic!("creating the scratch database for `{test}` failed")))
}

/// The tests' PostgreSQL URL, or `None` after saying that `test` is skipped.
pub fn postgres_for(test: &str) -> Option<String> {
    use portcullis::store::postgres::TEST_DATABASE_ENV;
    match std::env::var(TEST_DATABASE_ENV) {
        Ok(base) => Some(base),
        Err(_) => {
            eprintln!(
                "SKIPPED: {test} needs PostgreSQL: set {TEST_DATABASE_ENV} (`.ci/postgres start` prints a URL for it)"
            );
            None
        }
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Start with `policy` (TOML) instead of the dev policy.
    pub async fn start_with(policy: Option<&str>) -> Self {
        let mut h = Self::prepare(policy);
        h.boot().await;
        h
    }

    /// Start a broker on `database` (PostgreSQL) with `policy`; more
    /// brokers on the same database come from [`Harness::another`].
    pub async fn start_shared(database: String, policy: Option<&str>) -> Self {
        let mut h = Self::prepare(policy);
        h.database = Some(database);
        h.boot().await;
        h
    }

    /// One more broker with this harness's configuration (on a shared
    /// database: another broker on the same state).
    pub async fn another(&self) -> Running {
        portcullis::server::start(self.config()).await.unwrap()
    }

    /// Client options for the broker `r` (one of [`Harness::another`]'s).
    pub fn opts_on(&self, r: &Running, who: As) -> ClientOpts {
        ClientOpts {
            server: Some(r.grpc_addr.to_string()),
            ..self.opts(who)
        }
    }

    /// A broker client for `r`.
    pub async fn broker_on(&self, r: &Running, who: As) -> BrokerClient<Channel> {
        BrokerClient::new(self.opts_on(r, who).connect().await.unwrap())
    }

    /// The dev directory, identities and clock, no broker yet.
    pub fn prepare(policy: Option<&str>) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("portcullis=debug")
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let dev = DevDir::new(dir.path().join("dev"));
        let ca = DevCa::new("portcullis test CA").unwrap();
        dev.write_identities(&ca).unwrap();
        if let Some(p) = policy {
            std::fs::create_dir_all(&dev.root).unwrap();
            std::fs::write(dev.path("policy.toml"), p).unwrap();
        }
        dev.prepare().unwrap();
        let clock = Arc::new(ManualClock::new(SystemClock.now()));
        Self {
            dir,
            dev,
            clock,
            ca,
            https: false,
            expiry: true,
            running: None,
            database: None,
            federation: false,
        }
    }

    pub fn config(&self) -> ServeConfig {
        let d = &self.dev;
        let mut cfg = ServeConfig::new(
            d.data(),
            d.path("server.pem"),
            d.path("server-key.pem"),
            d.path("ca.pem"),
            d.path("policy.toml"),
            d.path("kek"),
        );
        cfg.clock = self.clock.clone();
        // Fixed, so tokens stay valid across restarts on new ports.
        cfg.issuer = Some("https://portcullis.test".into());
        cfg.policy_poll = Duration::from_millis(20);
        cfg.http_tls = self.https;
        cfg.expiry_task = self.expiry;
        cfg.database = self
            .database
            .clone()
            .map(|url| portcullis::store::postgres::PgOptions {
                url,
                ca_file: None,
                pool_size: 8,
            });
        cfg.federation_listen = self
            .federation
            .then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        // The console is on, at a fixed public URL (webhook links name it).
        cfg.console = Some(portcullis::server::ConsoleOptions {
            public_url: Some(CONSOLE_URL.into()),
            oidc: None,
        });
        cfg
    }

    pub async fn boot(&mut self) {
        self.running = Some(portcullis::server::start(self.config()).await.unwrap());
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn restart(&mut self) {
        self.halt().await;
        self.boot().await;
    }

    /// Stop the broker, keeping its directory (and the harness).
    pub async fn halt(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Restart with `tweak` applied to the usual configuration.
    pub async fn restart_with(&mut self, tweak: impl FnOnce(&mut ServeConfig)) {
        self.halt().await;
        let mut cfg = self.config();
        tweak(&mut cfg);
        self.running = Some(portcullis::server::start(cfg).await.unwrap());
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    pub fn opts(&self, who: As) -> ClientOpts {
        ClientOpts {
            server: Some(self.running().grpc_addr.to_string()),
            cert: None,
            key: None,
            ca: None,
            dev_dir: Some(self.dev.root.clone()),
            federation_server: None,
            as_: who,
        }
    }

    pub async fn channel(&self, who: As) -> Channel {
        self.opts(who).connect().await.unwrap()
    }

    pub async fn broker(&self, who: As) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel(who).await)
    }

    /// A connection as any identity, with a certificate from the test CA
    /// whose URI SAN is `uri` verbatim (it need not be a valid identity).
    pub async fn channel_for(&self, uri: &str) -> Channel {
        let name = uri.rsplit('/').next().unwrap().to_owned();
        let (cert, key) = self.foreign_identity(&self.ca, uri, false, &format!("id-{name}"));
        ClientOpts {
            cert: Some(cert),
            key: Some(key),
            ..self.opts(As::Workload)
        }
        .connect()
        .await
        .unwrap()
    }

    /// Move the clock and wait until the expiry task has swept up to it.
    pub async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        let target = self.clock.now();
        let mut rx = self.running().engine.expiry_progress();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|p| *p >= target))
            .await
            .unwrap_or_else(|_| panic!("expiry task did not reach {target} in time"))
            .unwrap();
    }

    /// Write a client certificate from `ca` for `uri` into the temp dir.
    pub fn foreign_identity(
        &self,
        ca: &DevCa,
        uri: &str,
        expired: bool,
        name: &str,
    ) -> (PathBuf, PathBuf) {
        let (cert, key) = ca.client_cert(uri, expired.then_some(())).unwrap();
        let c = self.dir.path().join(format!("{name}.pem"));
        let k = self.dir.path().join(format!("{name}-key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }
}

/// The trail's first 5,000 records, as the admin exports them.
pub async fn export(h: &Harness) -> Vec<pb::AuditRecord> {
    let mut a = pb::audit_client::AuditClient::new(h.channel(As::Admin).await);
    a.export(pb::ExportRequest {
        page_size: 5000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .records
}

/// A request for `scopes`, with a reason (approval scopes need one).
pub fn ask(scopes: &[&str]) -> pb::RequestTokenRequest {
    pb::RequestTokenRequest {
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        justification: "test".into(),
        ..Default::default()
    }
}

pub fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// Ask for approval-tier `scopes` and expect the request to be parked.
pub async fn park(c: &mut BrokerClient<Channel>, scopes: &[&str]) -> pb::TokenRequest {
    let r = pb::RequestTokenRequest {
        justification: "ticket 7".into(),
        ..ask(scopes)
    };
    match c
        .request_token(r)
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
    {
        pb::request_token_response::Outcome::Pending(p) => p,
        other => panic!("expected pending, got {other:?}"),
    }
}

/// Ask and expect a grant.
pub async fn grant(c: &mut BrokerClient<Channel>, req: pb::RequestTokenRequest) -> pb::Grant {
    match c
        .request_token(req)
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
    {
        pb::request_token_response::Outcome::Granted(g) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Renew lease `id` for `ttl_secs` (or its TTL) and expect the renewed lease.
pub async fn renewed(c: &mut BrokerClient<Channel>, id: &str, ttl_secs: Option<i64>) -> pb::Lease {
    c.renew_lease(pb::RenewLeaseRequest {
        lease_id: id.to_owned(),
        ttl: ttl_secs.and_then(secs),
    })
    .await
    .unwrap()
    .into_inner()
    .grant
    .unwrap()
    .lease
    .unwrap()
}

/// Decode a JWT part without verifying.
pub fn part(token: &str, i: usize) -> serde_json::Value {
    use base64::Engine as _;
    let p = token.split('.').nth(i).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .unwrap(),
    )
    .unwrap()
}

pub async fn count_leases(c: &mut BrokerClient<Channel>) -> usize {
    c.list_leases(pb::ListLeasesRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .leases
    .len()
}

/// One HTTP/1.1 call to a broker's HTTP listener, as a browser on the
/// console's public origin would make it: status, `Set-Cookie`s, body.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<String>,
) -> (u16, Vec<String>, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("origin", CONSOLE_URL)
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let body = http_body_util::Full::new(hyper::body::Bytes::from(form.unwrap_or_default()));
    let resp = send.send_request(req.body(body).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let cookies = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, cookies, String::from_utf8_lossy(&body).into_owned())
}

/// A plain HTTP GET against the broker's HTTP listener.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split("\r\n\r\n").nth(1).unwrap().to_owned()
}

/// A local webhook receiver: every POST body, with its path, on a channel.
pub async fn receiver() -> (u16, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/{path}",
        axum::routing::post(
            move |axum::extract::Path(path): axum::extract::Path<String>, body: String| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((path, body));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, rx)
}

/// `serve --dev` as a child process on the harness's dev directory (and on
/// `database` when given, else its sled directory); its gRPC address.
pub fn spawn_broker(h: &Harness, database: Option<&str>) -> (std::process::Child, String) {
    let (child, addr, _) = spawn_broker_with(h, database, &[]);
    (child, addr)
}

/// [`spawn_broker`] with more environment, and the broker's log lines after
/// it was ready.
pub fn spawn_broker_with(
    h: &Harness,
    database: Option<&str>,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&h.dev.root)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // The caller's environment wins (`RUST_LOG` included).
    cmd.envs(env.iter().copied());
    if let Some(url) = database {
        cmd.args(["--database-url", url]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut seen = Vec::new();
    let addr = loop {
        let Some(Ok(l)) = lines.next() else {
            panic!("broker exited before it was ready: {seen:#?}");
        };
        if let Some(a) = l.trim().strip_prefix("gRPC (mTLS)") {
            break a.trim().to_owned();
        }
        seen.push(l);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, addr, rx)
}

//! A real OpenID issuer for the federation tests: HTTPS (a certificate
//! from the test CA), discovery and JWKS like GitHub's and a cluster's,
//! every fetch counted. Tokens are signed here with ring (ES256) or the
//! `openssl` command (RS256): never with portcullis code.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test harness: a failure here is a test failure"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

use portcullis::dev::DevCa;

/// An ES256 key signed with by ring.
pub struct EsKey {
    pub kid: String,
    pair: EcdsaKeyPair,
}

impl EsKey {
    pub fn new(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            kid: kid.into(),
            pair,
        }
    }

    pub fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
               "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])})
    }

    /// A compact JWS of `claims` under `header`.
    pub fn sign_with(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signed.as_bytes())
            .unwrap();
        format!("{signed}.{}", B64.encode(sig.as_ref()))
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(
            &json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }
}

/// An RS256 key made and used by the `openssl` command (another
/// implementation altogether); `None` when there is no `openssl`.
pub struct RsKey {
    pub kid: String,
    pem: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl RsKey {
    pub fn new(kid: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("rsa.pem");
        let made = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem)
            .output()
            .ok()?;
        assert!(made.status.success(), "{made:?}");
        Some(Self {
            kid: kid.into(),
            pem,
            _dir: dir,
        })
    }

    pub fn jwk(&self) -> Value {
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&self.pem)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let hex = text.trim().strip_prefix("Modulus=").unwrap();
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
               "n": B64.encode(n), "e": "AQAB"})
    }

    pub fn sign(&self, claims: &Value) -> String {
        use std::io::Write as _;
        let header = json!({"alg": "RS256", "kid": self.kid, "typ": "JWT"});
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut child = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.pem)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(signed.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        format!("{signed}.{}", B64.encode(out.stdout))
    }
}

/// The issuer: `{url}` serves GitHub-like discovery and `/jwks`; `{url}/k8s`
/// is a cluster's issuer whose keys are at `/k8s/jwks`.
pub struct TestIssuer {
    pub url: String,
    /// JWKS fetches at `/jwks`.
    pub jwks_fetches: Arc<AtomicUsize>,
    /// Fetches of discovery.
    pub discovery_fetches: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<Value>>>,
    k8s_keys: Arc<Mutex<Vec<Value>>>,
}

impl TestIssuer {
    /// Serve on 127.0.0.1 with a certificate from `ca`.
    pub async fn start(ca: &DevCa) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let me = Self {
            url: url.clone(),
            jwks_fetches: Arc::default(),
            discovery_fetches: Arc::default(),
            keys: Arc::default(),
            k8s_keys: Arc::default(),
        };
        let (jf, df) = (me.jwks_fetches.clone(), me.discovery_fetches.clone());
        let (keys, k8s) = (me.keys.clone(), me.k8s_keys.clone());
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    df.fetch_add(1, Ordering::SeqCst);
                    let body = json!({"issuer": url, "jwks_uri": format!("{url}/jwks"),
                        "response_types_supported": ["id_token"],
                        "id_token_signing_alg_values_supported": ["RS256", "ES256"]});
                    async move { axum::Json(body) }
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    jf.fetch_add(1, Ordering::SeqCst);
                    let body = json!({"keys": *keys.lock().unwrap()});
                    async move { axum::Json(body) }
                }),
            )
            .route(
                "/k8s/jwks",
                axum::routing::get(move || {
                    let body = json!({"keys": *k8s.lock().unwrap()});
                    async move { axum::Json(body) }
                }),
            );
        let (cert, key) = ca.server_cert().unwrap();
        tokio::spawn(serve_tls(listener, app, cert, key));
        me
    }

    /// The keys `/jwks` serves from now on.
    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.keys.lock().unwrap() = keys;
    }

    /// The keys `/k8s/jwks` serves from now on.
    pub fn set_k8s_keys(&self, keys: Vec<Value>) {
        *self.k8s_keys.lock().unwrap() = keys;
    }
}

async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cert: String,
    key: String,
) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}

/// Claims shaped like a GitHub Actions OIDC token (as GitHub documents
/// them) for a job of repository 4242 of owner 1001 in environment `prod`,
/// from `iss`, issued at `now` (seconds) for five minutes.
pub fn github_claims(iss: &str, now: u64) -> Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    json!({
        "iss": iss, "aud": "https://broker.test",
        "sub": "repo:acme/deploy:environment:prod",
        "jti": format!("{now}-{n}-{}", std::process::id()),
        "iat": now, "nbf": now, "exp": now + 300,
        "ref": "refs/heads/main", "sha": "9f1c0a2e", "repository": "acme/deploy",
        "repository_id": "4242", "repository_owner": "acme", "repository_owner_id": "1001",
        "repository_visibility": "private", "run_id": "81234", "run_number": "7", "run_attempt": "1",
        "actor": "octocat", "actor_id": "583231", "workflow": "deploy", "event_name": "push",
        "environment": "prod", "ref_type": "branch",
        "job_workflow_ref": "acme/deploy/.github/workflows/deploy.yml@refs/heads/main",
        "workflow_ref": "acme/deploy/.github/workflows/deploy.yml@refs/heads/main",
        "runner_environment": "github-hosted"
    })
}

/// Claims shaped like a Kubernetes projected service-account token.
pub fn k8s_claims(iss: &str, now: u64) -> Value {
    json!({
        "iss": iss, "aud": ["https://broker.test"],
        "sub": "system:serviceaccount:payments:api",
        "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {
            "namespace": "payments",
            "node": {"name": "node-1", "uid": "node-uid-1"},
            "pod": {"name": "api-7d9f8", "uid": "pod-uid-1"},
            "serviceaccount": {"name": "api", "uid": "sa-uid-1"}
        }
    })
}

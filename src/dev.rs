//! The zero-configuration dev setup behind `serve --dev`: a data directory
//! with a dev CA, a server certificate, client certificates for a demo
//! workload, approver and admin, a dev policy and a key-encryption key.
//! Everything is created once and reused on later starts, so identities and
//! leases survive restarts. Never use these files in production.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use crate::fsutil::Access;

/// Trust domain of the dev identities.
pub const TRUST_DOMAIN: &str = "portcullis.dev";
/// The demo workload.
pub const WORKLOAD: &str = "spiffe://portcullis.dev/ns/demo/sa/app";
/// The demo approver.
pub const APPROVER: &str = "spiffe://portcullis.dev/human/alice";
/// The demo admin.
pub const ADMIN: &str = "spiffe://portcullis.dev/human/root-oncall";

/// Errors of the dev setup.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    /// A file could not be written or read.
    #[error("`{path}`: {detail}")]
    Io {
        /// Path.
        path: String,
        /// OS error.
        detail: String,
    },
}

/// The dev identities a client can act as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum As {
    /// The demo workload (`ns/demo/sa/app`).
    Workload,
    /// The demo approver (`human/alice`).
    Approver,
    /// The demo admin (`human/root-oncall`).
    Admin,
}

impl As {
    /// File stem of its certificate.
    pub fn stem(self) -> &'static str {
        match self {
            Self::Workload => "workload",
            Self::Approver => "approver",
            Self::Admin => "admin",
        }
    }
}

/// Paths inside a dev directory.
#[derive(Clone, Debug)]
pub struct DevDir {
    /// The directory.
    pub root: PathBuf,
}

/// Where a running broker listens (written to `endpoints.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    /// gRPC (mTLS) address.
    pub grpc: SocketAddr,
    /// HTTP (JWKS, discovery, health) address.
    pub http: Option<SocketAddr>,
    /// Federation (platform tokens, no client certificate) address.
    #[serde(default)]
    pub federation: Option<SocketAddr>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> DevError {
    DevError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Write `contents` to `path` atomically ([`crate::fsutil`]), readable only
/// by the owner when `secret`.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), DevError> {
    let access = if secret {
        Access::Private
    } else {
        Access::Shared
    };
    crate::fsutil::write_atomic(path, contents, access).map_err(|e| io(&e.path, e.source))
}

impl DevDir {
    /// A dev directory at `root` (not created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Path of a file in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Certificate and key of a dev identity.
    pub fn identity_files(&self, who: As) -> (PathBuf, PathBuf) {
        (
            self.path(&format!("{}.pem", who.stem())),
            self.path(&format!("{}-key.pem", who.stem())),
        )
    }

    /// The sled data directory.
    pub fn data(&self) -> PathBuf {
        self.path("data")
    }

    /// Create whatever is missing: CA, certificates, policy, KEK. Returns
    /// `true` when the CA was created now.
    pub fn prepare(&self) -> Result<bool, DevError> {
        std::fs::create_dir_all(&self.root).map_err(|e| io(&self.root, e))?;
        let mut created = false;
        if !self.path("ca.pem").exists() {
            self.write_identities(&DevCa::new("portcullis dev CA")?)?;
            created = true;
        }
        if !self.path("policy.toml").exists() {
            let policy = DEV_POLICY.replace("{CI_JWKS}", &self.ci_jwks()?);
            write_file(&self.path("policy.toml"), policy.as_bytes(), false)?;
        }
        if !self.path("kek").exists() {
            let (_, hex) = crate::keys::Kek::generate().map_err(|e| io(&self.path("kek"), e))?;
            write_file(&self.path("kek"), hex.as_bytes(), true)?;
        }
        Ok(created)
    }

    /// Write `ca` and a server and three client certificates issued by it.
    pub fn write_identities(&self, ca: &DevCa) -> Result<(), DevError> {
        std::fs::create_dir_all(&self.root).map_err(|e| io(&self.root, e))?;
        write_file(&self.path("ca.pem"), ca.cert_pem.as_bytes(), false)?;
        write_file(
            &self.path("ca-key.pem"),
            ca.key.serialize_pem().as_bytes(),
            true,
        )?;
        let (cert, key) = ca.server_cert()?;
        write_file(&self.path("server.pem"), cert.as_bytes(), false)?;
        write_file(&self.path("server-key.pem"), key.as_bytes(), true)?;
        for (who, uri) in [
            (As::Workload, WORKLOAD),
            (As::Approver, APPROVER),
            (As::Admin, ADMIN),
        ] {
            let (cert, key) = ca.client_cert(uri, None)?;
            let (c, k) = self.identity_files(who);
            write_file(&c, cert.as_bytes(), false)?;
            write_file(&k, key.as_bytes(), true)?;
        }
        Ok(())
    }

    /// Record where the broker listens.
    pub fn write_endpoints(&self, e: &Endpoints) -> Result<(), DevError> {
        let json =
            serde_json::to_vec_pretty(e).map_err(|err| io(&self.path("endpoints.json"), err))?;
        write_file(&self.path("endpoints.json"), &json, false)
    }

    /// Where the broker said it listens.
    pub fn endpoints(&self) -> Result<Endpoints, DevError> {
        let p = self.path("endpoints.json");
        let text = std::fs::read(&p)
            .map_err(|e| io(&p, format!("{e} (is `portcullis serve --dev` running?)")))?;
        serde_json::from_slice(&text).map_err(|e| io(&p, e))
    }
}

/// The dev CI issuer: a stand-in for GitHub Actions' OIDC issuer, so the
/// walkthrough can sign a CI job in without GitHub. Its key lives in the
/// dev directory; `portcullis dev id-token` signs with it.
pub const CI_ISSUER: &str = "https://ci.portcullis.dev";
/// The audience the dev policy's `[[issuer]]` requires.
pub const CI_AUDIENCE: &str = "portcullis-dev";

impl DevDir {
    /// The dev CI issuer's key (made on first use).
    fn ci_key(&self) -> Result<ring::signature::EcdsaKeyPair, DevError> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let path = self.path("ci-issuer-key.pem");
        if !path.exists() {
            let key = KeyPair::generate()?;
            write_file(&path, key.serialize_pem().as_bytes(), true)?;
        }
        let pem = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let der = KeyPair::from_pem(&pem)?.serialize_der();
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| io(&path, e))
    }

    /// The dev CI issuer's public key as a JWKS (one line of JSON).
    pub fn ci_jwks(&self) -> Result<String, DevError> {
        use base64::Engine as _;
        use ring::signature::KeyPair as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let key = self.ci_key()?;
        let p = key.public_key().as_ref();
        let (x, y) = (
            p.get(1..33).unwrap_or_default(),
            p.get(33..65).unwrap_or_default(),
        );
        Ok(
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "dev-ci-1",
            "use": "sig", "alg": "ES256", "x": b64.encode(x), "y": b64.encode(y)}]})
            .to_string(),
        )
    }

    /// A token of the dev CI issuer with `claims` (over its defaults: a
    /// job of repository 4242 of owner 1001 in environment `prod`), valid
    /// for five minutes from `now` (seconds).
    pub fn ci_token(
        &self,
        claims: serde_json::Map<String, serde_json::Value>,
        now: u64,
    ) -> Result<String, DevError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jti = crate::text::new_id("ci_", now.saturating_mul(1000))
            .map_err(|e| io(&self.path("ci-issuer-key.pem"), e))?;
        let mut body = serde_json::json!({
            "iss": CI_ISSUER, "aud": CI_AUDIENCE,
            "sub": "repo:acme/deploy:environment:prod", "jti": jti,
            "iat": now, "nbf": now, "exp": now + 300,
            "repository": "acme/deploy", "repository_id": "4242",
            "repository_owner": "acme", "repository_owner_id": "1001",
            "environment": "prod", "ref": "refs/heads/main", "sha": "5d1c2a0",
            "actor": "octocat", "event_name": "push", "run_id": "1", "run_attempt": "1",
        });
        if let Some(m) = body.as_object_mut() {
            m.extend(claims);
        }
        let header = serde_json::json!({"alg": "ES256", "kid": "dev-ci-1", "typ": "JWT"});
        let signed = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(body.to_string())
        );
        let sig = self
            .ci_key()?
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .map_err(|e| io(&self.path("ci-issuer-key.pem"), e))?;
        Ok(format!("{signed}.{}", b64.encode(sig.as_ref())))
    }
}

/// An in-memory CA that issues dev certificates (also used by tests to make
/// foreign and expired certificates).
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    key: KeyPair,
    /// The CA certificate (PEM).
    pub cert_pem: String,
}

impl DevCa {
    /// A fresh self-signed CA.
    pub fn new(name: &str) -> Result<Self, DevError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let signing = KeyPair::from_pem(&key.serialize_pem())?;
        Ok(Self {
            issuer: Issuer::new(params, signing),
            key,
            cert_pem: cert.pem(),
        })
    }

    /// Server certificate for `localhost` and 127.0.0.1 (PEM cert, PEM key).
    pub fn server_cert(&self) -> Result<(String, String), DevError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis broker");
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://{TRUST_DOMAIN}/portcullis/broker").try_into()?,
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Client certificate whose one URI SAN is `uri`; `expired` makes one
    /// valid only in 2020 (for tests).
    pub fn client_cert(
        &self,
        uri: &str,
        expired: Option<()>,
    ) -> Result<(String, String), DevError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, uri);
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired.is_some() {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 6, 1);
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The policy written into a new dev directory.
pub const DEV_POLICY: &str = r#"# portcullis dev policy (written by `serve --dev`; edit freely, it reloads).
[broker]
default_audience = "portcullis-dev"
admins = ["admins"]

[groups]
approvers = ["spiffe://portcullis.dev/human/alice"]
admins = ["spiffe://portcullis.dev/human/root-oncall"]

# Routine read access: granted at once.
[[scope]]
name = "orders.read"
description = "read orders and their line items"
tier = "auto"
workloads = ["spiffe://portcullis.dev/ns/demo/*", "spiffe://ci.portcullis.dev/*"]
default_ttl = "5m"
max_ttl = "1h"

[[scope]]
name = "orders.write"
description = "create and update orders"
tier = "auto"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
default_ttl = "5m"
max_ttl = "15m"
# RFC 8705: its tokens carry the thumbprint of the caller's certificate.
bind = "mtls"

# Crosses a trust boundary: parked until a human approves.
[[scope]]
name = "orders.admin"
description = "change any order, delete orders and edit the orders schema"
tier = "approval"
workloads = ["spiffe://portcullis.dev/ns/demo/*", "spiffe://ci.portcullis.dev/*"]
approvers = ["approvers"]
# Requests must say why (the default for approval scopes):
# require_justification = true
approvals_required = 1
pending_ttl = "30m"
max_ttl = "15m"

# Token exchange: a demo workload may hand narrower tokens to demo tools
# (or to itself), at most two links deep; an approved orders.admin passes
# on without a second approval (approval = "again" would park it).
[[delegation]]
from = ["spiffe://portcullis.dev/ns/demo/*", "spiffe://portcullis.dev/tool/*"]
to = ["spiffe://portcullis.dev/ns/demo/*", "spiffe://portcullis.dev/tool/*"]
scopes = ["orders.read", "orders.write", "orders.admin"]
max_depth = 2

# CI jobs without a certificate sign in with their platform's token on the
# federation listener (docs/design-federation.md). This stands in for
# GitHub Actions: `portcullis dev id-token` signs a job's token with the
# key in this directory. For GitHub itself: kind = "github",
# issuer = "https://token.actions.githubusercontent.com", discovery = true.
[[issuer]]
name = "dev_ci"
kind = "generic"
issuer = "https://ci.portcullis.dev"
jwks = '{CI_JWKS}'
audience = "portcullis-dev"
max_age = "10m"
# Only this owner's repositories; the identity is built from ids.
require = { repository_owner_id = "1001" }
identity = "spiffe://ci.portcullis.dev/{repository_owner_id}/{repository_id}/env/{environment}"
"#;

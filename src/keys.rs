//! `keys` signs: the key-encryption key, the sealed signing-key ring, and the
//! published JWK Set.
//!
//! Private keys exist unsealed only in memory. At rest each is sealed with
//! AES-256-GCM under the key-encryption key (KEK), with the `kid` as
//! associated data so a sealed blob cannot be moved to another key record.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};

use crate::store::{Millis, Store, StoreError};

use crate::model::{KeyRecord, KeyState};

/// How long relying parties may cache the JWKS (`Cache-Control: max-age`).
/// A NEXT key is published at least two of these before it signs.
pub const JWKS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// Errors of the key ring.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The KEK file is missing, unreadable or not 64 hex characters.
    #[error("key-encryption key `{path}`: {detail}")]
    KekFile {
        /// File named by the configuration.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The KEK does not open what this data directory sealed.
    #[error(
        "the key-encryption key does not match this data directory (sealed data cannot be opened); refusing to start"
    )]
    WrongKek,
    /// A sealed key record could not be opened or does not match its public key.
    #[error("signing key `{kid}` is corrupt: {detail}; refusing to use it")]
    Corrupt {
        /// Key id.
        kid: String,
        /// What failed.
        detail: String,
    },
    /// Key generation failed (no system randomness).
    #[error("could not generate a key: {0}")]
    Generate(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key-encryption key. Its `Debug` never shows the bytes.
pub struct Kek([u8; 32]);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek([redacted])")
    }
}

const KEK_CHECK_AAD: &[u8] = b"portcullis kek check v1";

impl Kek {
    /// The key of the MAC a lease keeps over the newest token minted for it
    /// (HKDF-SHA256 from the KEK), so that only this broker can make one:
    /// someone who can write the store but has no KEK cannot plant a MAC
    /// that introspection would take for a token it signed.
    pub fn token_mac_key(&self) -> Result<ring::hmac::Key, KeyError> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"portcullis");
        let prk = salt.extract(&self.0);
        let okm = prk
            .expand(&[b"token mac v1"], ring::hmac::HMAC_SHA256)
            .map_err(|_| KeyError::Generate("deriving the token MAC key failed".into()))?;
        Ok(ring::hmac::Key::from(okm))
    }

    /// This deployment's id, the same on every broker that shares its KEK
    /// and different elsewhere (HKDF-SHA256, 128 bits, hex): the mark on
    /// the database logins it makes, so that two deployments sharing a
    /// database never end each other's (docs/design-db-credentials.md).
    pub fn deployment_id(&self) -> Result<String, KeyError> {
        struct Len;
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                16
            }
        }
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"portcullis");
        let mut id = [0u8; 16];
        salt.extract(&self.0)
            .expand(&[b"deployment id v1"], Len)
            .and_then(|okm| okm.fill(&mut id))
            .map_err(|_| KeyError::Generate("deriving the deployment id failed".into()))?;
        Ok(id.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The approver console's sealing key (AES-256-GCM, for its OpenID
    /// sign-in cookie), derived from the KEK so that every broker sharing
    /// a store — and so the KEK — opens what another sealed.
    pub fn console_seal_key(&self) -> Result<ring::aead::LessSafeKey, KeyError> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"portcullis");
        let prk = salt.extract(&self.0);
        let okm = prk
            .expand(&[b"console seal v1"], &ring::aead::AES_256_GCM)
            .map_err(|_| KeyError::Generate("deriving the console key failed".into()))?;
        Ok(ring::aead::LessSafeKey::new(ring::aead::UnboundKey::from(
            okm,
        )))
    }

    /// Read a KEK from a file holding 64 hex characters.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let err = |detail: String| KeyError::KekFile {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path)
                .map_err(|e| err(e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "readable or writable by group or others (mode {:o}); whoever reads it unseals every signing key: `chmod 600` it",
                    mode & 0o777
                )));
            }
        }
        Self::from_hex(text.trim())
            .ok_or_else(|| err("expected 64 hex characters (32 bytes)".into()))
    }

    fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(Self(out))
    }

    /// A fresh random KEK and its hex form (for dev mode's file).
    pub fn generate() -> Result<(Self, String), KeyError> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| KeyError::Generate("no system randomness".into()))?;
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        Ok((Self(k), hex))
    }

    fn key(&self) -> Result<LessSafeKey, KeyError> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| KeyError::Generate("bad AES key".into()))
    }

    /// Seal `plain` with a random nonce: nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError::Generate("no system randomness".into()))?;
        let mut buf = plain.to_vec();
        self.key()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| KeyError::Generate("seal failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Open what [`Kek::seal`] produced; `None` if the key or data is wrong.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = body.to_vec();
        let plain = self
            .key()
            .ok()?
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }

    /// Check this KEK against the data directory, or record a check value
    /// the first time.
    pub async fn check_against(&self, store: &dyn Store) -> Result<(), KeyError> {
        match store.meta("kek_check").await? {
            Some(sealed) => match self.open(KEK_CHECK_AAD, &sealed) {
                Some(p) if p == b"portcullis" => Ok(()),
                _ => Err(KeyError::WrongKek),
            },
            None => {
                crate::store::batch::write_one(
                    store,
                    crate::store::Write::PutMeta(
                        "kek_check".into(),
                        self.seal(KEK_CHECK_AAD, b"portcullis")?,
                    ),
                )
                .await?;
                Ok(())
            }
        }
    }
}

/// Signing algorithm choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningAlg {
    /// ECDSA P-256 with SHA-256 (default; what every JOSE library verifies).
    Es256,
    /// Ed25519.
    EdDsa,
}

impl SigningAlg {
    /// JOSE algorithm.
    pub fn jose(self) -> Algorithm {
        match self {
            Self::Es256 => Algorithm::ES256,
            Self::EdDsa => Algorithm::EdDSA,
        }
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::EdDSA => "EdDSA",
        _ => "ES256",
    }
}

fn alg_from_name(name: &str) -> Option<Algorithm> {
    match name {
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// The JWK of a public key (without `kid`): RFC 7638 member order, so its
/// serialization is also the thumbprint input.
fn jwk_members(alg: Algorithm, public: &[u8]) -> Option<serde_json::Value> {
    match alg {
        Algorithm::ES256 => {
            let point = public.strip_prefix(&[4u8])?;
            if point.len() != 64 {
                return None;
            }
            let (x, y) = point.split_at(32);
            Some(
                serde_json::json!({"crv": "P-256", "kty": "EC", "x": B64.encode(x), "y": B64.encode(y)}),
            )
        }
        Algorithm::EdDSA => {
            Some(serde_json::json!({"crv": "Ed25519", "kty": "OKP", "x": B64.encode(public)}))
        }
        _ => None,
    }
}

/// RFC 7638 JWK thumbprint, the key id.
fn thumbprint(alg: Algorithm, public: &[u8]) -> Option<String> {
    // serde_json's Map is ordered by key, which is the RFC 7638 order.
    let canonical = serde_json::to_vec(&jwk_members(alg, public)?).ok()?;
    Some(B64.encode(ring::digest::digest(&ring::digest::SHA256, &canonical)))
}

fn decoding_key(alg: Algorithm, public: &[u8]) -> DecodingKey {
    match alg {
        Algorithm::EdDSA => DecodingKey::from_ed_der(public),
        _ => DecodingKey::from_ec_der(public),
    }
}

/// The key signing right now.
pub struct ActiveKey {
    /// Key id.
    pub kid: String,
    /// JOSE algorithm.
    pub alg: Algorithm,
    /// Private key (PKCS#8) for jsonwebtoken.
    pub encoding: EncodingKey,
}

/// A consistent snapshot of the ring: what signs and what verifies.
pub struct KeySet {
    /// Signing key.
    pub active: ActiveKey,
    /// Verification keys by kid (every published key).
    pub verify: HashMap<String, (Algorithm, DecodingKey)>,
    /// The published JWK Set, serialized once per change.
    pub jwks_json: String,
    /// Public metadata of every published key.
    pub records: Vec<KeyRecord>,
    /// Every key that ever signed, published or not, for the audit trail's
    /// checkpoints (never for tokens).
    pub history: HashMap<String, (Algorithm, DecodingKey)>,
    /// Keys withdrawn in an emergency: what they signed proves nothing.
    pub withdrawn: std::collections::HashSet<String>,
    /// Key of the MAC a lease keeps over its newest token (from the KEK).
    pub token_mac: ring::hmac::Key,
}

/// The key ring: a snapshot swapped as a whole, so readers always see a
/// consistent set.
pub struct KeyRing {
    current: RwLock<Arc<KeySet>>,
    created: Option<String>,
    kek: Kek,
    alg: SigningAlg,
    changes: tokio::sync::watch::Sender<u64>,
}

impl KeyRing {
    /// See [`Kek::deployment_id`].
    pub fn deployment_id(&self) -> Result<String, KeyError> {
        self.kek.deployment_id()
    }

    /// Seal a secret the broker keeps for another system (a database's
    /// admin password) under the KEK, bound to `aad` (see [`Kek::seal`]).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.kek.seal(aad, plain)
    }

    /// Open what [`KeyRing::seal`] sealed; `None` if it does not open.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        self.kek.open(aad, sealed)
    }

    /// Load the ring from the store, creating the first signing key if there
    /// is none. Sealed records that do not open are refused, never replaced.
    pub async fn load_or_create(
        store: &dyn Store,
        kek: &Kek,
        alg: SigningAlg,
        now: Millis,
    ) -> Result<Self, KeyError> {
        // Anything holding a key ring can sign: make sure jsonwebtoken has
        // its provider (it panics without one). Idempotent.
        crate::jose::install();
        kek.check_against(store).await?;
        let mut records = store.keys().await?;
        let mut created = None;
        if !records.iter().any(|r| r.state == KeyState::Active) {
            let rec = generate(kek, alg, now)?;
            crate::store::batch::write_one(store, crate::store::Write::PutKey(rec.clone())).await?;
            store.sync().await?;
            tracing::info!(kid = %rec.kid, alg = %rec.alg, "generated signing key");
            created = Some(rec.kid.clone());
            records.push(rec);
        }
        let set = build_set(kek, records)?;
        Ok(Self {
            current: RwLock::new(Arc::new(set)),
            created,
            kek: Kek(kek.0),
            alg,
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// Rebuild the snapshot from the store (after a rotation step). Readers
    /// switch to the new set atomically.
    pub async fn reload(&self, store: &dyn Store) -> Result<(), KeyError> {
        self.install(build_set(&self.kek, store.keys().await?)?);
        Ok(())
    }

    /// Swap `set` in for every reader at once and tell the watchers.
    fn install(&self, set: KeySet) {
        let set = Arc::new(set);
        match self.current.write() {
            Ok(mut g) => *g = set,
            Err(p) => *p.into_inner() = set,
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Reload only if the stored records differ from the snapshot's (another
    /// broker on a shared store carried out a rotation step). Returns
    /// whether the ring changed.
    pub async fn refresh(&self, store: &dyn Store) -> Result<bool, KeyError> {
        let stored = store.keys().await?;
        if same_records(&self.current(), &stored) {
            return Ok(false);
        }
        self.install(build_set(&self.kek, stored)?);
        Ok(true)
    }

    /// A new sealed key record in state `state` (not stored).
    pub fn generate(&self, state: KeyState, now: Millis) -> Result<KeyRecord, KeyError> {
        let mut rec = generate(&self.kek, self.alg, now)?;
        rec.state = state;
        rec.activated_at = (state == KeyState::Active).then_some(now);
        Ok(rec)
    }

    /// How many times the published set changed since start (tests and
    /// watchers wait on it).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The kid of a key generated by this start, if any (for the trail).
    pub fn created(&self) -> Option<&str> {
        self.created.as_deref()
    }

    /// See [`Kek::console_seal_key`].
    pub fn console_seal_key(&self) -> Result<ring::aead::LessSafeKey, KeyError> {
        self.kek.console_seal_key()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

fn generate(kek: &Kek, alg: SigningAlg, now: Millis) -> Result<KeyRecord, KeyError> {
    let rng = SystemRandom::new();
    let pkcs8 = match alg {
        SigningAlg::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
        SigningAlg::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
    }
    .map_err(|_| KeyError::Generate("key generation failed".into()))?;
    let jose = alg.jose();
    let public = crate::jose::public_key(jose, pkcs8.as_ref())
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let kid =
        thumbprint(jose, &public).ok_or_else(|| KeyError::Generate("bad public key".into()))?;
    Ok(KeyRecord {
        sealed_private: kek.seal(kid.as_bytes(), pkcs8.as_ref())?,
        kid,
        alg: alg_name(jose).into(),
        state: KeyState::Active,
        public,
        created_at: now,
        activated_at: Some(now),
        retire_at: None,
    })
}

/// The signing half of the ACTIVE key `r`, unsealed and checked against
/// its public key.
fn open_active(kek: &Kek, r: &KeyRecord, alg: Algorithm) -> Result<ActiveKey, KeyError> {
    let corrupt = |detail: &str| KeyError::Corrupt {
        kid: r.kid.clone(),
        detail: detail.into(),
    };
    let pkcs8 = kek
        .open(r.kid.as_bytes(), &r.sealed_private)
        .ok_or_else(|| corrupt("sealed private key does not open"))?;
    let public =
        crate::jose::public_key(alg, &pkcs8).map_err(|_| corrupt("private key does not parse"))?;
    if public != r.public {
        return Err(corrupt("private key does not match the public key"));
    }
    let encoding = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_der(&pkcs8),
        _ => EncodingKey::from_ec_der(&pkcs8),
    };
    Ok(ActiveKey {
        kid: r.kid.clone(),
        alg,
        encoding,
    })
}

/// Do the stored records publish exactly the snapshot's keys, in the same
/// states, and withdraw the same ones? (The snapshot keeps no sealed
/// private parts, so those are not compared.)
fn same_records(snapshot: &KeySet, stored: &[KeyRecord]) -> bool {
    let public = |r: &KeyRecord| KeyRecord {
        sealed_private: Vec::new(),
        ..r.clone()
    };
    let mut published: Vec<KeyRecord> = stored
        .iter()
        .filter(|r| r.state.is_published())
        .map(public)
        .collect();
    let mut held = snapshot.records.clone();
    published.sort_by(|a, b| a.kid.cmp(&b.kid));
    held.sort_by(|a, b| a.kid.cmp(&b.kid));
    let withdrawn = stored
        .iter()
        .filter(|r| r.state == KeyState::Withdrawn)
        .count();
    published == held
        && withdrawn == snapshot.withdrawn.len()
        && stored
            .iter()
            .filter(|r| r.state == KeyState::Withdrawn)
            .all(|r| snapshot.withdrawn.contains(&r.kid))
}

fn build_set(kek: &Kek, all: Vec<KeyRecord>) -> Result<KeySet, KeyError> {
    let mut verify = HashMap::new();
    let mut history = HashMap::new();
    let mut withdrawn = std::collections::HashSet::new();
    let mut jwks = Vec::new();
    let mut active = None;
    let mut records = Vec::new();
    for r in all {
        let corrupt = |detail: &str| KeyError::Corrupt {
            kid: r.kid.clone(),
            detail: detail.into(),
        };
        let alg = alg_from_name(&r.alg).ok_or_else(|| corrupt("unknown algorithm"))?;
        if thumbprint(alg, &r.public).as_deref() != Some(r.kid.as_str()) {
            return Err(corrupt("public key does not match its kid"));
        }
        history.insert(r.kid.clone(), (alg, decoding_key(alg, &r.public)));
        if r.state == KeyState::Withdrawn {
            withdrawn.insert(r.kid.clone());
        }
        if !r.state.is_published() {
            continue;
        }
        if r.state == KeyState::Active {
            active = Some(open_active(kek, &r, alg)?);
        }
        let mut jwk = jwk_members(alg, &r.public).ok_or_else(|| corrupt("bad public key"))?;
        if let Some(obj) = jwk.as_object_mut() {
            obj.insert("kid".into(), r.kid.clone().into());
            obj.insert("alg".into(), alg_name(alg).into());
            obj.insert("use".into(), "sig".into());
        }
        jwks.push(jwk);
        verify.insert(r.kid.clone(), (alg, decoding_key(alg, &r.public)));
        records.push(r);
    }
    let active = active.ok_or_else(|| KeyError::Corrupt {
        kid: "-".into(),
        detail: "no active signing key".into(),
    })?;
    let jwks_json = serde_json::json!({ "keys": jwks }).to_string();
    let records = records
        .into_iter()
        .map(|mut r| {
            r.sealed_private.clear();
            r
        })
        .collect();
    Ok(KeySet {
        active,
        verify,
        jwks_json,
        records,
        history,
        withdrawn,
        token_mac: kek.token_mac_key()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::store::conformance::TestWrites as _;
    use crate::store::mem::MemStore;

    #[test]
    fn missing_or_malformed_kek_files_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = Kek::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        // A KEK file is owner-only (issue 9); these fixtures are.
        let private = |p: &std::path::Path, text: &str| {
            std::fs::write(p, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        };
        let bad = dir.path().join("bad");
        private(&bad, "not hex");
        let err = Kek::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("64 hex characters"), "{err}");
        let good = dir.path().join("good");
        private(&good, &format!("{}\n", "ab".repeat(32)));
        assert!(Kek::from_file(&good).is_ok());
    }

    /// Issue 9, finding 11: a KEK others can read is refused, saying why.
    #[cfg(unix)]
    #[test]
    fn a_kek_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let kek = dir.path().join("kek");
        std::fs::write(&kek, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Kek::from_file(&kek).unwrap_err().to_string();
        assert!(
            err.contains("mode 644") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn kek_round_trip_and_wrong_kek_refused() {
        let (kek, _) = Kek::generate().unwrap();
        let sealed = kek.seal(b"aad", b"secret").unwrap();
        assert_eq!(kek.open(b"aad", &sealed).unwrap(), b"secret");
        assert!(kek.open(b"other", &sealed).is_none());
        let (other, _) = Kek::generate().unwrap();
        assert!(other.open(b"aad", &sealed).is_none());

        let store = MemStore::new();
        KeyRing::load_or_create(&store, &kek, SigningAlg::Es256, 1)
            .await
            .unwrap();
        let err = KeyRing::load_or_create(&store, &other, SigningAlg::Es256, 1)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::WrongKek), "{err}");
    }

    #[tokio::test]
    async fn sealed_record_holds_no_clear_private_key_and_corruption_is_refused() {
        let (kek, _) = Kek::generate().unwrap();
        let store = MemStore::new();
        let ring = KeyRing::load_or_create(&store, &kek, SigningAlg::Es256, 1)
            .await
            .unwrap();
        let kid = ring.current().active.kid.clone();
        let mut rec = store.keys().await.unwrap().pop().unwrap();
        let pkcs8 = kek.open(kid.as_bytes(), &rec.sealed_private).unwrap();
        // The 32-byte private scalar sits inside the PKCS#8; no 16-byte window
        // of the PKCS#8 may appear in the sealed bytes.
        assert!(
            pkcs8
                .windows(16)
                .all(|w| !rec.sealed_private.windows(16).any(|s| s == w))
        );
        let last = rec.sealed_private.len() - 1;
        rec.sealed_private[last] ^= 1;
        store.put_key(&rec).await.unwrap();
        let err = KeyRing::load_or_create(&store, &kek, SigningAlg::Es256, 1)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn kid_is_rfc7638_thumbprint() {
        // RFC 7638 section 3.1 example uses RSA; check the EC form against a
        // value computed independently (python: sha256 of the canonical JSON).
        let (kek, _) = Kek::generate().unwrap();
        let rec = generate(&kek, SigningAlg::EdDsa, 0).unwrap();
        let members = jwk_members(Algorithm::EdDSA, &rec.public).unwrap();
        let text = serde_json::to_string(&members).unwrap();
        assert!(
            text.starts_with(r#"{"crv":"Ed25519","kty":"OKP","x":""#),
            "{text}"
        );
        assert_eq!(rec.kid.len(), 43);
    }
}

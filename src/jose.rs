//! A ring-backed `CryptoProvider` for jsonwebtoken 11 (which ships none for
//! ring), limited to the algorithms portcullis signs with: ES256 and EdDSA,
//! plus RS256 *verification* for an OpenID provider's ID tokens (the
//! broker's own tokens are checked with their key's algorithm only).
//!
//! jsonwebtoken calls the signer factory for every token and hands it the raw
//! PKCS#8 bytes, so parsing the key each time would cost ~40% of signing
//! throughput. Parsed key pairs are cached by the SHA-256 of their PKCS#8
//! encoding (the cache never stores or compares the key bytes themselves).
//! Every other algorithm — HS*, other RS*, `none` — is refused, so
//! "HS256 signed with the public key" forgeries cannot even be checked.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as rsig, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};

/// The provider; installed once per process by [`install`].
static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Install the ring provider for jsonwebtoken (idempotent; a provider that is
/// already installed, ours or not, is left in place).
pub fn install() {
    let _ = PROVIDER.install_default();
}

#[derive(Clone)]
enum ParsedKey {
    Es256(Arc<EcdsaKeyPair>),
    Ed25519(Arc<Ed25519KeyPair>),
}

/// Keys rotate rarely, so the cache stays tiny; it is cleared if it ever grows
/// past this many entries rather than tracking recency.
const CACHE_LIMIT: usize = 32;

fn cache() -> &'static RwLock<HashMap<[u8; 32], ParsedKey>> {
    static CACHE: OnceLock<RwLock<HashMap<[u8; 32], ParsedKey>>> = OnceLock::new();
    CACHE.get_or_init(|| RwLock::new(HashMap::new()))
}

fn rng() -> &'static SystemRandom {
    static RNG: OnceLock<SystemRandom> = OnceLock::new();
    RNG.get_or_init(SystemRandom::new)
}

fn parse(alg: Algorithm, pkcs8: &[u8]) -> Result<ParsedKey, Error> {
    let digest = ring::digest::digest(&ring::digest::SHA256, pkcs8);
    let mut id = [0u8; 32];
    id.copy_from_slice(digest.as_ref());
    if let Ok(map) = cache().read()
        && let Some(k) = map.get(&id)
    {
        return Ok(k.clone());
    }
    let parsed = match alg {
        Algorithm::ES256 => ParsedKey::Es256(Arc::new(
            EcdsaKeyPair::from_pkcs8(&rsig::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, rng())
                .map_err(|_| Error::from(ErrorKind::InvalidEcdsaKey))?,
        )),
        Algorithm::EdDSA => ParsedKey::Ed25519(Arc::new(
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                .map_err(|_| Error::from(ErrorKind::InvalidEddsaKey))?,
        )),
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    if let Ok(mut map) = cache().write() {
        if map.len() >= CACHE_LIMIT {
            map.clear();
        }
        map.insert(id, parsed.clone());
    }
    Ok(parsed)
}

struct Signer {
    alg: Algorithm,
    key: ParsedKey,
}

impl signature::Signer<Vec<u8>> for Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        match &self.key {
            ParsedKey::Es256(k) => k
                .sign(rng(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new()),
            ParsedKey::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
        }
    }
}

impl JwtSigner for Signer {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    let parsed = parse(*alg, key.as_bytes())?;
    Ok(Box::new(Signer {
        alg: *alg,
        key: parsed,
    }))
}

struct Verifier {
    alg: Algorithm,
    public: Vec<u8>,
}

impl signature::Verifier<Vec<u8>> for Verifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let algorithm: &dyn rsig::VerificationAlgorithm = match self.alg {
            Algorithm::ES256 => &rsig::ECDSA_P256_SHA256_FIXED,
            Algorithm::EdDSA => &rsig::ED25519,
            _ => return Err(signature::Error::new()),
        };
        rsig::UnparsedPublicKey::new(algorithm, &self.public)
            .verify(msg, sig)
            .map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for Verifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// RS256 (RSASSA-PKCS1-v1_5 with SHA-256, keys of 2048 bits or more):
/// verification only, for ID tokens of an organisation's OpenID provider
/// (most sign with it). The broker never signs with RSA, and its own tokens
/// are verified with their key's own algorithm only.
struct RsaVerifier {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl signature::Verifier<Vec<u8>> for RsaVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        rsig::RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&rsig::RSA_PKCS1_2048_8192_SHA256, msg, sig)
        .map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RsaVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    match alg {
        Algorithm::ES256 | Algorithm::EdDSA => Ok(Box::new(Verifier {
            alg: *alg,
            public: key.try_get_as_bytes()?.to_vec(),
        })),
        Algorithm::RS256 => match key.kind() {
            jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e } => {
                Ok(Box::new(RsaVerifier {
                    n: n.clone(),
                    e: e.clone(),
                }))
            }
            jsonwebtoken::DecodingKeyKind::SecretOrDer(_) => {
                Err(ErrorKind::InvalidKeyFormat.into())
            }
        },
        _ => Err(ErrorKind::UnsupportedAlgorithm.into()),
    }
}

/// The public half of a PKCS#8 key, in the raw form JOSE and ring use
/// (`04‖x‖y` for P-256, 32 bytes for Ed25519).
pub fn public_key(alg: Algorithm, pkcs8: &[u8]) -> Result<Vec<u8>, Error> {
    Ok(match parse(alg, pkcs8)? {
        ParsedKey::Es256(k) => k.public_key().as_ref().to_vec(),
        ParsedKey::Ed25519(k) => k.public_key().as_ref().to_vec(),
    })
}

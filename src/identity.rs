//! Who is calling. An identity is a SPIFFE-style URI taken from the
//! authenticated channel — the one URI SAN of the mTLS client certificate —
//! never from a request body. [`from_peer_certs`] is the one place that
//! extracts it, so other sources (JWT-SVIDs, Kubernetes tokens) can be added
//! beside it later.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Longest identity accepted.
pub const MAX_IDENTITY_LEN: usize = 2048;

/// How a person identity begins.
pub const PERSON_PREFIX: &str = "oidc:";
/// Longest claim value a person identity takes.
const MAX_PERSON_LEN: usize = 256;

/// A validated identity: a SPIFFE-style URI (workloads, and people with
/// client certificates) or `oidc:<name>` (people signed in to the console).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(String);

/// Why a string or certificate gives no identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Not a `spiffe://trust-domain/path` URI.
    #[error("`{0}` is not a spiffe://trust-domain/path URI")]
    NotSpiffe(String),
    /// No client certificate on the channel.
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate does not parse.
    #[error("client certificate does not parse")]
    BadCertificate,
    /// Not a `oidc:<name>` person identity.
    #[error(
        "`{0}` is not a person identity: oidc: then 1-256 characters, no spaces or control characters"
    )]
    NotPerson(String),
    /// The certificate has no URI SAN, or more than one.
    #[error("client certificate must carry exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The identity is in a trust domain an `[[issuer]]` owns: it signs in
    /// with that issuer's tokens, never with a certificate.
    #[error(
        "client certificate names an identity in a trust domain of issuer `{0}`, whose workloads sign in with its tokens only"
    )]
    Owned(String),
}

impl Identity {
    /// Parse `s`: `spiffe://`, a trust domain of lowercase letters, digits,
    /// `.`, `-` and `_`, then a non-empty path of segments as the SPIFFE ID
    /// spec allows them.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::NotSpiffe(s.chars().take(200).collect());
        if s.len() > MAX_IDENTITY_LEN {
            return Err(bad());
        }
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (domain, path) = rest.split_once('/').ok_or_else(bad)?;
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b));
        // SPIFFE ID spec §2.2: segments are non-empty, never `.` or `..`,
        // and only letters, digits, `.`, `-` and `_` (so no percent-encoding,
        // which would let two spellings name one workload).
        let path_ok = !path.is_empty()
            && path.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
            });
        if domain_ok && path_ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(bad())
        }
    }

    /// A person signed in through OpenID Connect, named by the provider's
    /// configured claim: `oidc:<value>` (e.g. `oidc:alice@example.org`).
    /// People only ever approve; they never hold tokens.
    pub fn person(value: &str) -> Result<Self, IdentityError> {
        let ok = !value.is_empty()
            && value.len() <= MAX_PERSON_LEN
            && value.chars().all(|c| {
                // No spaces, controls, bidi or zero-width characters: a
                // name must look like what it is in a log or a trail.
                !c.is_whitespace()
                    && !crate::text::is_display_control(c)
                    && !matches!(c, '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}')
            });
        if ok {
            Ok(Self(format!("{PERSON_PREFIX}{value}")))
        } else {
            Err(IdentityError::NotPerson(
                format!("{PERSON_PREFIX}{value}")
                    .chars()
                    .take(200)
                    .collect(),
            ))
        }
    }

    /// A policy group member: a SPIFFE ID or a person (`oidc:…`), so one
    /// approver group can hold both.
    pub fn parse_member(s: &str) -> Result<Self, IdentityError> {
        match s.strip_prefix(PERSON_PREFIX) {
            Some(value) => Self::person(value),
            None => Self::parse(s),
        }
    }

    /// The URI.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity in a verified client certificate chain (leaf first). The
/// chain was already verified against the client CA by the TLS layer.
pub fn from_peer_certs(chain: &[impl AsRef<[u8]>]) -> Result<Identity, IdentityError> {
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    let (_, cert) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|_| IdentityError::BadCertificate)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::BadCertificate)?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Identity::parse(one),
        other => Err(IdentityError::UriSanCount(other.len())),
    }
}

/// RFC 8705 §3.1 thumbprint of a DER certificate: base64url (no padding)
/// of its SHA-256, as carried in `cnf.x5t#S256`.
pub fn thumbprint(der: &[u8]) -> String {
    b64url(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Identities of the client certificates seen lately, by the SHA-256 of the
/// leaf's DER: parsing a certificate costs more than the rest of a small
/// RPC, and a connection presents the same one on every call. Only
/// certificates the TLS layer verified reach it, and only identities that
/// parsed are kept. Bounded: when full, it starts over.
#[derive(Debug, Default)]
pub struct SeenCerts {
    map: std::sync::Mutex<std::collections::HashMap<[u8; 32], Identity>>,
}

impl SeenCerts {
    /// Most certificates remembered (an identity is a URI of at most 2 KiB,
    /// so at most ~9 MiB).
    const MAX: usize = 4096;

    /// [`from_peer_certs`], remembered.
    pub fn identity(&self, chain: &[impl AsRef<[u8]>]) -> Result<Identity, IdentityError> {
        self.identify(chain).map(|(who, _)| who)
    }

    /// [`SeenCerts::identity`], and the leaf's RFC 8705 thumbprint
    /// (`x5t#S256`: base64url SHA-256 of its DER).
    pub fn identify(
        &self,
        chain: &[impl AsRef<[u8]>],
    ) -> Result<(Identity, String), IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::NoCertificate)?.as_ref();
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref());
        let x5t = b64url(&key);
        if let Some(who) = self.map.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok((who, x5t));
        }
        let who = from_peer_certs(chain)?;
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= Self::MAX {
                m.clear();
            }
            m.insert(key, who.clone());
        }
        Ok((who, x5t))
    }

    /// How many are remembered.
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// Is nothing remembered?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_for(uri: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn seen_certificates_name_the_same_identity_and_stay_bounded() {
        let seen = SeenCerts::default();
        let a = cert_for("spiffe://t/a");
        let b = cert_for("spiffe://t/b");
        let (_, x5t) = seen.identify(&[&a]).unwrap();
        assert_eq!(x5t, thumbprint(&a));
        assert_eq!(x5t.len(), 43, "32 bytes, base64url without padding");
        for _ in 0..3 {
            assert_eq!(seen.identity(&[&a]).unwrap().as_str(), "spiffe://t/a");
            assert_eq!(seen.identity(&[&b]).unwrap().as_str(), "spiffe://t/b");
        }
        assert_eq!(seen.len(), 2);
        // Failures are not remembered, and still fail.
        let none: [&[u8]; 0] = [];
        assert!(seen.identity(&none).is_err());
        assert!(seen.identity(&[b"not a certificate"]).is_err());
        assert_eq!(seen.len(), 2);
        let x = Identity::parse("spiffe://t/x").unwrap();
        for i in 2..SeenCerts::MAX {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seen.map.lock().unwrap().insert(key, x.clone());
        }
        assert_eq!(seen.len(), SeenCerts::MAX);
        let c = cert_for("spiffe://t/c");
        assert_eq!(seen.identity(&[&c]).unwrap().as_str(), "spiffe://t/c");
        assert_eq!(seen.len(), 1, "a full cache starts over");
    }

    #[test]
    fn parses_spiffe_ids() {
        assert!(Identity::parse("spiffe://example.org/ns/billing/sa/api").is_ok());
        for bad in [
            "https://example.org/x",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe:///path",
            "spiffe://Example.org/x",
            "spiffe://example.org/a b",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a?q",
            // Issue 9: dot segments and percent-encoding name one workload
            // two ways; the SPIFFE ID spec forbids them.
            "spiffe://example.org/ns/./app",
            "spiffe://example.org/ns/../admin",
            "spiffe://example.org/ns/%61pp",
            "spiffe://example.org/ns/app/",
            "spiffe://example.org/ns/a:b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod person_tests {
    use super::*;

    #[test]
    fn people_are_oidc_names_and_never_spiffe_ids() {
        let a = Identity::person("alice@example.org").unwrap();
        assert_eq!(a.as_str(), "oidc:alice@example.org");
        assert_eq!(Identity::parse_member("oidc:alice@example.org").unwrap(), a);
        assert!(Identity::parse_member("spiffe://t/x").is_ok());
        // A workload identity is never a person, nor the other way round.
        assert!(Identity::parse("oidc:alice@example.org").is_err());
        for bad in [
            "",
            "a b",
            "a\nb",
            "tab\there",
            "alice\u{202e}gro.elpmaxe@",
            "al\u{200b}ice@example.org",
            &"x".repeat(257),
        ] {
            assert!(Identity::person(bad).is_err(), "{bad:?}");
            assert!(Identity::parse_member(&format!("oidc:{bad}")).is_err());
        }
        assert!(Identity::parse_member("alice@example.org").is_err());
    }
}

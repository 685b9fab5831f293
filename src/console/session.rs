//! Console sessions and one-time sign-in links, held in the broker's
//! memory (a restart signs everyone out; docs/design-console.md says what
//! several brokers need), CSRF tokens, and sealed OpenID sign-ins.
//!
//! Every secret handed to a browser (session cookie, link, OIDC state) is
//! 32 random bytes; the session and link maps are keyed by its SHA-256, so
//! a lookup never compares the secret itself and a memory dump holds no
//! usable cookie.
//! CSRF tokens are an HMAC of the session under a per-process key, checked
//! with `ring::hmac::verify` (constant time). An OpenID sign-in in progress
//! keeps no state on the server: its PKCE verifier, nonce, `state` and
//! deadline ride in a cookie sealed with AES-256-GCM under a per-process
//! key, so nobody can fill the broker's memory by starting sign-ins.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};

use crate::identity::Identity;
use crate::store::Millis;
use crate::text::NoRandomness;

/// How long a session lives, however active (short: approvers sign in
/// again rather than keep a console open for days).
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// How long a one-time link from `portcullis ui login` works.
pub const LINK_TTL: Duration = Duration::from_secs(60);
/// How long an OpenID sign-in may take from redirect to callback.
pub const SIGN_IN_TTL: Duration = Duration::from_secs(10 * 60);
/// Bound on live entries of each kind (expired ones are swept first).
const MAX_ENTRIES: usize = 10_000;

/// How a person signed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// OpenID Connect with the organisation's provider.
    Oidc,
    /// A one-time link made over mTLS.
    Link,
}

/// A signed-in person.
#[derive(Clone, Debug)]
pub struct Session {
    /// Who.
    pub who: Identity,
    /// How they signed in.
    pub via: Via,
    /// Its key in the session map (SHA-256 of the cookie).
    pub key: [u8; 32],
    /// When it ends.
    pub expires_at: Millis,
}

/// A one-time link waiting to be opened.
struct Link {
    who: Identity,
    next: Option<String>,
    expires_at: Millis,
}

/// An OpenID sign-in between redirect and callback (sealed into a cookie).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SignIn {
    /// The `state` parameter it was started with.
    pub state: String,
    /// PKCE code verifier (RFC 7636).
    pub verifier: String,
    /// The `nonce` the ID token must carry.
    pub nonce: String,
    /// When it stops being accepted.
    pub expires_at: Millis,
}

/// The console's short-lived secrets.
pub struct Secrets {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    links: Mutex<HashMap<[u8; 32], Link>>,
    csrf_key: ring::hmac::Key,
    seal_key: ring::aead::LessSafeKey,
}

/// A fresh 32-byte secret, base64url.
pub fn random_secret() -> Result<String, NoRandomness> {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).map_err(|_| NoRandomness)?;
    Ok(B64.encode(b))
}

fn key_of(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut k = [0u8; 32];
    k.copy_from_slice(d.as_ref());
    k
}

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Insert under `key`, first dropping expired entries; refuse when full.
fn insert<V>(
    map: &Mutex<HashMap<[u8; 32], V>>,
    key: [u8; 32],
    value: V,
    now: Millis,
    expires: impl Fn(&V) -> Millis,
) -> bool {
    let mut m = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if m.len() >= MAX_ENTRIES {
        m.retain(|_, v| expires(v) > now);
    }
    if m.len() >= MAX_ENTRIES {
        return false;
    }
    m.insert(key, value);
    true
}

/// Remove and return the entry for `secret` if it has not expired.
fn take<V>(
    map: &Mutex<HashMap<[u8; 32], V>>,
    secret: &str,
    now: Millis,
    expires: impl Fn(&V) -> Millis,
) -> Option<V> {
    let mut m = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    m.remove(&key_of(secret)).filter(|v| expires(v) > now)
}

/// Why a secret could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No randomness.
    #[error(transparent)]
    Random(#[from] NoRandomness),
    /// Too many live entries.
    #[error("too many console sessions and sign-in links at once; try again shortly")]
    Full,
}

impl Secrets {
    /// Empty maps and a fresh CSRF key.
    pub fn new() -> Result<Self, NoRandomness> {
        let rng = SystemRandom::new();
        let csrf_key =
            ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).map_err(|_| NoRandomness)?;
        let mut k = [0u8; 32];
        rng.fill(&mut k).map_err(|_| NoRandomness)?;
        let seal_key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &k)
            .map(ring::aead::LessSafeKey::new)
            .map_err(|_| NoRandomness)?;
        Ok(Self {
            sessions: Mutex::default(),
            links: Mutex::default(),
            csrf_key,
            seal_key,
        })
    }

    /// Start a session for `who`; the cookie value and the session.
    pub fn open_session(
        &self,
        who: Identity,
        via: Via,
        now: Millis,
    ) -> Result<(String, Session), SecretError> {
        let cookie = random_secret()?;
        let s = Session {
            who,
            via,
            key: key_of(&cookie),
            expires_at: now.saturating_add(millis(SESSION_TTL)),
        };
        if insert(&self.sessions, s.key, s.clone(), now, |s| s.expires_at) {
            Ok((cookie, s))
        } else {
            Err(SecretError::Full)
        }
    }

    /// The live session of `cookie`.
    pub fn session(&self, cookie: &str, now: Millis) -> Option<Session> {
        let m = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(&key_of(cookie))
            .filter(|s| s.expires_at > now)
            .cloned()
    }

    /// End one session (sign-out).
    pub fn end_session(&self, s: &Session) {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&s.key);
    }

    /// End every session of `who` (their access was taken away); how many.
    pub fn end_sessions_of(&self, who: &Identity) -> usize {
        let mut m = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = m.len();
        m.retain(|_, s| &s.who != who);
        before - m.len()
    }

    /// The CSRF token of session `s` (stable for its life).
    pub fn csrf(&self, s: &Session) -> String {
        B64.encode(ring::hmac::sign(&self.csrf_key, &s.key).as_ref())
    }

    /// Is `token` the CSRF token of `s`? (Constant time.)
    pub fn csrf_ok(&self, s: &Session, token: &str) -> bool {
        B64.decode(token)
            .is_ok_and(|tag| ring::hmac::verify(&self.csrf_key, &s.key, &tag).is_ok())
    }

    /// A one-time link secret for `who`, valid [`LINK_TTL`] from `now`.
    pub fn make_link(
        &self,
        who: Identity,
        next: Option<String>,
        now: Millis,
    ) -> Result<(String, Millis), SecretError> {
        let secret = random_secret()?;
        let expires_at = now.saturating_add(millis(LINK_TTL));
        let link = Link {
            who,
            next,
            expires_at,
        };
        if insert(&self.links, key_of(&secret), link, now, |l| l.expires_at) {
            Ok((secret, expires_at))
        } else {
            Err(SecretError::Full)
        }
    }

    /// Use a link: its identity and where it leads, once, within its time.
    pub fn use_link(&self, secret: &str, now: Millis) -> Option<(Identity, Option<String>)> {
        take(&self.links, secret, now, |l| l.expires_at).map(|l| (l.who, l.next))
    }

    /// Who a link is for, without using it (the confirmation page).
    pub fn peek_link(&self, secret: &str, now: Millis) -> Option<Identity> {
        let m = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(&key_of(secret))
            .filter(|l| l.expires_at > now)
            .map(|l| l.who.clone())
    }

    /// `s` sealed for a cookie: base64url(nonce ‖ AES-256-GCM(json)).
    pub fn seal(&self, s: &SignIn) -> Result<String, NoRandomness> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| NoRandomness)?;
        let mut data = serde_json::to_vec(s).map_err(|_| NoRandomness)?;
        self.seal_key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut data,
            )
            .map_err(|_| NoRandomness)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(B64.encode(out))
    }

    /// The sign-in sealed in `cookie`, if it is ours, for `state`, and
    /// not past its deadline.
    pub fn unseal(&self, cookie: &str, state: &str, now: Millis) -> Option<SignIn> {
        let raw = B64.decode(cookie).ok()?;
        if raw.len() < ring::aead::NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = raw.split_at(ring::aead::NONCE_LEN);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .seal_key
            .open_in_place(nonce, ring::aead::Aad::empty(), &mut sealed)
            .ok()?;
        let s: SignIn = serde_json::from_slice(plain).ok()?;
        (s.expires_at > now && same_secret(&s.state, state)).then_some(s)
    }
}

/// Do two secrets match? Compares their SHA-256 digests, so the time taken
/// says nothing about the secrets.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (x, y) = (key_of(a), key_of(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity::person("alice@example.org").unwrap()
    }

    #[test]
    fn a_link_works_once_and_only_within_its_minute() {
        let s = Secrets::new().unwrap();
        let (link, expires) = s.make_link(alice(), None, 1_000).unwrap();
        assert_eq!(expires, 61_000);
        assert!(s.use_link(&link, 61_000).is_none(), "expired at its end");
        let (link, _) = s.make_link(alice(), Some("r_1".into()), 1_000).unwrap();
        let (who, next) = s.use_link(&link, 60_999).unwrap();
        assert_eq!((who, next.as_deref()), (alice(), Some("r_1")));
        assert!(s.use_link(&link, 2_000).is_none(), "used once");
        assert!(s.use_link("not-a-link", 2_000).is_none());
    }

    #[test]
    fn sessions_end_on_time_on_sign_out_and_when_access_is_taken() {
        let s = Secrets::new().unwrap();
        let (cookie, sess) = s.open_session(alice(), Via::Link, 0).unwrap();
        assert!(s.session(&cookie, millis(SESSION_TTL) - 1).is_some());
        assert!(s.session(&cookie, millis(SESSION_TTL)).is_none());
        s.end_session(&sess);
        assert!(s.session(&cookie, 1).is_none());
        let (cookie, _) = s.open_session(alice(), Via::Oidc, 0).unwrap();
        assert_eq!(s.end_sessions_of(&alice()), 1);
        assert!(s.session(&cookie, 1).is_none());
    }

    #[test]
    fn a_sealed_sign_in_opens_only_for_its_state_in_time_and_unaltered() {
        let s = Secrets::new().unwrap();
        let sign_in = SignIn {
            state: "st".into(),
            verifier: "v".into(),
            nonce: "n".into(),
            expires_at: 100,
        };
        let cookie = s.seal(&sign_in).unwrap();
        assert!(!cookie.contains("st") || cookie.len() > 40);
        let back = s.unseal(&cookie, "st", 99).unwrap();
        assert_eq!((back.verifier.as_str(), back.nonce.as_str()), ("v", "n"));
        assert!(s.unseal(&cookie, "other", 99).is_none(), "another state");
        assert!(s.unseal(&cookie, "st", 100).is_none(), "past its deadline");
        let mut raw = B64.decode(&cookie).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(s.unseal(&B64.encode(raw), "st", 99).is_none(), "altered");
        let other = Secrets::new().unwrap();
        assert!(
            other.unseal(&cookie, "st", 99).is_none(),
            "another broker's key"
        );
        assert!(s.unseal("", "st", 99).is_none());
    }

    #[test]
    fn a_csrf_token_belongs_to_its_session() {
        let s = Secrets::new().unwrap();
        let (_, a) = s.open_session(alice(), Via::Link, 0).unwrap();
        let (_, b) = s.open_session(alice(), Via::Link, 0).unwrap();
        let token = s.csrf(&a);
        assert!(s.csrf_ok(&a, &token));
        assert!(!s.csrf_ok(&b, &token));
        assert!(!s.csrf_ok(&a, ""));
        assert!(!s.csrf_ok(&a, "!!"));
        assert!(same_secret("x", "x") && !same_secret("x", "y"));
    }
}

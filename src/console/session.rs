//! Console sessions and one-time sign-in links, kept in the store's
//! ephemeral part ([`Store::put_ephemeral`] and its siblings) so that on a shared store every
//! broker knows them; CSRF tokens; sealed OpenID sign-ins.
//!
//! Every secret handed to a browser (session cookie, link, CSRF token,
//! OpenID state) is 32 random bytes. Sessions and links are stored under
//! the SHA-256 of their secret (with a per-kind prefix), so a lookup never
//! compares the secret and the store holds no usable cookie. A session's
//! CSRF token is stored with it and compared in constant time. An OpenID
//! sign-in in progress keeps nothing on the server: `state`, PKCE verifier,
//! nonce and deadline ride in a cookie sealed with AES-256-GCM under a key
//! derived from the KEK (every broker sharing the store shares the KEK),
//! so nobody can fill the store by starting sign-ins.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::clock::millis;
use crate::identity::Identity;
use crate::store::{Millis, Store, StoreError};
use crate::text::NoRandomness;

/// How long a session lives, however active (short: approvers sign in
/// again rather than keep a console open for days).
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// How long a one-time link from `portcullis ui login` works.
pub const LINK_TTL: Duration = Duration::from_secs(60);
/// How long an OpenID sign-in may take from redirect to callback.
pub const SIGN_IN_TTL: Duration = Duration::from_secs(10 * 60);

/// How a person signed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// OpenID Connect with the organisation's provider.
    Oidc,
    /// A one-time link made over mTLS.
    Link,
}

/// What the store keeps of a session.
#[derive(Serialize, Deserialize)]
struct SessionRecord {
    who: String,
    via: Via,
    csrf: String,
    /// When it was opened (0 in sessions of older builds: any mark that
    /// ends sessions ends those too).
    #[serde(default)]
    since: Millis,
}

/// Whose sessions an end mark is for when it is for everyone's (never an
/// identity: those start with a scheme).
const EVERYONE: &str = "*";

/// A signed-in person (its `Debug` leaves the store key and CSRF token out).
#[derive(Clone)]
pub struct Session {
    /// Who.
    pub who: Identity,
    /// How they signed in.
    pub via: Via,
    /// Its key in the store (SHA-256 of the cookie, prefixed).
    key: [u8; 32],
    /// Its CSRF token (a secret of the page, not of the cookie).
    csrf: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("who", &self.who)
            .field("via", &self.via)
            .finish_non_exhaustive()
    }
}

/// Could `secret` be one of ours (32 bytes, base64url)? Anything else is
/// turned away before the store is asked.
fn well_formed(secret: &str) -> bool {
    secret.len() == 43
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What the store keeps of a one-time link.
#[derive(Serialize, Deserialize)]
struct LinkRecord {
    who: String,
    next: Option<String>,
}

/// An OpenID sign-in between redirect and callback (sealed into a cookie).
#[derive(Clone, Serialize, Deserialize)]
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

/// Why a secret could not be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No randomness.
    #[error(transparent)]
    Random(#[from] NoRandomness),
    /// The store refused.
    #[error("the broker could not keep the sign-in: {0}")]
    Store(#[from] StoreError),
    /// A sign-in could not be sealed.
    #[error("the sign-in could not be sealed: {0}")]
    Seal(String),
}

/// The console's short-lived secrets.
pub struct Secrets {
    store: Arc<dyn Store>,
    seal_key: ring::aead::LessSafeKey,
}

/// A fresh 32-byte secret, base64url.
pub fn random_secret() -> Result<String, NoRandomness> {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).map_err(|_| NoRandomness)?;
    Ok(B64.encode(b))
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(ctx.finish().as_ref());
    k
}

/// The store key of a `kind` of secret.
fn key_of(kind: &str, secret: &str) -> [u8; 32] {
    sha256(&[kind.as_bytes(), b"\0", secret.as_bytes()])
}

/// A link read: a store failure is logged (it fails closed: no sign-in).
fn logged(r: Result<Option<Vec<u8>>, StoreError>) -> Option<Vec<u8>> {
    r.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "console secret could not be read");
        None
    })
}

pub use crate::text::same_secret;

impl Secrets {
    /// Secrets kept in `store`, sign-ins sealed under `seal_key`.
    pub fn new(store: Arc<dyn Store>, seal_key: ring::aead::LessSafeKey) -> Self {
        Self { store, seal_key }
    }

    /// Start a session for `who`; the cookie value and the session.
    pub async fn open_session(
        &self,
        who: Identity,
        via: Via,
        now: Millis,
    ) -> Result<(String, Session), SecretError> {
        let cookie = random_secret()?;
        let rec = SessionRecord {
            who: who.as_str().to_owned(),
            via,
            csrf: random_secret()?,
            since: now,
        };
        let key = key_of("session", &cookie);
        let value = serde_json::to_vec(&rec).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.store
            .put_ephemeral(&key, &value, now.saturating_add(millis(SESSION_TTL)))
            .await?;
        Ok((
            cookie,
            Session {
                who,
                via,
                key,
                csrf: rec.csrf,
            },
        ))
    }

    /// The live session of `cookie`. A store failure signs nobody in.
    pub async fn session(&self, cookie: &str, now: Millis) -> Option<Session> {
        if !well_formed(cookie) {
            return None;
        }
        let key = key_of("session", cookie);
        let raw = match self.store.ephemeral(&key, now).await {
            Ok(raw) => raw?,
            Err(e) => {
                tracing::warn!(error = %e, "console session could not be read");
                return None;
            }
        };
        let rec: SessionRecord = serde_json::from_slice(&raw).ok()?;
        let s = Session {
            who: Identity::parse_member(&rec.who).ok()?,
            via: rec.via,
            key,
            csrf: rec.csrf,
        };
        for whose in [rec.who.as_str(), EVERYONE] {
            let mark = match self.store.ephemeral(&key_of("ended", whose), now).await {
                Ok(mark) => mark,
                Err(e) => {
                    tracing::warn!(error = %e, "console session end marks could not be read");
                    return None;
                }
            };
            let ended_at = mark
                .and_then(|m| <[u8; 8]>::try_from(m.as_slice()).ok())
                .map(u64::from_be_bytes);
            if ended_at.is_some_and(|at| at >= rec.since) {
                if let Err(e) = self.end_session(&s, now).await {
                    tracing::warn!(error = %e, "an ended console session could not be removed");
                }
                return None;
            }
        }
        Some(s)
    }

    /// End every session `who` has open now, on every broker (`None`:
    /// everyone's). Sessions opened later are not touched; the mark lasts
    /// as long as a session can.
    pub async fn end_sessions_of(&self, who: Option<&str>, now: Millis) -> Result<(), StoreError> {
        let key = key_of("ended", who.unwrap_or(EVERYONE));
        self.store
            .put_ephemeral(
                &key,
                &now.to_be_bytes(),
                now.saturating_add(millis(SESSION_TTL)),
            )
            .await
    }

    /// End one session (sign-out, or access taken away), for every broker.
    pub async fn end_session(&self, s: &Session, now: Millis) -> Result<(), StoreError> {
        self.store.take_ephemeral(&s.key, now).await.map(|_| ())
    }

    /// The CSRF token of session `s`.
    pub fn csrf<'s>(&self, s: &'s Session) -> &'s str {
        &s.csrf
    }

    /// Is `token` the CSRF token of `s`? (Constant time.)
    pub fn csrf_ok(&self, s: &Session, token: &str) -> bool {
        !token.is_empty() && same_secret(&s.csrf, token)
    }

    /// A one-time link secret for `who`, valid [`LINK_TTL`] from `now`.
    pub async fn make_link(
        &self,
        who: &Identity,
        next: Option<String>,
        now: Millis,
    ) -> Result<(String, Millis), SecretError> {
        let secret = random_secret()?;
        let expires_at = now.saturating_add(millis(LINK_TTL));
        let rec = LinkRecord {
            who: who.as_str().to_owned(),
            next,
        };
        let value = serde_json::to_vec(&rec).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.store
            .put_ephemeral(&key_of("link", &secret), &value, expires_at)
            .await?;
        Ok((secret, expires_at))
    }

    fn link_of(raw: &[u8]) -> Option<(Identity, Option<String>)> {
        let rec: LinkRecord = serde_json::from_slice(raw).ok()?;
        Some((Identity::parse_member(&rec.who).ok()?, rec.next))
    }

    /// Who a link is for, without using it (the confirmation page).
    pub async fn peek_link(&self, secret: &str, now: Millis) -> Option<Identity> {
        if !well_formed(secret) {
            return None;
        }
        let raw = logged(self.store.ephemeral(&key_of("link", secret), now).await)?;
        Self::link_of(&raw).map(|(who, _)| who)
    }

    /// Use a link: its identity and where it leads, once (whichever broker
    /// is asked), within its time.
    pub async fn use_link(&self, secret: &str, now: Millis) -> Option<(Identity, Option<String>)> {
        if !well_formed(secret) {
            return None;
        }
        let raw = logged(
            self.store
                .take_ephemeral(&key_of("link", secret), now)
                .await,
        )?;
        Self::link_of(&raw)
    }

    /// Forget sessions and links that ended; how many.
    pub async fn sweep(&self, now: Millis) -> Result<u64, StoreError> {
        self.store.purge_ephemeral(now).await
    }

    /// Remember that the sign-in with `state` was started, until `expires_at`
    /// (for every broker of a shared store): its callback works once.
    pub async fn begin_sign_in(&self, state: &str, expires_at: Millis) -> Result<(), StoreError> {
        self.store
            .put_ephemeral(&key_of("signin", state), b"", expires_at)
            .await
    }

    /// Use the sign-in with `state`: `true` once, within its time; `false`
    /// for a replayed callback (the provider is then not called again).
    pub async fn take_sign_in(&self, state: &str, now: Millis) -> bool {
        if !well_formed(state) {
            return false;
        }
        logged(
            self.store
                .take_ephemeral(&key_of("signin", state), now)
                .await,
        )
        .is_some()
    }

    /// `s` sealed for a cookie: base64url(nonce ‖ AES-256-GCM(json)).
    pub fn seal(&self, s: &SignIn) -> Result<String, SecretError> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| NoRandomness)?;
        let mut data = serde_json::to_vec(s).map_err(|e| SecretError::Seal(e.to_string()))?;
        self.seal_key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(b"portcullis console sign-in"),
                &mut data,
            )
            .map_err(|_| SecretError::Seal("AES-GCM refused".into()))?;
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
            .open_in_place(
                nonce,
                ring::aead::Aad::from(b"portcullis console sign-in"),
                &mut sealed,
            )
            .ok()?;
        let s: SignIn = serde_json::from_slice(plain).ok()?;
        (s.expires_at > now && same_secret(&s.state, state)).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;

    fn secrets(store: &Arc<dyn Store>, kek: u8) -> Secrets {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[kek; 32]).unwrap();
        Secrets::new(store.clone(), ring::aead::LessSafeKey::new(key))
    }

    fn fresh() -> Secrets {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        secrets(&store, 7)
    }

    fn alice() -> Identity {
        Identity::person("alice@example.org").unwrap()
    }

    #[tokio::test]
    async fn a_link_works_once_and_only_within_its_minute_on_any_broker() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let (one, two) = (secrets(&store, 7), secrets(&store, 7));
        let (link, expires) = one.make_link(&alice(), None, 1_000).await.unwrap();
        assert_eq!(expires, 61_000);
        assert!(
            two.peek_link(&link, 61_000).await.is_none(),
            "expired at its end"
        );
        assert!(two.use_link(&link, 61_000).await.is_none());
        let (link, _) = one
            .make_link(&alice(), Some("r_1".into()), 1_000)
            .await
            .unwrap();
        assert_eq!(
            two.peek_link(&link, 2_000).await,
            Some(alice()),
            "peeking spends nothing"
        );
        let (who, next) = two.use_link(&link, 60_999).await.unwrap();
        assert_eq!((who, next.as_deref()), (alice(), Some("r_1")));
        assert!(
            one.use_link(&link, 2_000).await.is_none(),
            "used once, anywhere"
        );
        assert!(one.use_link("not-a-link", 2_000).await.is_none());
    }

    #[tokio::test]
    async fn sessions_end_on_time_and_on_sign_out_on_every_broker() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let (one, two) = (secrets(&store, 7), secrets(&store, 7));
        let (cookie, sess) = one.open_session(alice(), Via::Link, 0).await.unwrap();
        let seen = two.session(&cookie, millis(SESSION_TTL) - 1).await.unwrap();
        assert_eq!((seen.who, seen.via), (alice(), Via::Link));
        assert!(two.session(&cookie, millis(SESSION_TTL)).await.is_none());
        two.end_session(&sess, 1).await.unwrap();
        assert!(
            one.session(&cookie, 1).await.is_none(),
            "signed out everywhere"
        );
        assert!(one.session("not-a-cookie", 1).await.is_none());
    }

    #[tokio::test]
    async fn a_csrf_token_belongs_to_its_session() {
        let s = fresh();
        let (_, a) = s.open_session(alice(), Via::Link, 0).await.unwrap();
        let (_, b) = s.open_session(alice(), Via::Link, 0).await.unwrap();
        let token = s.csrf(&a).to_owned();
        assert!(s.csrf_ok(&a, &token));
        assert!(!s.csrf_ok(&b, &token));
        assert!(!s.csrf_ok(&a, ""));
        assert!(same_secret("x", "x") && !same_secret("x", "y"));
    }

    #[test]
    fn a_sealed_sign_in_opens_only_for_its_state_in_time_and_unaltered() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let s = secrets(&store, 7);
        let sign_in = SignIn {
            state: "st".into(),
            verifier: "v".into(),
            nonce: "n".into(),
            expires_at: 100,
        };
        let cookie = s.seal(&sign_in).unwrap();
        let back = secrets(&store, 7).unseal(&cookie, "st", 99).unwrap();
        assert_eq!(
            (back.verifier.as_str(), back.nonce.as_str()),
            ("v", "n"),
            "another broker with the same KEK opens it"
        );
        assert!(s.unseal(&cookie, "other", 99).is_none(), "another state");
        assert!(s.unseal(&cookie, "st", 100).is_none(), "past its deadline");
        let mut raw = B64.decode(&cookie).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(s.unseal(&B64.encode(raw), "st", 99).is_none(), "altered");
        assert!(
            secrets(&store, 8).unseal(&cookie, "st", 99).is_none(),
            "another KEK"
        );
        assert!(s.unseal("", "st", 99).is_none());
    }
}

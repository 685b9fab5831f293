//! Each issuer's verification keys: fetched at start and every 10
//! minutes, and for a `kid` they lack at most once per 30 s (one fetch in
//! flight; concurrent misses wait for it). A failed fetch keeps the last
//! good keys; keys 24 h past their last good fetch are dropped. No stream
//! of tokens can make the broker fetch in a loop: the fetch-storm test
//! counts.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use tokio::time::Instant;

/// Fewest seconds between two fetches an unknown `kid` causes.
pub const MISS_INTERVAL: Duration = Duration::from_secs(30);
/// How often keys are fetched in the background.
pub const REFRESH: Duration = Duration::from_secs(600);
/// Keys this long past their last good fetch are no longer trusted.
pub const STALE: Duration = Duration::from_secs(24 * 3600);
/// Largest answer read from an issuer.
const MAX_BODY: usize = 1 << 20;
/// Per-fetch timeout.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches by issuer and outcome, as metrics count them.
pub type FetchCounter = Family<Vec<(String, String)>, Counter>;

/// An HTTPS client for one issuer's endpoints.
pub type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Where an issuer's keys come from.
pub enum Source {
    /// `{issuer}/.well-known/openid-configuration`, then its `jwks_uri`
    /// (on the issuer's own host).
    Discovery {
        /// The exact `iss`.
        issuer: String,
        /// Its HTTPS client.
        client: Client,
    },
    /// A JWKS URL.
    Url {
        /// The URL.
        url: String,
        /// Its HTTPS client.
        client: Client,
    },
    /// A JWKS file, read again at each fetch.
    File(PathBuf),
    /// Keys written in the policy.
    Inline(JwkSet),
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl Source {
    async fn fetch(&self) -> Result<JwkSet, String> {
        match self {
            Self::Inline(set) => Ok(set.clone()),
            Self::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
            }
            Self::Url { url, client } => get_json(client, url).await,
            Self::Discovery { issuer, client } => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let d: Discovery = get_json(client, &url).await?;
                if d.issuer != *issuer {
                    return Err(format!(
                        "discovery names issuer `{}`, not `{issuer}`",
                        crate::text::escape_controls(&d.issuer)
                    ));
                }
                if !crate::policy::safe_url(&d.jwks_uri) || host(&d.jwks_uri) != host(issuer) {
                    return Err(
                        "discovery's jwks_uri is not https on the issuer's own host (name `jwks_url` in the policy to trust another)".into(),
                    );
                }
                get_json(client, &d.jwks_uri).await
            }
        }
    }
}

fn host(url: &str) -> Option<String> {
    url.parse::<http::Uri>()
        .ok()?
        .authority()
        .map(|a| a.as_str().to_ascii_lowercase())
}

/// GET `url` as JSON: 1 MiB at most, 10 s, redirects not followed.
async fn get_json<T: serde::de::DeserializeOwned>(client: &Client, url: &str) -> Result<T, String> {
    let req = hyper::Request::get(url)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let body = tokio::time::timeout(TIMEOUT, Limited::new(resp.into_body(), MAX_BODY).collect())
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

#[derive(Default)]
struct State {
    keys: Option<JwkSet>,
    good_at: Option<Instant>,
    tried_at: Option<Instant>,
}

/// One issuer's keys.
pub struct KeyCache {
    issuer: String,
    source: Source,
    state: Mutex<State>,
    flight: tokio::sync::Mutex<()>,
    counter: FetchCounter,
}

impl KeyCache {
    /// A cache for issuer entry `issuer` (its name), empty until the first
    /// fetch.
    pub fn new(issuer: &str, source: Source, counter: FetchCounter) -> Self {
        Self {
            issuer: issuer.to_owned(),
            source,
            state: Mutex::new(State::default()),
            flight: tokio::sync::Mutex::new(()),
            counter,
        }
    }

    /// The key `kid`, fetching once if it is unknown and no fetch was
    /// tried in the last 30 s.
    pub async fn key(&self, kid: &str) -> Option<Jwk> {
        if let Some(k) = self.cached(kid) {
            return Some(k);
        }
        // With no keys yet (the start's fetch under way), wait for the
        // fetch in flight. With keys, never wait on a slow issuer: a
        // stream of made-up `kid`s would hold every exchange slot.
        let _flight = if self.has_keys() {
            match self.flight.try_lock() {
                Ok(g) => g,
                Err(_) => return None,
            }
        } else {
            self.flight.lock().await
        };
        // Another miss may have fetched while this one waited.
        if let Some(k) = self.cached(kid) {
            return Some(k);
        }
        if self.tried_within(MISS_INTERVAL) {
            return None;
        }
        self.fetch_now().await;
        self.cached(kid)
    }

    /// Fetch now (the background refresh), unless a fetch is in flight.
    pub async fn refresh(&self) {
        let Ok(_flight) = self.flight.try_lock() else {
            return;
        };
        self.fetch_now().await;
    }

    /// Whether keys are held.
    pub fn has_keys(&self) -> bool {
        self.with_keys(|_| ()).is_some()
    }

    fn tried_within(&self, d: Duration) -> bool {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.tried_at)
            .is_some_and(|t| t.elapsed() < d)
    }

    /// `f` of the keys held, once keys a day past their last good fetch
    /// are dropped; `None` when none are held.
    fn with_keys<T>(&self, f: impl FnOnce(&JwkSet) -> T) -> Option<T> {
        let mut s = self.state.lock().ok()?;
        if s.good_at.is_some_and(|t| t.elapsed() >= STALE) {
            tracing::warn!(issuer = %self.issuer, "the issuer's keys are a day past their last good fetch: dropped");
            s.keys = None;
            s.good_at = None;
        }
        s.keys.as_ref().map(f)
    }

    fn cached(&self, kid: &str) -> Option<Jwk> {
        self.with_keys(|set| set.find(kid).cloned()).flatten()
    }

    async fn fetch_now(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.tried_at = Some(Instant::now());
        }
        let outcome = match self.source.fetch().await {
            Ok(set) => {
                if let Ok(mut s) = self.state.lock() {
                    s.keys = Some(set);
                    s.good_at = Some(Instant::now());
                }
                "ok"
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "could not fetch the issuer's keys; the last good ones stay");
                "failed"
            }
        };
        self.counter
            .get_or_create(&vec![
                ("issuer".to_owned(), self.issuer.clone()),
                ("outcome".to_owned(), outcome.to_owned()),
            ])
            .inc();
    }
}

#[cfg(test)]
mod tests;

//! `federation`: workloads without a client certificate sign in with their
//! platform's signed token (GitHub Actions, Kubernetes, SPIFFE JWT-SVIDs;
//! docs/design-federation.md). This module verifies such a token against
//! the policy's `[[issuer]]` entries and their keys, and names the
//! identity it maps to; what that identity may get is the engine's and
//! the policy's business, as for any caller.

pub mod keys;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use hyper_util::rt::TokioExecutor;

pub use self::keys::{FetchCounter, KeyCache, Source};
pub use self::verify::{Check, Refusal, Verified};
use crate::policy::{Issuer, KeySource, Policy};

/// One trusted issuer: its entry and its keys.
pub struct Trusted {
    /// The policy's entry.
    pub issuer: Issuer,
    /// Its keys.
    pub keys: Arc<KeyCache>,
}

/// Every trusted issuer of the policy in force.
pub struct Federation {
    trusted: RwLock<Arc<BTreeMap<String, Arc<Trusted>>>>,
    counter: FetchCounter,
}

/// An entry's keys are fetched again from scratch only when where they
/// come from changed.
fn same_keys(a: &Issuer, b: &Issuer) -> bool {
    a.keys == b.keys && a.ca_file == b.ca_file && a.issuer == b.issuer
}

fn https(ca_file: Option<&std::path::Path>, name: &str) -> Result<keys::Client, String> {
    let tls = crate::tls::client_config(ca_file, &format!("issuer `{name}`"))?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector))
}

fn source(i: &Issuer) -> Result<Source, String> {
    let client = || https(i.ca_file.as_deref(), &i.name);
    Ok(match &i.keys {
        KeySource::Discovery => Source::Discovery {
            issuer: i
                .issuer
                .clone()
                .ok_or_else(|| format!("issuer `{}`: discovery needs `issuer`", i.name))?,
            client: client()?,
        },
        KeySource::JwksUrl(url) => Source::Url {
            url: url.clone(),
            client: client()?,
        },
        KeySource::JwksFile(path) => Source::File(path.clone()),
        KeySource::Inline(json) => Source::Inline(
            serde_json::from_str(json).map_err(|e| format!("issuer `{}`: jwks: {e}", i.name))?,
        ),
    })
}

impl Federation {
    /// The issuers of `policy`, with empty key caches (see [`Self::refresh`]).
    pub fn new(policy: &Policy, counter: FetchCounter) -> Arc<Self> {
        let me = Arc::new(Self {
            trusted: RwLock::new(Arc::default()),
            counter,
        });
        me.update(policy);
        me
    }

    /// Take the issuers of a new policy: an entry whose keys come from
    /// where they came from keeps its cache; a removed entry's tokens are
    /// refused from now on, and so are those of an entry whose key source
    /// cannot be set up (its CA file unreadable, say: logged).
    pub fn update(&self, policy: &Policy) {
        let old = self.snapshot();
        let mut next = BTreeMap::new();
        for (name, i) in &policy.issuers {
            let keys = match old.get(name) {
                Some(t) if same_keys(&t.issuer, i) => t.keys.clone(),
                _ => match source(i) {
                    Ok(s) => Arc::new(KeyCache::new(name, s, self.counter.clone())),
                    Err(e) => {
                        tracing::error!(issuer = %name, error = %e, "the issuer's keys cannot be fetched: its tokens are refused");
                        continue;
                    }
                },
            };
            next.insert(
                name.clone(),
                Arc::new(Trusted {
                    issuer: i.clone(),
                    keys,
                }),
            );
        }
        if let Ok(mut t) = self.trusted.write() {
            *t = Arc::new(next);
        }
    }

    fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Trusted>>> {
        self.trusted.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Verify `token` at `now` (seconds since the epoch) against the
    /// `[[issuer]]` entries of `policy`, the policy in force: this holds
    /// only their keys, which follow a reload a moment later (until then a
    /// changed entry's tokens are refused, never checked by the old entry).
    pub async fn verify(
        &self,
        policy: &Policy,
        token: &str,
        now: u64,
    ) -> Result<Verified, Refusal> {
        let parsed = verify::Parsed::new(token)?;
        let issuer = parsed.issuer(policy.issuers.values()).ok_or(Refusal {
            check: Check::Issuer,
            issuer: None,
            claims_digest: None,
        })?;
        let all = self.snapshot();
        let trusted = all
            .get(&issuer.name)
            .filter(|t| same_keys(&t.issuer, issuer))
            .ok_or_else(|| refused(Check::Key, issuer))?;
        let (kid, alg) = parsed.header(issuer)?;
        let key = trusted
            .keys
            .key(&kid)
            .await
            .ok_or_else(|| refused(Check::Key, issuer))?;
        parsed.verify(issuer, &alg, &key, now)
    }

    /// Fetch every issuer's keys now (at start, then every 10 minutes).
    pub async fn refresh(&self) {
        let all = self.snapshot();
        let fetches = all.values().map(|t| t.keys.refresh());
        futures_util::future::join_all(fetches).await;
    }
}

fn refused(check: Check, issuer: &Issuer) -> Refusal {
    Refusal {
        check,
        issuer: Some(issuer.name.clone()),
        claims_digest: None,
    }
}

#[cfg(test)]
pub(crate) mod testkit;

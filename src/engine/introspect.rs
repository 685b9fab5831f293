//! Introspection (RFC 7662): is this token live right now?

use super::{Engine, EngineError};
use crate::clock::secs;
use crate::store::LeaseState;
use crate::token::{self, Claims};

/// Introspection answer; `None` means inactive.
pub type Introspection = Option<Claims>;

impl Engine {
    /// The token's claims if it is live right now, else `None`. Checks the
    /// token (see below), then the lease itself, so the answer never depends
    /// on the expiry task having run.
    ///
    /// The newest token of a lease is recognised by the SHA-256 its lease
    /// recorded when it was signed ([`token::recognise`]): the relying
    /// parties' hot path pays a hash and a lookup, not a signature check.
    /// Any other token (an older one of a renewed lease, a replayed grant,
    /// a forgery) has its signature, `kid`, `alg`, `iss` and time checked.
    pub fn introspect(&self, tok: &str) -> Result<Introspection, EngineError> {
        let now = self.clock.now();
        let Some(said) = token::unverified_claims(tok) else {
            tracing::debug!("introspection: token unreadable");
            return Ok(None);
        };
        let Some(lease) = self.store().lease(&said.jti)? else {
            return Ok(None);
        };
        let keys = self.keys.current();
        let checked = match &lease.token_sha256 {
            Some(minted) if token::minted_as(tok, minted) => {
                token::recognise(&keys, &self.issuer, tok, secs(now))
            }
            _ => token::verify(&keys, &self.issuer, tok, secs(now)),
        };
        let claims = match checked {
            Ok(c) if c.jti == lease.id => c,
            Ok(_) => return Ok(None),
            Err(e) => {
                tracing::debug!(error = %e, "introspection: token rejected");
                return Ok(None);
            }
        };
        let live = lease.state == LeaseState::Active
            && lease.expires_at > now
            && lease.subject == claims.sub
            && claims.exp <= secs(lease.expires_at)
            && claims.iat >= secs(lease.issued_at);
        // The lease is the truth: its scopes, not what the token says.
        Ok(live.then(|| Claims {
            scope: lease.scopes.join(" "),
            ..claims
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine as _;

    use super::super::Outcome;
    use super::super::testing::{POLICY, ask, rig, workload};
    use crate::token;

    /// Grant one auto scope; its token and lease id.
    async fn grant(r: &super::super::testing::Rig) -> (String, String) {
        let scope = "read";
        match r
            .engine
            .request_token(&workload(), ask(&[scope]))
            .await
            .unwrap()
        {
            Outcome::Granted { token, lease } => (token, lease.id),
            Outcome::Parked(_) => panic!("parked"),
        }
    }

    /// `tok` with its payload's `scope` changed and the signature kept.
    fn tampered(tok: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = tok.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        claims["scope"] = "read admin".into();
        let payload = b64.encode(serde_json::to_vec(&claims).unwrap());
        format!("{}.{payload}.{}", parts[0], parts[2])
    }

    #[tokio::test]
    async fn the_newest_token_is_recognised_and_older_ones_still_verified() {
        let r = rig(POLICY);
        let (t1, id) = grant(&r).await;
        let lease = r.store.lease(&id).unwrap().unwrap();
        assert!(token::minted_as(&t1, &lease.token_sha256.unwrap()));
        assert!(r.engine.introspect(&t1).unwrap().is_some());

        r.clock.advance(Duration::from_secs(2));
        let (t2, renewed) = r.engine.renew(&workload(), &id, None).await.unwrap();
        assert_eq!(renewed.token_sha256, Some(token::digest(&t2)));
        assert!(!token::minted_as(&t1, &renewed.token_sha256.unwrap()));
        // t2 is recognised by its digest; t1 no longer is, and is live
        // because its signature and times check out.
        let newest = r.engine.introspect(&t2).unwrap().unwrap();
        let older = r.engine.introspect(&t1).unwrap().unwrap();
        assert_eq!(
            (newest.jti.as_str(), older.jti.as_str()),
            (id.as_str(), id.as_str())
        );
        assert!(older.exp < newest.exp);
    }

    #[tokio::test]
    async fn other_bytes_under_the_same_jti_are_checked_and_refused() {
        let r = rig(POLICY);
        let (tok, _) = grant(&r).await;
        // Same jti, other claims, the real signature: not the minted bytes,
        // so the signature is checked, and fails.
        assert!(r.engine.introspect(&tampered(&tok)).unwrap().is_none());
        // A broken signature on otherwise identical claims: same.
        let at = tok.len() - 10; // inside the signature, not its padding bits
        let flipped = if &tok[at..=at] == "A" { "B" } else { "A" };
        let bad_sig = format!("{}{flipped}{}", &tok[..at], &tok[at + 1..]);
        assert!(r.engine.introspect(&bad_sig).unwrap().is_none());
        assert!(r.engine.introspect("not.a.token").unwrap().is_none());
        assert!(r.engine.introspect(&tok).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_recognised_token_still_dies_with_its_lease_and_its_time() {
        let r = rig(POLICY);
        let (tok, id) = grant(&r).await;
        let (t2, id2) = grant(&r).await;
        r.engine.revoke(&workload(), &id, "done").await.unwrap();
        assert!(r.engine.introspect(&tok).unwrap().is_none());
        assert!(r.engine.introspect(&t2).unwrap().is_some());
        let lease = r.store.lease(&id2).unwrap().unwrap();
        r.clock.advance(Duration::from_millis(
            lease.expires_at - super::super::testing::T0,
        ));
        assert!(r.engine.introspect(&t2).unwrap().is_none());
    }
}

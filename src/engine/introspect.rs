//! Introspection (RFC 7662): is this token live right now?

use super::{Engine, EngineError};
use crate::clock::secs;
use crate::model::LeaseState;
use crate::token::{self, Claims};

/// Introspection answer; `None` means inactive.
pub type Introspection = Option<Claims>;

impl Engine {
    /// The token's claims if it is live right now, else `None`. Checks the
    /// token (see below), then the lease itself, so the answer never depends
    /// on the expiry task having run.
    ///
    /// The newest token of a lease is recognised by the MAC its lease
    /// recorded when it was signed (HMAC-SHA256 under a key derived from the
    /// KEK, [`token::minted_as`]): the relying parties' hot path pays a MAC
    /// and a lookup, not a signature check.
    /// Any other token (an older one of a renewed lease, a replayed grant,
    /// a forgery) has its signature, `kid`, `alg`, `iss` and time checked.
    pub async fn introspect(&self, tok: &str) -> Result<Introspection, EngineError> {
        // The lease is the truth — its subject, audience, scopes,
        // approvers, actors and certificate binding, not what the token
        // says; only the token's own times are the token's.
        Ok(self
            .live_lease(tok, self.clock.now())
            .await?
            .map(|(lease, token)| Claims {
                iat: token.iat,
                nbf: token.nbf,
                exp: token.exp,
                ..self.claims(&lease, lease.issued_at)
            }))
    }

    /// The lease of `tok` and the token's checked claims, if the token is
    /// live at `now` (see [`Engine::introspect`]); token exchange uses the
    /// lease itself.
    pub(super) async fn live_lease(
        &self,
        tok: &str,
        now: crate::store::Millis,
    ) -> Result<Option<(crate::model::Lease, Claims)>, EngineError> {
        let Some(said) = token::unverified_claims(tok) else {
            tracing::debug!("introspection: token unreadable");
            return Ok(None);
        };
        let Some(lease) = self.store().lease(&said.jti).await? else {
            return Ok(None);
        };
        let keys = self.keys.current();
        let minted = lease
            .token_mac
            .and_then(|m| token::minted_as(&keys, tok, &m));
        let checked = match &minted {
            Some(m) => token::recognise(&keys, &self.issuer, m, secs(now)),
            None => token::verify(&keys, &self.issuer, tok, secs(now)),
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
            && claims.iat >= secs(lease.issued_at)
            && super::cascade::ancestors_live(self.store().as_ref(), &lease, now).await?;
        Ok(live.then_some((lease, claims)))
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use crate::store::conformance::TestWrites as _;
    use std::time::Duration;

    use base64::Engine as _;

    use super::super::Outcome;
    use super::super::testing::{POLICY, ask, rig, workload};
    use crate::model::Lease;
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
            Outcome::Granted { token, lease, .. } => (token, lease.id),
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
        let r = rig(POLICY).await;
        let (t1, id) = grant(&r).await;
        let lease = r.store.lease(&id).await.unwrap().unwrap();
        let keys = r.engine.keys.current();
        assert!(token::minted_as(&keys, &t1, &lease.token_mac.unwrap()).is_some());
        assert!(r.engine.introspect(&t1).await.unwrap().is_some());

        r.clock.advance(Duration::from_secs(2));
        let (t2, renewed) = r.engine.renew(&workload(), &id, None).await.unwrap();
        assert_eq!(renewed.token_mac, Some(token::mac(&keys, &t2)));
        assert!(token::minted_as(&keys, &t1, &renewed.token_mac.unwrap()).is_none());
        // t2 is recognised by its digest; t1 no longer is, and is live
        // because its signature and times check out.
        let newest = r.engine.introspect(&t2).await.unwrap().unwrap();
        let older = r.engine.introspect(&t1).await.unwrap().unwrap();
        assert_eq!(
            (newest.jti.as_str(), older.jti.as_str()),
            (id.as_str(), id.as_str())
        );
        assert!(older.exp < newest.exp);
    }

    #[tokio::test]
    async fn other_bytes_under_the_same_jti_are_checked_and_refused() {
        let r = rig(POLICY).await;
        let (tok, _) = grant(&r).await;
        // Same jti, other claims, the real signature: not the minted bytes,
        // so the signature is checked, and fails.
        assert!(
            r.engine
                .introspect(&tampered(&tok))
                .await
                .unwrap()
                .is_none()
        );
        // A broken signature on otherwise identical claims: same.
        let at = tok.len() - 10; // inside the signature, not its padding bits
        let flipped = if &tok[at..=at] == "A" { "B" } else { "A" };
        let bad_sig = format!("{}{flipped}{}", &tok[..at], &tok[at + 1..]);
        assert!(r.engine.introspect(&bad_sig).await.unwrap().is_none());
        assert!(r.engine.introspect("not.a.token").await.unwrap().is_none());
        assert!(r.engine.introspect(&tok).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_recognised_token_still_dies_with_its_lease_and_its_time() {
        let r = rig(POLICY).await;
        let (tok, id) = grant(&r).await;
        let (t2, id2) = grant(&r).await;
        r.engine.revoke(&workload(), &id, "done").await.unwrap();
        assert!(r.engine.introspect(&tok).await.unwrap().is_none());
        assert!(r.engine.introspect(&t2).await.unwrap().is_some());
        let lease = r.store.lease(&id2).await.unwrap().unwrap();
        r.clock.advance(Duration::from_millis(
            lease.expires_at - super::super::testing::T0,
        ));
        assert!(r.engine.introspect(&t2).await.unwrap().is_none());
    }

    /// Issue 21, finding 6: what introspection says about a live token —
    /// audience, binding, actors, approvers — is the lease's.
    #[tokio::test]
    async fn introspection_answers_from_the_lease_not_the_token() {
        let r = rig(POLICY).await;
        let (tok, id) = grant(&r).await;
        let (_, parent) = grant(&r).await;
        let said = r.engine.introspect(&tok).await.unwrap().unwrap();
        assert!(said.approved_by.is_empty() && said.cnf.is_none() && said.act.is_none());
        let lease = r.store.lease(&id).await.unwrap().unwrap();
        let edited = Lease {
            audience: "elsewhere".into(),
            approved_by: vec!["spiffe://portcullis.dev/human/alice".into()],
            cnf: Some("bound-here".into()),
            delegation: Some(crate::model::Delegation {
                parent_id: parent,
                depth: 1,
                actors: vec!["spiffe://portcullis.dev/agent/a".into()],
            }),
            ..lease.clone()
        };
        assert!(r.store.swap_lease(&lease, &edited).await.unwrap());
        // The MAC still recognises the token; the answer follows the lease.
        let said = r.engine.introspect(&tok).await.unwrap().unwrap();
        assert_eq!(said.aud, "elsewhere");
        assert_eq!(said.approved_by, ["spiffe://portcullis.dev/human/alice"]);
        assert_eq!(said.cnf.unwrap().x5t_s256, "bound-here");
        assert_eq!(said.act.unwrap().sub, "spiffe://portcullis.dev/agent/a");
        assert_eq!(said.jti, id);
        let claims = token::unverified_claims(&tok).unwrap();
        assert_eq!((said.iat, said.exp), (claims.iat, claims.exp));
    }

    #[tokio::test]
    async fn a_mac_planted_without_the_kek_is_not_a_signature() {
        // Someone who can write the store but has no KEK forges a token for
        // a lease and plants a MAC for it: a plain SHA-256, and an HMAC
        // under another KEK. Neither makes introspection skip the
        // signature, which the forgery lacks.
        let r = rig(POLICY).await;
        let (tok, id) = grant(&r).await;
        let forged = tampered(&tok);
        let lease = r.store.lease(&id).await.unwrap().unwrap();
        let (other_kek, _) = crate::keys::Kek::generate().unwrap();
        let other_key = other_kek.token_mac_key().unwrap();
        let plain_sha = ring::digest::digest(&ring::digest::SHA256, forged.as_bytes());
        let other_mac = ring::hmac::sign(&other_key, forged.as_bytes());
        for planted in [plain_sha.as_ref(), other_mac.as_ref()] {
            let current = r.store.lease(&id).await.unwrap().unwrap();
            let planted = Lease {
                token_mac: Some(planted.try_into().unwrap()),
                ..lease.clone()
            };
            assert!(r.store.swap_lease(&current, &planted).await.unwrap());
            assert!(r.engine.introspect(&forged).await.unwrap().is_none());
        }
        // With this broker's own MAC the forgery would pass: the MAC is what
        // stands in for the signature, and only the KEK's holder makes one.
        let keys = r.engine.keys.current();
        let current = r.store.lease(&id).await.unwrap().unwrap();
        let genuine = Lease {
            token_mac: Some(token::mac(&keys, &forged)),
            ..lease.clone()
        };
        assert!(r.store.swap_lease(&current, &genuine).await.unwrap());
        assert!(r.engine.introspect(&forged).await.unwrap().is_some());
    }
}

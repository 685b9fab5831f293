//! Introspection (RFC 7662): is this token live right now?

use super::{Engine, EngineError};
use crate::clock::secs;
use crate::store::LeaseState;
use crate::token::{self, Claims};

/// Introspection answer; `None` means inactive.
pub type Introspection = Option<Claims>;

impl Engine {
    /// The token's claims if it is live right now, else `None`. Checks
    /// signature, `kid`, `alg`, `iss` and time, then the lease itself, so the
    /// answer never depends on the expiry task having run.
    pub fn introspect(&self, tok: &str) -> Result<Introspection, EngineError> {
        let now = self.clock.now();
        let keys = self.keys.current();
        let claims = match token::verify(&keys, &self.issuer, tok, secs(now)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "introspection: token rejected");
                return Ok(None);
            }
        };
        let Some(lease) = self.store().lease(&claims.jti)? else {
            return Ok(None);
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

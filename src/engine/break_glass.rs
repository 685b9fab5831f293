//! Break-glass: an approval-tier ask granted at once, for a short capped
//! life, with a record in the reviewers' queue — access now, review after,
//! and only where the policy allows it per scope.

use std::time::Duration;

use super::EngineError;
use super::ask::{Checked, Grant};
use crate::model::{Lease, RequestState, Requirement, Terms, TokenRequest};
use crate::policy::{Policy, Refusal};
use crate::text::{FieldError, check_reason};

/// Break-glass turns a park into a grant capped by every scope's
/// `break_glass.max_ttl`; a scope without one refuses.
pub(super) fn grant(
    policy: &Policy,
    c: &Checked,
    ttl: Duration,
    max_ttl: Duration,
    requirements: Vec<Requirement>,
) -> Result<Grant, EngineError> {
    check_reason("justification", &c.justification, true)
        .map_err(|_| FieldError::new("justification", "required for break-glass"))?;
    let mut cap = ttl;
    for r in &requirements {
        let allowed = policy
            .scopes
            .get(&r.scope)
            .and_then(|s| s.approval.as_ref())
            .and_then(|a| a.break_glass_max_ttl);
        match allowed {
            Some(max) => cap = cap.min(max),
            None => {
                return Err(EngineError::Refused(Refusal {
                    scope: r.scope.clone(),
                    reason: format!("break-glass is not allowed ({})", r.rule),
                }));
            }
        }
    }
    Ok(Grant {
        ttl: cap,
        max_ttl: cap.min(max_ttl),
        rules: requirements
            .iter()
            .map(|r| format!("break-glass on {}", r.rule))
            .collect(),
        review: Some(requirements),
    })
}

/// The review-queue record of a break-glass grant: already ISSUED, review
/// pending.
pub(super) fn review_record(
    c: &Checked,
    lease: &Lease,
    id: &str,
    waiting_for: Vec<Requirement>,
) -> TokenRequest {
    TokenRequest {
        deadline: c.now,
        waiting_for,
        lease_id: Some(lease.id.clone()),
        digest: c.digest.clone(),
        break_glass: true,
        review_pending: true,
        ..TokenRequest::new(
            id.to_owned(),
            c.who.as_str(),
            &Terms {
                ttl_ms: lease.ttl_ms,
                max_ttl_ms: lease.max_expires_at - lease.issued_at,
                ..c.terms(Duration::ZERO, Duration::ZERO)
            },
            c.now,
            RequestState::Issued,
            &format!("break-glass: {}", lease.justification),
        )
    }
}

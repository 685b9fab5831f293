//! Domain records ⇄ protobuf messages.

use std::time::Duration;

use crate::model;
use crate::pb;
use crate::store::Millis;
use crate::text::FieldError;

/// Millisecond time to a protobuf timestamp.
pub fn ts(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

fn opt_ts(ms: Option<Millis>) -> Option<prost_types::Timestamp> {
    ms.map(ts)
}

/// Milliseconds to a protobuf duration.
pub fn dur(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A requested TTL: absent is `None`; negative or malformed is refused,
/// naming `field`.
pub fn ttl(
    d: Option<prost_types::Duration>,
    field: &'static str,
) -> Result<Option<Duration>, FieldError> {
    let Some(d) = d else { return Ok(None) };
    let bad = |reason: &str| FieldError::new(field, reason);
    if d.seconds < 0 || d.nanos < 0 {
        return Err(bad("must not be negative"));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(bad("nanos out of range"));
    }
    let secs = u64::try_from(d.seconds).map_err(|_| bad("out of range"))?;
    let nanos = u32::try_from(d.nanos).map_err(|_| bad("out of range"))?;
    Ok(Some(Duration::new(secs, nanos)))
}

/// Lease state to proto.
pub fn lease_state(s: model::LeaseState) -> pb::LeaseState {
    match s {
        model::LeaseState::Active => pb::LeaseState::Active,
        model::LeaseState::Expired => pb::LeaseState::Expired,
        model::LeaseState::Revoked => pb::LeaseState::Revoked,
    }
}

/// Proto lease state filter to domain (`Unspecified` = any).
pub fn lease_state_filter(v: i32) -> Result<Option<model::LeaseState>, FieldError> {
    match pb::LeaseState::try_from(v) {
        Ok(pb::LeaseState::Unspecified) => Ok(None),
        Ok(pb::LeaseState::Active) => Ok(Some(model::LeaseState::Active)),
        Ok(pb::LeaseState::Expired) => Ok(Some(model::LeaseState::Expired)),
        Ok(pb::LeaseState::Revoked) => Ok(Some(model::LeaseState::Revoked)),
        Err(_) => Err(FieldError::new("state", format!("unknown lease state {v}"))),
    }
}

/// Request state to proto.
pub fn request_state(s: model::RequestState) -> pb::RequestState {
    use model::RequestState as S;
    match s {
        S::Pending => pb::RequestState::Pending,
        S::Approved => pb::RequestState::Approved,
        S::Issued => pb::RequestState::Issued,
        S::Denied => pb::RequestState::Denied,
        S::Withdrawn => pb::RequestState::Withdrawn,
        S::Expired => pb::RequestState::Expired,
    }
}

/// A token and its lease to proto.
pub fn grant(token: String, l: &model::Lease) -> pb::Grant {
    pb::Grant {
        token,
        lease: Some(lease(l)),
        login: None,
    }
}

/// A claimed grant to proto, with its login (given once, in this answer).
pub fn delivered((token, l, login_made): &crate::engine::requests::Delivered) -> pb::Grant {
    let target = l.login.as_ref().map(|g| g.database.clone());
    pb::Grant {
        login: login_made
            .as_deref()
            .cloned()
            .zip(target)
            .map(|(i, t)| login(i, &t)),
        ..grant(token.clone(), l)
    }
}

/// A database login just made to proto (its password included: it is
/// given once, in this answer).
pub fn login(i: crate::logins::Issued, target: &str) -> pb::DatabaseLogin {
    pb::DatabaseLogin {
        user: i.role,
        password: i.password,
        host: i.host,
        port: u32::from(i.port),
        dbname: i.database,
        target: target.to_owned(),
        sslmode: i.sslmode.to_owned(),
    }
}

/// Lease to proto.
pub fn lease(l: &model::Lease) -> pb::Lease {
    pb::Lease {
        id: l.id.clone(),
        subject: l.subject.clone(),
        scopes: l.scopes.clone(),
        audience: l.audience.clone(),
        issued_at: Some(ts(l.issued_at)),
        expires_at: Some(ts(l.expires_at)),
        max_expires_at: Some(ts(l.max_expires_at)),
        state: lease_state(l.state) as i32,
        kid: l.kid.clone(),
        renewals: l.renewals,
        revoked_at: opt_ts(l.revoked_at),
        revoked_by: l.revoked_by.clone().unwrap_or_default(),
        revoke_reason: l.revoke_reason.clone().unwrap_or_default(),
        request_id: l.request_id.clone().unwrap_or_default(),
        justification: l.justification.clone(),
        client_id: l.client_id.clone(),
        approved_by: l.approved_by.clone(),
        break_glass: l.break_glass,
        parent_id: parent_id(l.delegation.as_ref()),
        depth: l.delegation.as_ref().map_or(0, |d| d.depth),
        actors: actors(l.delegation.as_ref()),
        cnf_x5t_s256: l.cnf.clone().unwrap_or_default(),
        login_target: l
            .login
            .as_ref()
            .map(|g| g.database.clone())
            .unwrap_or_default(),
        login_role: l.login.as_ref().map(|g| g.role.clone()).unwrap_or_default(),
    }
}

fn parent_id(d: Option<&model::Delegation>) -> String {
    d.map(|d| d.parent_id.clone()).unwrap_or_default()
}

fn actors(d: Option<&model::Delegation>) -> Vec<String> {
    d.map(|d| d.actors.clone()).unwrap_or_default()
}

/// An issuance outcome (grant or park) to proto.
pub fn outcome(o: crate::engine::Outcome) -> pb::RequestTokenResponse {
    use pb::request_token_response::Outcome as O;
    let outcome = match o {
        crate::engine::Outcome::Granted {
            token,
            lease,
            login: issued,
        } => {
            let target = lease.login.as_ref().map(|g| g.database.clone());
            O::Granted(pb::Grant {
                login: issued.zip(target).map(|(i, t)| login(*i, &t)),
                ..grant(token, &lease)
            })
        }
        crate::engine::Outcome::Parked(r) => O::Pending(request(&r)),
    };
    pb::RequestTokenResponse {
        outcome: Some(outcome),
        claim_secret: String::new(),
    }
}

/// Request to proto.
pub fn request(r: &model::TokenRequest) -> pb::TokenRequest {
    pb::TokenRequest {
        id: r.id.clone(),
        requester: r.requester.clone(),
        scopes: r.scopes.clone(),
        ttl: Some(dur(r.ttl_ms)),
        audience: r.audience.clone(),
        justification: r.justification.clone(),
        state: request_state(r.state) as i32,
        created_at: Some(ts(r.created_at)),
        expires_at: (!r.state.is_terminal()).then(|| ts(r.deadline)),
        waiting_for: r
            .waiting_for
            .iter()
            .map(|w| pb::Requirement {
                scope: w.scope.clone(),
                approver_groups: w.approver_groups.clone(),
                approvals_required: w.approvals_required,
                approvals_received: crate::engine::approvals::received(r, &w.scope),
                rule: w.rule.clone(),
                description: w.description.clone(),
            })
            .collect(),
        approvals: r
            .approvals
            .iter()
            .map(|a| pb::Approval {
                approver: a.approver.clone(),
                at: Some(ts(a.at)),
                reason: a.reason.clone(),
            })
            .collect(),
        lease_id: r.lease_id.clone().unwrap_or_default(),
        sign_in: r.sign_in.as_ref().map(|s| pb::SignIn {
            issuer: s.issuer.clone(),
            subject: s.subject.clone(),
            claims_digest: s.claims_digest.clone(),
            evidence: s.evidence.clone().into_iter().collect(),
        }),
        digest: r.digest.clone(),
        history: r
            .history
            .iter()
            .map(|t| pb::Transition {
                from: t.from.map_or(pb::RequestState::Unspecified, request_state) as i32,
                to: request_state(t.to) as i32,
                actor: t.actor.clone(),
                at: Some(ts(t.at)),
                reason: t.reason.clone(),
            })
            .collect(),
        client_request_id: r.client_request_id.clone().unwrap_or_default(),
        break_glass: r.break_glass,
        review_pending: r.review_pending,
        reviewed_by: r.reviewed_by.clone().unwrap_or_default(),
        review_reason: r.review_reason.clone().unwrap_or_default(),
        parent_id: parent_id(r.delegation.as_ref()),
        actors: actors(r.delegation.as_ref()),
    }
}

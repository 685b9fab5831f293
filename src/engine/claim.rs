//! Claiming an approved request: the compare-and-swap APPROVED -> ISSUED
//! that lets exactly one caller have the token, and the lease it becomes.

use super::{Cas, Engine, EngineError};
use crate::audit::{Action, Entry as AuditEntry};
use crate::identity::Identity;
use crate::model::{Lease, RequestState, TokenRequest};
use crate::notify::EventKind;
use crate::text::new_id;

impl Engine {
    /// Claim the token of an APPROVED request: only its requester, only
    /// once. Returns `None` when there is nothing to claim (not approved, not
    /// the requester, claim window passed, or someone else claimed it).
    pub async fn claim(
        &self,
        who: &Identity,
        x5t: Option<&str>,
        id: &str,
    ) -> Result<Option<Claimed>, EngineError> {
        let made_at = self.clock.now();
        let lease_id = new_id("l_", made_at)?;
        let made = self.login_for_claim(who, id, &lease_id).await?;
        let login = made.as_ref().map(|m| &m.login);
        let claimed = self
            .claim_as(who, x5t, id, (&lease_id, made_at), login)
            .await;
        // Lost to another claim, or failed: `made` ends its login when
        // dropped.
        Ok(claimed?.map(|(tok, lease, issued)| {
            let login = made.map(super::logins::Made::deliver);
            (tok, lease, issued, login)
        }))
    }

    /// An approved request's login (a login scope), made before its claim
    /// is written and for the lease id it will have.
    async fn login_for_claim(
        &self,
        who: &Identity,
        id: &str,
        lease_id: &str,
    ) -> Result<Option<super::logins::Made>, EngineError> {
        let Some(req) = self.store().request(id).await? else {
            return Ok(None);
        };
        let now = self.clock.now();
        if req.requester != who.as_str()
            || req.state != RequestState::Approved
            || req.deadline <= now
        {
            return Ok(None);
        }
        let policy = self.policy();
        let Some((db, rule)) = super::logins::login_scope(&policy, &req.scopes)? else {
            return Ok(None);
        };
        let until = now.saturating_add(approved_ttl(&req));
        Ok(Some(
            self.make_login(who.as_str(), db, rule, lease_id, until)
                .await?,
        ))
    }

    async fn claim_as(
        &self,
        who: &Identity,
        x5t: Option<&str>,
        id: &str,
        (lease_id, made_at): (&str, u64),
        login: Option<&crate::model::LeaseLogin>,
    ) -> Result<Option<(String, Lease, TokenRequest)>, EngineError> {
        let out = self
            .commit(|mut op| async move {
                let now = self.clock.now();
                let current = self.store().request(id).await?;
                let claimable = |req: &TokenRequest| {
                    req.requester == who.as_str()
                        && req.state == RequestState::Approved
                        && req.deadline > now
                };
                let policy = self.policy();
                let to_claim = current.as_ref().filter(|r| claimable(r));
                let parent = self
                    .still_claimable(&policy, to_claim, login, (made_at, now))
                    .await?;
                let mut minted = None;
                let pinned = parent.clone();
                let out = self.records.edit_request_from(&mut op, current, |req| {
                    if !claimable(req) {
                        return Ok(None);
                    }
                    let cnf = super::bound_to(&policy, &req.scopes, x5t)?;
                    let (lease, tok) = self.approved_lease(
                        req,
                        (lease_id, now),
                        parent.as_ref(),
                        cnf,
                        login.map(|l| Box::new(l.clone())),
                    )?;
                    let mut issued =
                        req.moved(RequestState::Issued, who.as_str(), now, "token delivered");
                    issued.lease_id = Some(lease.id.clone());
                    minted = Some((tok, lease));
                    Ok::<_, EngineError>(Some(issued))
                })?;
                if let (Cas::Swapped { .. }, Some((_, lease))) = (&out, &minted) {
                    issue_in(&mut op, who, id, lease, pinned)?;
                }
                Ok((op, (out, minted)))
            })
            .await?;
        let (out, minted) = out;
        let (Cas::Swapped { new: issued, .. }, Some((tok, lease))) = (out, minted) else {
            return Ok(None);
        };
        self.deadlines.note(lease.expires_at);
        tracing::info!(request_id = %id, jti = %lease.id, kid = %lease.kid, sub = %who, "approved request issued");
        self.announce(EventKind::Issued, &issued, who.as_str(), "");
        Ok(Some((tok, lease, issued)))
    }

    /// What may have changed since `req` was approved: the policy, a
    /// delegated request's parent (which may have ended; returned, to be
    /// pinned), whether the policy still makes the login made for it.
    async fn still_claimable(
        &self,
        policy: &crate::policy::Policy,
        req: Option<&TokenRequest>,
        login: Option<&crate::model::LeaseLogin>,
        (made_at, now): (u64, u64),
    ) -> Result<Option<Lease>, EngineError> {
        let Some(req) = req else { return Ok(None) };
        let parent =
            super::approvals::check_still_allowed(policy, self.store().as_ref(), req, now).await?;
        login_still_fits(policy, Some(req), login, (made_at, now))?;
        Ok(parent)
    }

    /// The lease an approved request becomes at `now`, and its signed token.
    /// Its TTL, and its ceiling, is the shortest any approver allowed; a
    /// delegated one never outlives `parent`. `cnf`: the certificate its
    /// tokens are bound to.
    fn approved_lease(
        &self,
        req: &TokenRequest,
        (id, now): (&str, u64),
        parent: Option<&Lease>,
        cnf: Option<String>,
        login: Option<Box<crate::model::LeaseLogin>>,
    ) -> Result<(Lease, String), EngineError> {
        let ttl = approved_ttl(req);
        // What the approvers approved bounds the lease for its whole life:
        // renewal never stretches it past issue + the approved TTL.
        let mut terms = req.terms();
        terms.ttl_ms = ttl;
        terms.max_ttl_ms = ttl;
        let keys = self.keys.current();
        let lease = Lease::active(id.to_owned(), &req.requester, &terms, now, &keys.active.kid);
        let mut lease = Lease {
            request_id: Some(req.id.clone()),
            approved_by: req.approvals.iter().map(|a| a.approver.clone()).collect(),
            cnf,
            login,
            ..lease
        };
        if let (Some(d), Some(p)) = (&req.delegation, parent) {
            lease = super::cascade::child_of(lease, p, d);
        }
        self.signed(&keys, lease, now)
    }
}

/// A claimed request: its token, its lease, the request as issued, and a
/// login scope's database login (given once).
pub type Claimed = (
    String,
    Lease,
    TokenRequest,
    Option<Box<crate::logins::Issued>>,
);

/// The login made for a claim (made for the policy read before) still
/// fits: a reload since that changes whether these scopes make one is
/// refused (claim again), never a lease without its login; and it is not
/// too late to write it.
fn login_still_fits(
    policy: &crate::policy::Policy,
    req: Option<&TokenRequest>,
    login: Option<&crate::model::LeaseLogin>,
    (made_at, now): (u64, u64),
) -> Result<(), EngineError> {
    let Some(req) = req else { return Ok(()) };
    let wants = super::logins::login_scope(policy, &req.scopes)?.is_some();
    if wants != login.is_some() {
        return Err(EngineError::WrongState(
            "the policy changed while the claim was made; claim again".into(),
        ));
    }
    super::logins::still_in_time(login.is_some(), made_at, now)
}

/// The TTL an approved request's lease gets: the shortest any approver
/// allowed.
fn approved_ttl(req: &TokenRequest) -> u64 {
    req.approvals
        .iter()
        .filter_map(|a| a.ttl_ms)
        .fold(req.ttl_ms, u64::min)
}

/// The lease request `id` becomes, in `op`, with its record. A delegated
/// child only while its parent stays as read: a revocation meanwhile
/// cascades before the child exists, so the batch loses instead.
fn issue_in(
    op: &mut super::Op,
    who: &Identity,
    id: &str,
    lease: &Lease,
    parent: Option<Lease>,
) -> Result<(), EngineError> {
    if let Some(parent) = parent {
        op.expect_lease(parent);
    }
    op.create_lease(lease.clone(), None);
    let reason = format!("lease {}", lease.id);
    op.record(vec![AuditEntry::ok(
        who.as_str(),
        Action::RequestIssued,
        id,
        &lease.scopes,
        &reason,
    )])?;
    if let Some(l) = &lease.login {
        Engine::record_login(op, who.as_str(), &lease.id, &lease.scopes, l)?;
    }
    Ok(())
}

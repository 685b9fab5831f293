//! `grant` moves state: it turns an authenticated ask into a durable lease
//! and a token, a parked request, or a refusal; and it renews, revokes,
//! lists, expires and introspects. It knows nothing about gRPC: `api`
//! translates, and maps [`GrantError`] to status codes in one table.
//!
//! # What is durable when a reply is sent
//! Every acknowledged change — a grant, a parked request, a renewal, a
//! revocation, a withdrawal — has been made durable by a group commit
//! ([`GroupCommit::durable`]) before the method returns `Ok`. A token is
//! minted before the write, but dropped unless the write became durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{Notify, broadcast, watch};

use crate::audit::{AuditLog, Entry as AuditEntry};
use crate::clock::{Clock, millis, secs};
use crate::identity::Identity;
use crate::keys::KeyRing;
use crate::notify::{Event, Notifier};
use crate::policy::{Decision, Policy, Refusal, valid_scope_name};
use crate::store::commit::GroupCommit;
use crate::store::{
    Idempotency, IdempotentOutcome, Lease, LeaseState, Millis, RequestState, Store, StoreError,
    TokenRequest, Transition,
};
use crate::token::{self, Claims, TokenError};

/// Most scopes in one request.
pub const MAX_SCOPES: usize = 64;
/// Longest justification or reason.
pub const MAX_REASON: usize = 4096;
/// Longest audience.
pub const MAX_AUDIENCE: usize = 256;
/// Longest client request id.
pub const MAX_CLIENT_REQUEST_ID: usize = 128;
/// Largest page of `ListLeases`.
pub const MAX_PAGE: usize = 1000;
/// Actor recorded for the broker's own transitions (expiry).
pub const SYSTEM_ACTOR: &str = "portcullis";

/// Domain errors. `api::status` maps each to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// A field of the request is malformed or out of bounds; nothing changed.
    #[error("`{field}`: {reason}")]
    Invalid {
        /// Field name as in the proto.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Policy refuses a scope.
    #[error("refused by policy: {0}")]
    Refused(#[from] Refusal),
    /// The caller may not act on this object (not owner, not admin).
    #[error("{0}")]
    NotAllowed(String),
    /// No such object visible to the caller.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// Kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The object is in the wrong state for this operation.
    #[error("{0}")]
    WrongState(String),
    /// An idempotency key was reused with other parameters.
    #[error("`client_request_id`: already used with different parameters")]
    IdempotencyConflict,
    /// The action was already taken by this caller (e.g. a second approval).
    #[error("{0}")]
    Duplicate(String),
    /// Not implemented in this version.
    #[error("{0}")]
    NotSupported(&'static str),
    /// The store could not read or persist; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A token could not be signed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The key ring failed (generation, sealing, a corrupt record).
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
}

/// A workload's ask, as received (validated by [`Engine::request_token`]).
#[derive(Clone, Debug, Default)]
pub struct TokenAsk {
    /// Scopes.
    pub scopes: Vec<String>,
    /// Wanted TTL; `None` for the policy default.
    pub ttl: Option<Duration>,
    /// Audience; empty for the policy default.
    pub audience: String,
    /// Why.
    pub justification: String,
    /// Idempotency key; empty for none.
    pub client_request_id: String,
    /// Break-glass flag.
    pub break_glass: bool,
}

/// Outcome of [`Engine::request_token`].
#[derive(Debug)]
pub enum Outcome {
    /// Granted at once.
    Granted {
        /// The token (a secret: never log it).
        token: String,
        /// Its lease.
        lease: Lease,
    },
    /// Parked for approval.
    Parked(TokenRequest),
}

/// Policy reloads since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyReloads {
    /// New policies swapped in.
    pub loaded: u64,
    /// New policy files rejected.
    pub rejected: u64,
}

/// Introspection answer (RFC 7662); `None` means inactive.
pub type Introspection = Option<Claims>;

/// Is `s` 1..=max printable ASCII characters (spaces allowed inside)?
pub fn valid_token_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A sortable random id: 48-bit millisecond time ‖ 80 random bits, hex.
pub fn new_id(prefix: &str, now: Millis) -> Result<String, GrantError> {
    let mut rnd = [0u8; 10];
    SystemRandom::new()
        .fill(&mut rnd)
        .map_err(|_| GrantError::Store(StoreError::Unavailable("no system randomness".into())))?;
    let mut s = format!("{prefix}{:012x}", now & 0xffff_ffff_ffff);
    for b in rnd {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(s)
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The broker's state machine over a store, a policy and a key ring.
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) commit: GroupCommit,
    policy: RwLock<Arc<Policy>>,
    pub(crate) keys: Arc<KeyRing>,
    pub(crate) clock: Arc<dyn Clock>,
    issuer: String,
    pub(crate) notifier: Notifier,
    pub(crate) audit: AuditLog,
    pub(crate) metrics: crate::metrics::Metrics,
    notify_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Event>>>,
    /// Deadline the expiry task sleeps until (`u64::MAX`: none known).
    scheduled: AtomicU64,
    wake: Notify,
    pub(crate) request_events: broadcast::Sender<String>,
    expiry_progress: watch::Sender<Millis>,
    policy_reloads: watch::Sender<PolicyReloads>,
}

impl Engine {
    /// Assemble an engine.
    pub fn new(
        store: Arc<dyn Store>,
        commit: GroupCommit,
        policy: Policy,
        keys: Arc<KeyRing>,
        clock: Arc<dyn Clock>,
        issuer: String,
        audit: AuditLog,
    ) -> Self {
        let (notifier, notify_rx) = Notifier::new();
        Self {
            audit,
            metrics: crate::metrics::Metrics::new(),
            notifier,
            notify_rx: std::sync::Mutex::new(Some(notify_rx)),
            store,
            commit,
            policy: RwLock::new(Arc::new(policy)),
            keys,
            clock,
            issuer,
            scheduled: AtomicU64::new(0),
            wake: Notify::new(),
            request_events: broadcast::channel(1024).0,
            expiry_progress: watch::channel(0).0,
            policy_reloads: watch::channel(PolicyReloads::default()).0,
        }
    }

    /// Append audit records for a change about to be made durable. The
    /// caller then waits for the group commit, which covers both.
    pub(crate) fn record(&self, entries: Vec<AuditEntry>) -> Result<(), GrantError> {
        self.audit
            .append(self.store.as_ref(), self.clock.now(), entries)?;
        Ok(())
    }

    /// Record an event and make it durable (events outside a request, e.g.
    /// policy reloads).
    pub async fn record_durable(&self, entry: AuditEntry) -> Result<(), GrantError> {
        self.record(vec![entry])?;
        self.commit.durable().await?;
        Ok(())
    }

    /// Is the store usable and did the last group commit succeed?
    pub fn healthy(&self) -> bool {
        self.store.meta("schema_version").is_ok() && self.commit.healthy()
    }

    /// The metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The audit trail.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Sign a checkpoint over the newest audit record now (scheduled by the
    /// server; tests call it directly).
    pub async fn checkpoint_audit(&self) -> Result<Option<u64>, GrantError> {
        let seq = self.audit.checkpoint(
            self.store.as_ref(),
            &self.keys.current(),
            &self.issuer,
            self.clock.now(),
        )?;
        if seq.is_some() {
            self.commit.durable().await?;
        }
        Ok(seq)
    }

    /// Retention: delete leases and requests that ended before `before`
    /// (recorded in the trail with the counts).
    pub async fn purge_ended(&self, before: Millis) -> Result<(u64, u64), GrantError> {
        let store = self.store.clone();
        let counts = tokio::task::spawn_blocking(move || store.purge_ended(before))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        if counts != (0, 0) {
            self.record(vec![AuditEntry::ok(
                SYSTEM_ACTOR,
                "retention.purged",
                "",
                &[],
                &format!(
                    "{} leases and {} requests that ended before {before}",
                    counts.0, counts.1
                ),
            )])?;
            self.commit.durable().await?;
            tracing::info!(
                leases = counts.0,
                requests = counts.1,
                "retention: ended records purged"
            );
        }
        Ok(counts)
    }

    /// Retention: remove audit records older than `before`, up to the newest
    /// signed checkpoint before it, so what remains still verifies.
    pub async fn compact_audit(&self, before: Millis) -> Result<Option<u64>, GrantError> {
        let point = self
            .audit
            .compact(self.store.as_ref(), &self.keys.current(), before)?;
        if let Some(seq) = point {
            self.record(vec![AuditEntry::ok(
                SYSTEM_ACTOR,
                "audit.compacted",
                &seq.to_string(),
                &[],
                "retention",
            )])?;
            self.commit.durable().await?;
            tracing::info!(through = seq, "audit trail compacted");
        }
        Ok(point)
    }

    /// The receiving end of the notification queue (taken once, by the
    /// server's delivery task).
    pub fn take_notifications(&self) -> Option<tokio::sync::mpsc::Receiver<Event>> {
        self.notify_rx.lock().ok().and_then(|mut g| g.take())
    }

    /// Notification counters.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    // Lease and request writes that move the gauges. INVARIANT: every lease
    // and request write of the engine goes through these four (the bulk loop
    // of `revoke_all`, which runs off the runtime, adjusts the gauges by its
    // count), so the gauges follow the state changes, not each call site.

    /// [`Store::create_lease`], counted.
    pub(crate) fn create_lease(
        &self,
        lease: &Lease,
        idem: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let existing = self.store.create_lease(lease, idem)?;
        if existing.is_none() && lease.state == LeaseState::Active {
            self.metrics.active_leases.inc();
        }
        Ok(existing)
    }

    /// [`Store::swap_lease`], counted.
    pub(crate) fn swap_lease(&self, current: &Lease, new: &Lease) -> Result<bool, StoreError> {
        let swapped = self.store.swap_lease(current, new)?;
        if swapped && current.state == LeaseState::Active && new.state != LeaseState::Active {
            self.metrics.active_leases.dec();
            if new.state == LeaseState::Revoked {
                self.metrics.revocations.inc();
            }
        }
        Ok(swapped)
    }

    /// [`Store::create_request`], counted.
    pub(crate) fn create_request(
        &self,
        req: &TokenRequest,
        idem: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let existing = self.store.create_request(req, idem)?;
        if existing.is_none() && req.is_open() {
            self.metrics.open_requests.inc();
        }
        Ok(existing)
    }

    /// [`Store::swap_request`], counted.
    pub(crate) fn swap_request(
        &self,
        current: &TokenRequest,
        new: &TokenRequest,
    ) -> Result<bool, StoreError> {
        let swapped = self.store.swap_request(current, new)?;
        if swapped && current.is_open() != new.is_open() {
            if new.is_open() {
                self.metrics.open_requests.inc();
            } else {
                self.metrics.open_requests.dec();
            }
        }
        Ok(swapped)
    }

    /// Announce a request event to webhooks and to watchers.
    pub(crate) fn announce(
        &self,
        kind: &'static str,
        req: &TokenRequest,
        actor: &str,
        reason: &str,
    ) {
        let _ = self.request_events.send(req.id.clone());
        let policy = self.policy();
        let mut approvers: Vec<String> = req
            .waiting_for
            .iter()
            .flat_map(|w| w.approver_groups.iter())
            .filter_map(|g| policy.groups.get(g))
            .flatten()
            .cloned()
            .collect();
        approvers.sort();
        approvers.dedup();
        self.notifier.emit(Event {
            kind,
            request: req.clone(),
            actor: actor.to_owned(),
            at: self.clock.now(),
            reason: reason.to_owned(),
            approvers,
        });
    }

    /// The current policy.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Swap in a new (already validated) policy; requests in flight finish
    /// under the one they started with.
    pub fn set_policy(&self, p: Policy) {
        match self.policy.write() {
            Ok(mut g) => *g = Arc::new(p),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(p),
        }
        self.policy_reloads.send_modify(|r| r.loaded += 1);
    }

    /// Record that a new policy file was rejected (the old one stays).
    pub fn policy_rejected(&self) {
        self.policy_reloads.send_modify(|r| r.rejected += 1);
    }

    /// Reload counters since start (tests and metrics wait on them).
    pub fn policy_reloads(&self) -> watch::Receiver<PolicyReloads> {
        self.policy_reloads.subscribe()
    }

    /// The key ring.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Issuer URL put in `iss`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Group-commit handle.
    pub fn commit(&self) -> &GroupCommit {
        &self.commit
    }

    /// Request ids whose state changed.
    pub fn request_events(&self) -> broadcast::Receiver<String> {
        self.request_events.subscribe()
    }

    /// Time up to which every deadline has been handled by the expiry task.
    pub fn expiry_progress(&self) -> watch::Receiver<Millis> {
        self.expiry_progress.subscribe()
    }

    /// A new deadline was stored. If it is earlier than what the expiry task
    /// sleeps towards, pull the published progress back below it and wake
    /// the task.
    pub(crate) fn note_deadline(&self, at: Millis) {
        if at < self.scheduled.fetch_min(at, Ordering::AcqRel) {
            self.expiry_progress.send_if_modified(|p| {
                let lowered = *p >= at;
                if lowered {
                    *p = at.saturating_sub(1);
                }
                lowered
            });
            self.wake.notify_one();
        }
    }

    fn validate_ttl(&self, ttl: Option<Duration>, field: &'static str) -> Result<(), GrantError> {
        if let Some(t) = ttl {
            if t.is_zero() {
                return Err(GrantError::Invalid {
                    field,
                    reason: "must be greater than zero".into(),
                });
            }
            let hard = self.policy().hard_max_ttl;
            if t > hard {
                return Err(GrantError::Invalid {
                    field,
                    reason: format!(
                        "exceeds the broker limit of {}",
                        humantime::format_duration(hard)
                    ),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn claims(&self, lease: &Lease, iat: Millis) -> Claims {
        Claims {
            iss: self.issuer.clone(),
            sub: lease.subject.clone(),
            aud: lease.audience.clone(),
            client_id: lease.client_id.clone(),
            scope: lease.scopes.join(" "),
            iat: secs(iat),
            nbf: secs(iat),
            exp: secs(lease.expires_at),
            jti: lease.id.clone(),
            approved_by: lease.approved_by.clone(),
            break_glass: lease.break_glass,
        }
    }

    /// Ask for a token (see the `RequestToken` RPC).
    pub async fn request_token(
        &self,
        who: &Identity,
        ask: TokenAsk,
    ) -> Result<Outcome, GrantError> {
        let scopes = validate_scopes(&ask.scopes)?;
        self.validate_ttl(ask.ttl, "ttl")?;
        if ask.justification.len() > MAX_REASON || ask.justification.contains('\0') {
            return Err(GrantError::Invalid {
                field: "justification",
                reason: format!("at most {MAX_REASON} bytes of text"),
            });
        }
        if !ask.audience.is_empty() && !valid_token_text(&ask.audience, MAX_AUDIENCE) {
            return Err(GrantError::Invalid {
                field: "audience",
                reason: format!("1-{MAX_AUDIENCE} printable ASCII characters"),
            });
        }
        if !ask.client_request_id.is_empty()
            && (!valid_token_text(&ask.client_request_id, MAX_CLIENT_REQUEST_ID)
                || ask.client_request_id.contains(' '))
        {
            return Err(GrantError::Invalid {
                field: "client_request_id",
                reason: format!(
                    "1-{MAX_CLIENT_REQUEST_ID} printable ASCII characters without spaces"
                ),
            });
        }
        let policy = self.policy();
        let mut decision = match policy.decide(who, &scopes, ask.ttl) {
            Ok(d) => d,
            Err(refusal) => {
                // A refusal changes nothing; its record is not waited on.
                self.record(vec![
                    AuditEntry::ok(
                        who.as_str(),
                        "token.refused",
                        "",
                        &scopes,
                        &refusal.to_string(),
                    )
                    .outcome("refused"),
                ])?;
                self.metrics.request("refused");
                return Err(refusal.into());
            }
        };
        let mut break_glass = false;
        let mut review: Option<Vec<crate::store::Requirement>> = None;
        if ask.break_glass
            && let Decision::Park {
                ttl,
                max_ttl,
                requirements,
                ..
            } = &decision
        {
            if ask.justification.trim().is_empty() {
                return Err(GrantError::Invalid {
                    field: "justification",
                    reason: "required for break-glass".into(),
                });
            }
            let mut cap = *ttl;
            for r in requirements {
                let allowed = policy
                    .scopes
                    .get(&r.scope)
                    .and_then(|s| s.approval.as_ref())
                    .and_then(|a| a.break_glass_max_ttl);
                match allowed {
                    Some(max) => cap = cap.min(max),
                    None => {
                        return Err(GrantError::Refused(Refusal {
                            scope: r.scope.clone(),
                            reason: format!("break-glass is not allowed ({})", r.rule),
                        }));
                    }
                }
            }
            break_glass = true;
            review = Some(requirements.clone());
            decision = Decision::Grant {
                ttl: cap,
                max_ttl: cap.min(*max_ttl),
                rules: requirements
                    .iter()
                    .map(|r| format!("break-glass on {}", r.rule))
                    .collect(),
            };
        }
        let audience = if ask.audience.is_empty() {
            policy.default_audience.clone()
        } else {
            ask.audience.clone()
        };
        let now = self.clock.now();
        let ttl_ms = ask.ttl.map_or(0, millis).to_be_bytes();
        let digest = sha256_hex(&[
            who.as_str().as_bytes(),
            scopes.join(" ").as_bytes(),
            &ttl_ms,
            audience.as_bytes(),
            ask.justification.as_bytes(),
        ]);
        let idem = |outcome| {
            (!ask.client_request_id.is_empty()).then(|| Idempotency {
                caller: who.as_str().to_owned(),
                key: ask.client_request_id.clone(),
                params_digest: digest.clone(),
                outcome,
            })
        };
        match decision {
            Decision::Grant {
                ttl,
                max_ttl,
                rules,
            } => {
                let id = new_id("l_", now)?;
                let lease = Lease {
                    id: id.clone(),
                    subject: who.as_str().to_owned(),
                    client_id: who.as_str().to_owned(),
                    scopes,
                    audience,
                    justification: ask.justification.clone(),
                    issued_at: now,
                    expires_at: now.saturating_add(millis(ttl)),
                    max_expires_at: now.saturating_add(millis(max_ttl)),
                    ttl_ms: millis(ttl),
                    state: LeaseState::Active,
                    kid: String::new(),
                    renewals: 0,
                    token_issued_at: now,
                    revoked_at: None,
                    revoked_by: None,
                    revoke_reason: None,
                    expired_at: None,
                    request_id: review.as_ref().map(|_| new_id("r_", now)).transpose()?,
                    approved_by: Vec::new(),
                    break_glass,
                };
                let keys = self.keys.current();
                let lease = Lease {
                    kid: keys.active.kid.clone(),
                    ..lease
                };
                // Sign first: if signing fails, nothing is written.
                let tok = token::mint(&keys, &self.claims(&lease, now))?;
                if let Some(existing) =
                    self.create_lease(&lease, idem(IdempotentOutcome::Lease(id)).as_ref())?
                {
                    return self.replay(who, existing, &digest).await;
                }
                // Break-glass: a record for the review queue, in the same
                // durable batch as the lease.
                let review_record = match (review, &lease.request_id) {
                    (Some(waiting_for), Some(rid)) => {
                        let r = TokenRequest {
                            id: rid.clone(),
                            requester: who.as_str().to_owned(),
                            scopes: lease.scopes.clone(),
                            ttl_ms: lease.ttl_ms,
                            max_ttl_ms: lease.max_expires_at - lease.issued_at,
                            audience: lease.audience.clone(),
                            justification: lease.justification.clone(),
                            state: RequestState::Issued,
                            created_at: now,
                            deadline: now,
                            waiting_for,
                            approvals: Vec::new(),
                            lease_id: Some(lease.id.clone()),
                            digest: digest.clone(),
                            history: vec![Transition {
                                from: None,
                                to: RequestState::Issued,
                                actor: who.as_str().to_owned(),
                                at: now,
                                reason: format!("break-glass: {}", lease.justification),
                            }],
                            client_request_id: None,
                            break_glass: true,
                            review_pending: true,
                            reviewed_by: None,
                            review_reason: None,
                        };
                        self.create_request(&r, None)?;
                        Some(r)
                    }
                    _ => None,
                };
                let action = if review_record.is_some() {
                    "token.break_glass"
                } else {
                    "token.granted"
                };
                self.record(vec![
                    AuditEntry::ok(
                        who.as_str(),
                        action,
                        &lease.id,
                        &lease.scopes,
                        &lease.justification,
                    )
                    .rule(rules.join("; ")),
                ])?;
                self.commit.durable().await?;
                self.note_deadline(lease.expires_at);
                self.metrics.request(if review_record.is_some() {
                    "break_glass"
                } else {
                    "granted"
                });
                if let Some(r) = &review_record {
                    tracing::warn!(jti = %lease.id, request_id = %r.id, sub = %who, scopes = %lease.scopes.join(" "), "break-glass grant; review pending");
                    self.announce("break_glass", r, who.as_str(), &lease.justification);
                }
                tracing::info!(jti = %lease.id, kid = %lease.kid, sub = %who, scopes = %lease.scopes.join(" "), rules = %rules.join(", "), "granted");
                Ok(Outcome::Granted { token: tok, lease })
            }
            Decision::Park {
                ttl,
                max_ttl,
                pending_ttl,
                requirements,
            } => {
                let id = new_id("r_", now)?;
                let req = TokenRequest {
                    id: id.clone(),
                    requester: who.as_str().to_owned(),
                    digest: sha256_hex(&[
                        who.as_str().as_bytes(),
                        scopes.join(" ").as_bytes(),
                        &millis(ttl).to_be_bytes(),
                        audience.as_bytes(),
                    ]),
                    scopes,
                    ttl_ms: millis(ttl),
                    max_ttl_ms: millis(max_ttl),
                    audience,
                    justification: ask.justification.clone(),
                    state: RequestState::Pending,
                    created_at: now,
                    deadline: now.saturating_add(millis(pending_ttl)),
                    waiting_for: requirements,
                    approvals: Vec::new(),
                    lease_id: None,
                    history: vec![Transition {
                        from: None,
                        to: RequestState::Pending,
                        actor: who.as_str().to_owned(),
                        at: now,
                        reason: ask.justification.clone(),
                    }],
                    client_request_id: (!ask.client_request_id.is_empty())
                        .then(|| ask.client_request_id.clone()),
                    break_glass: false,
                    review_pending: false,
                    reviewed_by: None,
                    review_reason: None,
                };
                if let Some(existing) =
                    self.create_request(&req, idem(IdempotentOutcome::Request(id)).as_ref())?
                {
                    return self.replay(who, existing, &digest).await;
                }
                let rules: Vec<String> = req.waiting_for.iter().map(|w| w.rule.clone()).collect();
                self.record(vec![
                    AuditEntry::ok(
                        who.as_str(),
                        "request.parked",
                        &req.id,
                        &req.scopes,
                        &req.justification,
                    )
                    .rule(rules.join("; ")),
                ])?;
                self.commit.durable().await?;
                self.metrics.request("parked");
                self.note_deadline(req.deadline);
                tracing::info!(request_id = %req.id, sub = %who, scopes = %req.scopes.join(" "), "parked for approval");
                self.announce("parked", &req, who.as_str(), &req.justification);
                Ok(Outcome::Parked(req))
            }
        }
    }

    /// Answer a retried request with the first outcome.
    async fn replay(
        &self,
        who: &Identity,
        existing: Idempotency,
        digest: &str,
    ) -> Result<Outcome, GrantError> {
        if existing.params_digest != digest {
            return Err(GrantError::IdempotencyConflict);
        }
        // The first call's write may not be durable yet: wait for it too.
        self.commit.durable().await?;
        match existing.outcome {
            IdempotentOutcome::Lease(id) => {
                let lease = self.store.lease(&id)?.ok_or(GrantError::NotFound {
                    what: "lease",
                    id: id.clone(),
                })?;
                let now = self.clock.now();
                if lease.state != LeaseState::Active || lease.expires_at <= now {
                    return Err(GrantError::WrongState(format!(
                        "the lease `{id}` granted for this client_request_id is no longer active"
                    )));
                }
                let keys = self.keys.current();
                let tok = token::mint(&keys, &self.claims(&lease, lease.token_issued_at))?;
                tracing::info!(jti = %lease.id, sub = %who, "idempotent replay");
                Ok(Outcome::Granted { token: tok, lease })
            }
            IdempotentOutcome::Request(id) => {
                let req = self.store.request(&id)?.ok_or(GrantError::NotFound {
                    what: "request",
                    id,
                })?;
                Ok(Outcome::Parked(req))
            }
        }
    }

    fn visible_request(&self, who: &Identity, id: &str) -> Result<TokenRequest, GrantError> {
        let not_found = || GrantError::NotFound {
            what: "request",
            id: id.chars().take(80).collect(),
        };
        let req = self.store.request(id)?.ok_or_else(not_found)?;
        let policy = self.policy();
        if req.requester == who.as_str() || policy.is_admin(who) || may_decide(&policy, who, &req) {
            Ok(req)
        } else {
            // Never hint that someone else's request exists.
            Err(not_found())
        }
    }

    /// Read a request (requester, eligible approver or admin).
    pub fn get_request(&self, who: &Identity, id: &str) -> Result<TokenRequest, GrantError> {
        require_id("request_id", id)?;
        self.visible_request(who, id)
    }

    /// Withdraw one's own pending or approved request.
    pub async fn withdraw_request(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<TokenRequest, GrantError> {
        require_id("request_id", id)?;
        validate_reason(reason, false)?;
        loop {
            let req = self.visible_request(who, id)?;
            if req.requester != who.as_str() {
                return Err(GrantError::NotAllowed(format!(
                    "only the requester may withdraw request `{id}`"
                )));
            }
            if req.state.is_terminal() {
                return Err(GrantError::WrongState(
                    format!("request `{id}` is already {:?}", req.state).to_lowercase(),
                ));
            }
            let now = self.clock.now();
            let new = req.moved(RequestState::Withdrawn, who.as_str(), now, reason);
            if self.swap_request(&req, &new)? {
                self.record(vec![AuditEntry::ok(
                    who.as_str(),
                    "request.withdrawn",
                    id,
                    &new.scopes,
                    reason,
                )])?;
                self.commit.durable().await?;
                self.announce("withdrawn", &new, who.as_str(), reason);
                tracing::info!(request_id = %id, sub = %who, "withdrawn");
                return Ok(new);
            }
        }
    }

    fn owned_lease(&self, who: &Identity, id: &str, admin_ok: bool) -> Result<Lease, GrantError> {
        require_id("lease_id", id)?;
        let lease = self.store.lease(id)?.ok_or_else(|| GrantError::NotFound {
            what: "lease",
            id: id.chars().take(80).collect(),
        })?;
        if lease.subject == who.as_str() || (admin_ok && self.policy().is_admin(who)) {
            Ok(lease)
        } else {
            Err(GrantError::NotAllowed(format!(
                "`lease_id`: lease `{id}` belongs to another identity"
            )))
        }
    }

    /// Read a lease (owner or admin).
    pub fn get_lease(&self, who: &Identity, id: &str) -> Result<Lease, GrantError> {
        self.owned_lease(who, id, true)
    }

    /// Extend an active lease, up to its `max_expires_at`, with a fresh token.
    pub async fn renew(
        &self,
        who: &Identity,
        id: &str,
        ttl: Option<Duration>,
    ) -> Result<(String, Lease), GrantError> {
        self.validate_ttl(ttl, "ttl")?;
        loop {
            let lease = self.owned_lease(who, id, false)?;
            let now = self.clock.now();
            if lease.state != LeaseState::Active || lease.expires_at <= now {
                let state = if lease.state == LeaseState::Revoked {
                    "revoked"
                } else {
                    "expired"
                };
                return Err(GrantError::WrongState(format!(
                    "lease `{id}` is {state} and cannot be renewed"
                )));
            }
            // Policy may have changed since issue: the identity must still be
            // allowed the scopes (approval-tier leases are not re-approved).
            self.policy().decide(who, &lease.scopes, None)?;
            let want = ttl.map_or(lease.ttl_ms, millis);
            let expires_at = now.saturating_add(want).min(lease.max_expires_at);
            if expires_at <= now {
                return Err(GrantError::WrongState(format!(
                    "lease `{id}` has reached its max_ttl"
                )));
            }
            let keys = self.keys.current();
            let new = Lease {
                expires_at,
                renewals: lease.renewals + 1,
                token_issued_at: now,
                kid: keys.active.kid.clone(),
                ..lease.clone()
            };
            let tok = token::mint(&keys, &self.claims(&new, now))?;
            if self.swap_lease(&lease, &new)? {
                self.record(vec![AuditEntry::ok(
                    who.as_str(),
                    "lease.renewed",
                    id,
                    &new.scopes,
                    "",
                )])?;
                self.commit.durable().await?;
                self.metrics.renewals.inc();
                self.note_deadline(new.expires_at);
                tracing::info!(jti = %id, kid = %new.kid, sub = %who, renewals = new.renewals, "renewed");
                return Ok((tok, new));
            }
        }
    }

    /// Revoke one lease (owner, or admin for anyone's). Revoking a lease that
    /// already ended returns it unchanged.
    pub async fn revoke(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<Lease, GrantError> {
        validate_reason(reason, false)?;
        loop {
            let lease = self.owned_lease(who, id, true)?;
            if lease.state != LeaseState::Active {
                return Ok(lease);
            }
            let new = revoked(&lease, who.as_str(), reason, self.clock.now());
            if self.swap_lease(&lease, &new)? {
                self.record(vec![AuditEntry::ok(
                    who.as_str(),
                    "lease.revoked",
                    id,
                    &new.scopes,
                    reason,
                )])?;
                self.commit.durable().await?;
                tracing::info!(jti = %id, sub = %lease.subject, by = %who, "revoked");
                return Ok(new);
            }
        }
    }

    /// Revoke every active lease of `subject` (admin only). Returns how many.
    pub async fn revoke_all(
        &self,
        who: &Identity,
        subject: &str,
        reason: &str,
    ) -> Result<u64, GrantError> {
        let subject = Identity::parse(subject).map_err(|e| GrantError::Invalid {
            field: "subject",
            reason: e.to_string(),
        })?;
        validate_reason(reason, false)?;
        if !self.policy().is_admin(who) {
            return Err(GrantError::NotAllowed(
                "bulk revocation needs an admin identity".into(),
            ));
        }
        let store = self.store.clone();
        let now = self.clock.now();
        let (by, why, subj) = (
            who.as_str().to_owned(),
            reason.to_owned(),
            subject.as_str().to_owned(),
        );
        let count = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            let mut count = 0;
            let mut after: Option<String> = None;
            loop {
                let page = store.leases_of(&subj, after.as_deref(), 4096)?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                for mut lease in page {
                    while lease.state == LeaseState::Active {
                        let new = revoked(&lease, &by, &why, now);
                        if store.swap_lease(&lease, &new)? {
                            count += 1;
                            break;
                        }
                        match store.lease(&lease.id)? {
                            Some(l) => lease = l,
                            None => break,
                        }
                    }
                }
            }
            Ok(count)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        self.record(vec![AuditEntry::ok(
            who.as_str(),
            "lease.bulk_revoked",
            subject.as_str(),
            &[],
            &format!("{count} active leases revoked: {reason}"),
        )])?;
        self.commit.durable().await?;
        self.metrics.revocations.inc_by(count);
        self.metrics
            .active_leases
            .dec_by(i64::try_from(count).unwrap_or(i64::MAX));
        tracing::warn!(sub = %subject, by = %who, revoked = count, "bulk revocation");
        Ok(count)
    }

    /// A page of leases of `subject` (empty: the caller), optionally in one
    /// state, after `page_token`. Returns the page and the next token.
    pub fn list_leases(
        &self,
        who: &Identity,
        subject: &str,
        state: Option<LeaseState>,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Lease>, String), GrantError> {
        let subject = if subject.is_empty() {
            who.clone()
        } else {
            Identity::parse(subject).map_err(|e| GrantError::Invalid {
                field: "subject",
                reason: e.to_string(),
            })?
        };
        if subject != *who && !self.policy().is_admin(who) {
            return Err(GrantError::NotAllowed(
                "listing another identity's leases needs an admin identity".into(),
            ));
        }
        if !page_token.is_empty() {
            require_id("page_token", page_token)?;
        }
        let size = match page_size {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(GrantError::Invalid {
                    field: "page_size",
                    reason: format!("at most {MAX_PAGE}"),
                });
            }
            n => n,
        };
        let mut out = Vec::new();
        let mut after = (!page_token.is_empty()).then(|| page_token.to_owned());
        loop {
            let chunk = self
                .store
                .leases_of(subject.as_str(), after.as_deref(), size + 1)?;
            let exhausted = chunk.len() <= size;
            for l in chunk {
                after = Some(l.id.clone());
                if state.is_none_or(|s| s == l.state) {
                    if out.len() == size {
                        // One more exists: the page is full.
                        let next = out.last().map(|l: &Lease| l.id.clone()).unwrap_or_default();
                        return Ok((out, next));
                    }
                    out.push(l);
                }
            }
            if exhausted {
                return Ok((out, String::new()));
            }
        }
    }

    /// RFC 7662: the token's claims if it is live right now, else `None`.
    /// Checks signature, `kid`, `alg`, `iss` and time, then the lease itself,
    /// so the answer never depends on the expiry task having run.
    pub fn introspect(&self, tok: &str) -> Result<Introspection, GrantError> {
        let now = self.clock.now();
        let keys = self.keys.current();
        let claims = match token::verify(&keys, &self.issuer, tok, secs(now)) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "introspection: token rejected");
                return Ok(None);
            }
        };
        let Some(lease) = self.store.lease(&claims.jti)? else {
            return Ok(None);
        };
        let live = lease.state == LeaseState::Active
            && lease.expires_at > now
            && lease.subject == claims.sub
            && claims.exp <= secs(lease.expires_at)
            && claims.iat >= secs(lease.issued_at);
        Ok(live.then_some(claims))
    }

    /// Expire every lease and request due at `now`. Returns how many changed.
    pub async fn expire_due(&self, now: Millis) -> Result<usize, GrantError> {
        let mut changed = 0;
        let mut expired = Vec::new();
        loop {
            let due = self.store.leases_due(now, 1024)?;
            if due.is_empty() {
                break;
            }
            for id in due {
                while let Some(lease) = self.store.lease(&id)? {
                    if lease.state != LeaseState::Active || lease.expires_at > now {
                        break;
                    }
                    let new = Lease {
                        state: LeaseState::Expired,
                        expired_at: Some(now),
                        ..lease.clone()
                    };
                    if self.swap_lease(&lease, &new)? {
                        changed += 1;
                        expired.push(AuditEntry::ok(
                            SYSTEM_ACTOR,
                            "lease.expired",
                            &id,
                            &lease.scopes,
                            "",
                        ));
                        self.metrics
                            .expiries
                            .get_or_create(&vec![("kind", "lease")])
                            .inc();
                        tracing::info!(jti = %id, sub = %lease.subject, "expired");
                        break;
                    }
                }
            }
        }
        let mut events = Vec::new();
        loop {
            let due = self.store.requests_due(now, 1024)?;
            if due.is_empty() {
                break;
            }
            for id in due {
                while let Some(req) = self.store.request(&id)? {
                    if req.state.is_terminal() || req.deadline > now {
                        break;
                    }
                    let why = if req.state == RequestState::Approved {
                        "claim window passed"
                    } else {
                        "pending_ttl passed without enough approvals"
                    };
                    let new = req.moved(RequestState::Expired, SYSTEM_ACTOR, now, why);
                    if self.swap_request(&req, &new)? {
                        changed += 1;
                        expired.push(AuditEntry::ok(
                            SYSTEM_ACTOR,
                            "request.expired",
                            &id,
                            &new.scopes,
                            why,
                        ));
                        self.metrics
                            .expiries
                            .get_or_create(&vec![("kind", "request")])
                            .inc();
                        events.push(new);
                        tracing::info!(request_id = %id, "request expired");
                        break;
                    }
                }
            }
        }
        if changed > 0 {
            self.record(expired)?;
            self.commit.durable().await?;
        }
        for req in events {
            let why = req
                .history
                .last()
                .map(|t| t.reason.clone())
                .unwrap_or_default();
            self.announce("expired", &req, SYSTEM_ACTOR, &why);
        }
        Ok(changed)
    }

    /// Earliest pending deadline, recorded as what the expiry task sleeps to.
    pub(crate) fn next_deadline(&self) -> Result<Option<Millis>, GrantError> {
        let next = match (
            self.store.next_lease_deadline()?,
            self.store.next_request_deadline()?,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.scheduled
            .store(next.unwrap_or(u64::MAX), Ordering::Release);
        Ok(next)
    }

    pub(crate) fn woken(&self) -> &Notify {
        &self.wake
    }

    /// After a sweep at `now`: every deadline before the next scheduled one
    /// has been handled. Reading `scheduled` under the channel's lock orders
    /// this against [`Engine::note_deadline`] lowering it.
    pub(crate) fn publish_progress(&self, now: Millis) {
        self.expiry_progress.send_modify(|p| {
            let next = self.scheduled.load(Ordering::Acquire);
            *p = now.max(next.saturating_sub(1));
        });
    }
}

/// May `who` decide (approve, deny, review) this request? A member of an
/// approver group of one of its scopes, and never its requester.
pub(crate) fn may_decide(policy: &Policy, who: &Identity, req: &TokenRequest) -> bool {
    req.requester != who.as_str()
        && req.waiting_for.iter().any(|w| {
            w.approver_groups
                .iter()
                .any(|g| policy.is_member(g, who.as_str()))
        })
}

pub(crate) fn revoked(lease: &Lease, by: &str, reason: &str, now: Millis) -> Lease {
    Lease {
        state: LeaseState::Revoked,
        revoked_at: Some(now),
        revoked_by: Some(by.to_owned()),
        revoke_reason: (!reason.is_empty()).then(|| reason.to_owned()),
        ..lease.clone()
    }
}

pub(crate) fn require_id(field: &'static str, id: &str) -> Result<(), GrantError> {
    if id.is_empty() {
        return Err(GrantError::Invalid {
            field,
            reason: "required".into(),
        });
    }
    if id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(GrantError::Invalid {
            field,
            reason: "not a valid id".into(),
        });
    }
    Ok(())
}

pub(crate) fn validate_reason(reason: &str, required: bool) -> Result<(), GrantError> {
    if required && reason.trim().is_empty() {
        return Err(GrantError::Invalid {
            field: "reason",
            reason: "required".into(),
        });
    }
    if reason.len() > MAX_REASON || reason.contains('\0') {
        return Err(GrantError::Invalid {
            field: "reason",
            reason: format!("at most {MAX_REASON} bytes of text"),
        });
    }
    Ok(())
}

/// Check and normalise the scope list: 1..=64 valid names, sorted, unique.
fn validate_scopes(scopes: &[String]) -> Result<Vec<String>, GrantError> {
    if scopes.is_empty() {
        return Err(GrantError::Invalid {
            field: "scopes",
            reason: "at least one scope is required".into(),
        });
    }
    if scopes.len() > MAX_SCOPES {
        return Err(GrantError::Invalid {
            field: "scopes",
            reason: format!(
                "at most {MAX_SCOPES} scopes per request, got {}",
                scopes.len()
            ),
        });
    }
    for s in scopes {
        if !valid_scope_name(s) {
            let shown: String = s.escape_debug().take(64).collect();
            return Err(GrantError::Invalid {
                field: "scopes",
                reason: format!(
                    "`{shown}` must be 1-128 printable ASCII characters without spaces"
                ),
            });
        }
    }
    let mut v = scopes.to_vec();
    v.sort();
    v.dedup();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::clock::ManualClock;
    use crate::keys::{Kek, SigningAlg};
    use crate::store::conformance::FailingSync;
    use crate::store::mem::MemStore;

    const POLICY: &str = r#"
[[scope]]
name = "a"
tier = "auto"
workloads = ["spiffe://t/*"]
"#;

    #[tokio::test]
    async fn a_store_that_cannot_persist_yields_no_token_no_audit_gap_and_unhealthy() {
        let store = Arc::new(FailingSync(MemStore::new(), AtomicBool::new(false)));
        let dyn_store: Arc<dyn Store> = store.clone();
        let (kek, _) = Kek::generate().unwrap();
        let ring = Arc::new(
            KeyRing::load_or_create(dyn_store.as_ref(), &kek, SigningAlg::Es256, 1).unwrap(),
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        let (commit, _t) = GroupCommit::start(dyn_store.clone(), cancel.clone());
        let audit = AuditLog::open(dyn_store.as_ref()).unwrap();
        let engine = Engine::new(
            dyn_store.clone(),
            commit,
            Policy::parse(POLICY).unwrap(),
            ring.clone(),
            Arc::new(ManualClock::new(1_000_000)),
            "https://t".into(),
            audit,
        );
        let who = Identity::parse("spiffe://t/w").unwrap();
        let ask = TokenAsk {
            scopes: vec!["a".into()],
            ..Default::default()
        };
        assert!(matches!(
            engine.request_token(&who, ask.clone()).await.unwrap(),
            Outcome::Granted { .. }
        ));
        assert!(engine.healthy());

        store.1.store(true, Ordering::SeqCst);
        let err = engine.request_token(&who, ask.clone()).await.unwrap_err();
        assert!(
            matches!(err, GrantError::Store(StoreError::Unavailable(_))),
            "{err}"
        );
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        assert!(!engine.healthy(), "health follows the failed commit");

        // The chain has no gap: every record is there, in order, and verifies.
        let report = crate::audit::verify(dyn_store.as_ref(), &ring.current()).unwrap();
        assert!(report.problem.is_none(), "{report:?}");
        store.1.store(false, Ordering::SeqCst);
        assert!(matches!(
            engine.request_token(&who, ask).await.unwrap(),
            Outcome::Granted { .. }
        ));
        assert!(engine.healthy(), "recovers once a sync succeeds");
        cancel.cancel();
    }
}

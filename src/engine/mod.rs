//! `engine` moves state: it turns an authenticated ask into a durable lease
//! and a token, a parked request, or a refusal; it renews, revokes, lists,
//! expires and introspects; it runs approvals, key rotation and the trail's
//! upkeep. It knows nothing about gRPC: `api` translates, and maps
//! [`EngineError`] to status codes in one table.
//!
//! One file per job, all over the private core defined here:
//! [`issue`] (grant or park; [`break_glass`]: grant now, review after),
//! [`leases`] (read, renew, revoke, bulk), [`requests`] (read, withdraw,
//! watch), [`approvals`] (decide; [`claim`]: deliver the token once),
//! [`introspect`], [`expiry`] (deadline state and its loop), [`rotate`]
//! (signing keys), [`trail`] (reading the decision trail), [`upkeep`]
//! (retention, checkpoints, policy reloads).
//!
//! # One way to write
//! Every operation is one batch: [`Engine::commit`] builds it with a plan
//! (reads, then [`Records`] edits and creates, then its audit records, all
//! into one [`Op`]), has the store apply it atomically — state and records
//! together, or nothing — and waits until the group commit has made it
//! durable. A compare-and-swap that lost a race builds the whole operation
//! again from fresh reads.
//!
//! # What is durable when a reply is sent
//! Every acknowledged change — a grant, a parked request, a renewal, a
//! revocation, a withdrawal, a decision — has been made durable by a group
//! commit before the method returns `Ok`. A token is minted before the
//! write, but dropped unless the write became durable.

pub mod approvals;
mod ask;
mod break_glass;
mod cascade;
mod claim;
mod db_root;
mod error;
pub mod exchange;
pub mod expiry;
pub mod federated;
pub mod introspect;
pub mod issue;
pub mod leases;
pub mod logins;
mod quota;
mod records;
pub mod requests;
pub mod rotate;
mod shared;
pub mod trail;
pub mod upkeep;

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{broadcast, mpsc, watch};

pub use self::error::{EngineError, ErrorKind};
pub use self::exchange::ExchangeAsk;
pub use self::issue::{Outcome, TokenAsk};
pub use self::quota::{Limits, Rate, Throttle, WatchPermit, peer_key, too_fast};
pub(crate) use self::records::{Cas, Op, Planned, Records};
pub use self::upkeep::{PolicyReloads, PolicySwap};
use crate::audit::{AuditLog, Entry as AuditEntry};
use crate::clock::{Clock, secs};
use crate::identity::Identity;
use crate::keys::KeyRing;
use crate::metrics::{Metrics, Sampled};
use crate::model::{Idempotency, Lease, TokenRequest};
use crate::notify::{Event, EventKind, Notifier};
use crate::policy::Policy;
use crate::store::commit::GroupCommit;
use crate::store::{Applied, Fence, Lost, Millis, Store};
use crate::token::Claims;

/// Who calls, as far as binding is concerned: the authenticated identity
/// and the thumbprint of the certificate it presented (`None` where no
/// certificate exists, e.g. in-process callers).
#[derive(Clone, Debug)]
pub struct Holder {
    /// The authenticated identity.
    pub who: Identity,
    /// RFC 8705 `x5t#S256` of its client certificate.
    pub x5t: Option<String>,
}

impl From<Identity> for Holder {
    /// An identity without a certificate (in-process callers, tests).
    fn from(who: Identity) -> Self {
        Self { who, x5t: None }
    }
}

/// Actor recorded for the broker's own transitions (expiry, retention).
pub const SYSTEM_ACTOR: &str = "portcullis";

/// The broker's state machine over a store, a policy and a key ring.
pub struct Engine {
    records: Records,
    commit: GroupCommit,
    policy: RwLock<Arc<Policy>>,
    policy_reloads: watch::Sender<PolicyReloads>,
    /// Every swap, old policy and new, for whoever acts on a change (the
    /// console ends the sessions of people it removed).
    policy_swaps: broadcast::Sender<PolicySwap>,
    keys: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    issuer: String,
    notifier: Notifier,
    notify_rx: Mutex<Option<mpsc::Receiver<Event>>>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    deadlines: expiry::Deadlines,
    request_events: broadcast::Sender<String>,
    limits: Limits,
    watchers: quota::Watchers,
    /// `ExchangeToken` calls per identity.
    exchanges: Throttle,
    /// Whether this broker does the time-driven work (always, on a store
    /// of its own; while it holds the role, on a shared one).
    leader: watch::Sender<bool>,
    /// On a shared store: when this broker must stop acting as leader unless
    /// a renewal moved it (half a term after the last renewal started).
    lead_until: Mutex<Option<std::time::Instant>>,
    /// On a shared store: the term this broker leads in, which fences its
    /// leader-only batches.
    upkeep_fence: Mutex<Option<Fence>>,
    /// On a shared store: the term of the key-ring change under way.
    keys_fence: Mutex<Option<Fence>>,
    /// Last health verdict: the store answers and the last commit worked.
    serving: std::sync::atomic::AtomicBool,
    /// The databases login scopes make logins on.
    logins: Arc<crate::logins::Logins>,
    /// The logins of leases that ended, for [`Engine::end_logins`].
    ended_logins_rx: Mutex<Option<mpsc::UnboundedReceiver<records::EndedLogin>>>,
    /// Lease ids whose login was just ended (a revocation waits for its own).
    login_ended: broadcast::Sender<String>,
    /// One login grant per identity at a time (the cap).
    login_turns: logins::Turns,
    /// One admin password rotation at a time on this broker.
    root_turn: tokio::sync::Mutex<()>,
    /// Claims digests of platform tokens whose refusal is in the trail:
    /// the same token refused again is counted, not recorded again.
    refusals_recorded: Mutex<std::collections::HashSet<String>>,
}

/// What an engine is built from.
pub struct Parts {
    /// Where state lives.
    pub store: Arc<dyn Store>,
    /// The store's group commit.
    pub commit: GroupCommit,
    /// The policy in force at start.
    pub policy: Policy,
    /// Signing keys.
    pub keys: Arc<KeyRing>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// `iss` of every token.
    pub issuer: String,
    /// The trail, continued from the store.
    pub audit: AuditLog,
    /// Per-identity bounds.
    pub limits: Limits,
}

impl Engine {
    /// Assemble an engine.
    pub fn new(parts: Parts) -> Self {
        let (notifier, notify_rx) = Notifier::new();
        let metrics = Arc::new(Metrics::new());
        // Nobody leads until the leadership task says so (at once on a
        // store of its own, whose `lead` always says yes).
        let leader = watch::channel(false).0;
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let sealed = db_root::StorePasswords {
            store: parts.store.clone(),
            keys: parts.keys.clone(),
        };
        let logins = Arc::new(crate::logins::Logins::new(
            parts.keys.deployment_id().ok(),
            metrics.clone(),
            Some(Arc::new(sealed)),
        ));
        Self {
            logins,
            ended_logins_rx: Mutex::new(Some(ended_rx)),
            login_ended: broadcast::channel(1024).0,
            login_turns: logins::Turns::default(),
            root_turn: tokio::sync::Mutex::default(),
            refusals_recorded: Mutex::default(),
            leader,
            lead_until: Mutex::new(None),
            upkeep_fence: Mutex::new(None),
            keys_fence: Mutex::new(None),
            serving: std::sync::atomic::AtomicBool::new(true),
            records: Records::new(parts.store, metrics.clone()).ending_logins_to(ended_tx),
            commit: parts.commit,
            policy: RwLock::new(Arc::new(parts.policy)),
            policy_reloads: watch::channel(PolicyReloads::default()).0,
            policy_swaps: broadcast::channel(16).0,
            keys: parts.keys,
            clock: parts.clock,
            issuer: parts.issuer,
            notifier,
            notify_rx: Mutex::new(Some(notify_rx)),
            audit: parts.audit,
            metrics,
            deadlines: expiry::Deadlines::default(),
            request_events: broadcast::channel(1024).0,
            exchanges: Throttle::new(parts.limits.exchanges),
            limits: parts.limits,
            watchers: quota::Watchers::default(),
        }
    }

    /// One operation: build it with `plan` (reads, edits, records — no
    /// writes), apply it as one atomic batch, and wait until the group
    /// commit has made it durable. Every acknowledged change ends here.
    ///
    /// `plan` takes the empty [`Op`] and gives it back built, with its
    /// result (an owned `Op` rather than `&mut`: the plan's future must be
    /// `Send`, which a borrowed argument would not let the compiler prove).
    pub(crate) async fn commit<T, F, P>(&self, plan: P) -> Result<T, EngineError>
    where
        P: FnMut(Op) -> F,
        F: Future<Output = Planned<T>>,
    {
        match self.commit_claiming(plan).await? {
            Ok(out) => Ok(out),
            // Only a plan that claims a key can lose it.
            Err(_) => Err(EngineError::Internal(
                "an idempotency key was taken by an operation that claimed none".into(),
            )),
        }
    }

    /// [`Engine::commit`] for an operation that claims an idempotency key:
    /// `Err(entry)` when the key was taken first (nothing was written).
    pub(crate) async fn commit_claiming<T, F, P>(
        &self,
        plan: P,
    ) -> Result<Result<T, Idempotency>, EngineError>
    where
        P: FnMut(Op) -> F,
        F: Future<Output = Planned<T>>,
    {
        let out = self.apply_op(plan).await?;
        if out.is_ok() {
            self.durable().await?;
        }
        Ok(out)
    }

    /// Build and apply one operation; a lost compare-and-swap builds it
    /// again from fresh reads, a withdrawn signing key after reloading the
    /// key ring. The plan runs here (its reads are short); the store
    /// applies the batch on its own, and this waits without holding a
    /// thread.
    pub(crate) async fn apply_op<T, F, P>(
        &self,
        mut plan: P,
    ) -> Result<Result<T, Idempotency>, EngineError>
    where
        P: FnMut(Op) -> F,
        F: Future<Output = Planned<T>>,
    {
        /// Lost races after which an operation is given up: far beyond any
        /// real contention, so reaching it means the stored form never
        /// equals what was read back, and the caller gets an error instead
        /// of a loop that never ends.
        const MAX_RACES: usize = 1_000;
        /// Reloads of the key ring after which a grant stops trying.
        const MAX_KEY_RELOADS: usize = 3;
        let mut reloads = 0;
        for _ in 0..MAX_RACES {
            let (op, out) = plan(Op::new(self.clock.now())).await?;
            if op.is_empty() {
                return Ok(Ok(out));
            }
            match self.records.apply(op).await? {
                Applied::Done(_) => return Ok(Ok(out)),
                Applied::Lost(Lost::Lease(_) | Lost::Request(_)) => {}
                Applied::Lost(Lost::Idempotency(entry)) => return Ok(Err(entry)),
                Applied::Lost(Lost::KeyInactive(kid)) if reloads < MAX_KEY_RELOADS => {
                    reloads += 1;
                    tracing::warn!(kid = %kid, "signing key withdrawn meanwhile; reloading the key ring");
                    self.keys.refresh(self.store().as_ref()).await?;
                }
                Applied::Lost(Lost::KeyInactive(kid)) => {
                    return Err(crate::store::StoreError::Contended(format!(
                        "signing key `{kid}` was withdrawn and no active key replaced it"
                    ))
                    .into());
                }
                Applied::Lost(Lost::Fenced) => return Err(EngineError::Fenced),
            }
        }
        Err(crate::store::StoreError::Contended(format!(
            "an operation lost {MAX_RACES} compare-and-swap races in a row; nothing was changed"
        ))
        .into())
    }

    /// Wait until everything applied so far is durable; then hand new
    /// trail records to live followers, if any.
    pub(crate) async fn durable(&self) -> Result<(), EngineError> {
        self.commit.durable().await?;
        if self.audit.followed()
            && let Err(e) = self.audit.poll_tail(self.store().as_ref()).await
        {
            tracing::debug!(error = %e, "could not read new trail records");
        }
        Ok(())
    }

    /// Record `entries` in an operation of their own that changes no state
    /// (a refusal, a failed authentication), without waiting: the next
    /// group commit makes them durable.
    pub fn note(&self, entries: Vec<AuditEntry>) -> Result<(), EngineError> {
        let mut op = Op::new(self.clock.now());
        op.record(entries)?;
        let (mut pending, _) = self.records.submit(op);
        self.commit.nudge();
        // Decided at once on a store that applies in the caller's thread:
        // report its failure. Otherwise the writer's outcome is only logged.
        match pending.try_recv() {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                Err(crate::store::StoreError::Stopping.into())
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Ok(Err(e)) = pending.await {
                            tracing::error!(error = %e, "a noted record could not be written");
                        }
                    });
                }
                Ok(())
            }
        }
    }

    /// Wait until every batch this broker handed to the store before the
    /// call has been applied — records noted without waiting included — so
    /// a read of the trail that follows sees them (in order: the stores
    /// apply a broker's batches in the order they were handed over).
    pub async fn settled(&self) -> Result<(), EngineError> {
        let (pending, _) = self.records.submit(Op::new(self.clock.now()));
        crate::store::batch::applied(pending).await?;
        Ok(())
    }

    /// Record `entries` alone and wait until they are durable (events of
    /// the broker itself: start, stop, rejected policies).
    pub async fn record(&self, entries: Vec<AuditEntry>) -> Result<(), EngineError> {
        let entries = &entries;
        self.commit(|mut op| async move {
            op.record(entries.clone())?;
            Ok((op, ()))
        })
        .await
    }

    /// The fence of leader-only work: the upkeep term this broker holds on
    /// a shared store (`None` on a store of its own).
    pub(crate) fn upkeep_fence(&self) -> Option<Fence> {
        self.upkeep_fence.lock().ok().and_then(|f| f.clone())
    }

    /// The fence of the key-ring change under way, if any.
    pub(crate) fn keys_fence(&self) -> Option<Fence> {
        self.keys_fence.lock().ok().and_then(|f| f.clone())
    }

    /// The health task's last verdict (what `/healthz` answers).
    pub fn serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Record the health task's verdict.
    pub fn set_serving(&self, serving: bool) {
        self.serving
            .store(serving, std::sync::atomic::Ordering::Relaxed);
    }

    /// Is the store usable and did the last group commit succeed?
    pub async fn healthy(&self) -> bool {
        self.store().meta("schema_version").await.is_ok() && self.commit.healthy()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The `/metrics` page, with the sampled gauges read now.
    pub fn render_metrics(&self) -> String {
        let commit = self.commit.stats();
        let notify = self.notifier.stats();
        let keys = self.keys.current();
        let key_age_secs = keys
            .records
            .iter()
            .find(|r| r.kid == keys.active.kid)
            .map(|k| {
                self.clock
                    .now()
                    .saturating_sub(k.activated_at.unwrap_or(k.created_at))
                    / 1000
            });
        self.metrics.render(&Sampled {
            syncs: commit.syncs,
            writes: commit.writes,
            notify: notify.snapshot(),
            key_age_secs,
        })
    }

    /// The audit trail.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The receiving end of the notification queue (taken once, by the
    /// server's delivery task).
    pub fn take_notifications(&self) -> Option<mpsc::Receiver<Event>> {
        self.notify_rx.lock().ok().and_then(|mut g| g.take())
    }

    /// Notification counters.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The key ring.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        self.records.store()
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The per-caller bounds this broker runs with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Issuer URL put in `iss`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Request ids whose state changed.
    pub fn request_events(&self) -> broadcast::Receiver<String> {
        self.request_events.subscribe()
    }

    /// The current policy.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Tell watchers that request `id` changed (without a webhook event).
    fn touched(&self, id: &str) {
        let _ = self.request_events.send(id.to_owned());
    }

    /// Announce a request event to webhooks and to watchers.
    fn announce(&self, kind: EventKind, req: &TokenRequest, actor: &str, reason: &str) {
        self.touched(&req.id);
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

    /// The claims of a token for `lease`, issued at `iat`.
    fn claims(&self, lease: &Lease, iat: Millis) -> Claims {
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
            act: lease
                .delegation
                .as_ref()
                .and_then(|d| crate::token::Actor::chain(&d.actors)),
            cnf: lease.cnf.as_ref().map(|x| crate::token::Confirmation {
                x5t_s256: x.clone(),
            }),
        }
    }

    /// Sign `lease`'s token issued at `now` with `keys` (the set whose
    /// active `kid` the lease names) and record its MAC on the lease, so
    /// introspection recognises it. Signing comes before any write: if it
    /// fails, nothing is written.
    fn signed(
        &self,
        keys: &crate::keys::KeySet,
        mut lease: Lease,
        now: Millis,
    ) -> Result<(Lease, String), EngineError> {
        let tok = crate::token::mint(keys, &self.claims(&lease, now))?;
        lease.token_mac = Some(crate::token::mac(keys, &tok));
        Ok((lease, tok))
    }

    /// Refuse unless `who` is an admin.
    fn require_admin(&self, who: &Identity, what: &str) -> Result<(), EngineError> {
        if self.policy().is_admin(who) {
            Ok(())
        } else {
            Err(EngineError::NotAllowed(format!(
                "{what} needs an admin identity"
            )))
        }
    }
}

/// The certificate thumbprint the tokens of `scopes` are bound to:
/// `None` unless a scope says `bind = "mtls"`, then the holder's, which
/// must exist.
pub(crate) fn bound_to(
    policy: &Policy,
    scopes: &[String],
    x5t: Option<&str>,
) -> Result<Option<String>, EngineError> {
    if !policy.binds(scopes) {
        return Ok(None);
    }
    x5t.map(|x| Some(x.to_owned())).ok_or_else(|| {
        EngineError::WrongState(
            "a scope asked for binds its tokens to the caller's client certificate, and the call came without one".into(),
        )
    })
}

/// `req` ended by `who` at `now` in terminal state `to` (denied, withdrawn)
/// for `reason`; refused when it has already ended.
pub(crate) fn end_request(
    req: &TokenRequest,
    to: crate::model::RequestState,
    who: &Identity,
    now: Millis,
    reason: &str,
) -> Result<Option<TokenRequest>, EngineError> {
    if req.state.is_terminal() {
        return Err(EngineError::WrongState(format!(
            "request `{}` is already {} and cannot be {}",
            req.id,
            req.state.name(),
            to.name()
        )));
    }
    approvals::check_deadline(req, now)?;
    Ok(Some(req.moved(to, who.as_str(), now, reason)))
}

/// May `who` decide (approve, deny, review) this request? A member of an
/// approver group of one of its scopes, and never its requester.
pub(crate) fn may_decide(policy: &Policy, who: &Identity, req: &TokenRequest) -> bool {
    !policy.same_person(&req.requester, who.as_str())
        && !approvals::in_chain(policy, req, who)
        && req.waiting_for.iter().any(|w| {
            w.approver_groups
                .iter()
                .any(|g| policy.is_member(g, who.as_str()))
        })
}

#[cfg(test)]
pub(crate) mod testing;

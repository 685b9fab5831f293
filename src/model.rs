//! `model`: the domain records the broker keeps — leases, parked requests
//! with their approvals and history, idempotency entries, signing-key
//! records — and their state machines' small helpers. No storage and no
//! wire types here: `store` remembers these, `api` translates them.
//!
//! Every record is JSON (leases also in the compact encoding of
//! `store::record`) with `#[serde(default)]` on every field added after
//! v1, so older records keep decoding as the schema grows.

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// Lifecycle of a lease. Terminal states never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Token(s) for it are live until `expires_at`.
    Active,
    /// Reached `expires_at` without renewal.
    Expired,
    /// Ended early by its owner or an admin.
    Revoked,
}

/// The durable record of a grant. `id` is the token's `jti`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Lease id, also the `jti` of its tokens.
    pub id: String,
    /// Identity the token is for.
    pub subject: String,
    /// Authenticated caller that asked (equals `subject` until delegation).
    pub client_id: String,
    /// Granted scopes, sorted and de-duplicated.
    pub scopes: Vec<String>,
    /// Token audience.
    pub audience: String,
    /// Caller's stated reason.
    pub justification: String,
    /// First issue.
    pub issued_at: Millis,
    /// Current end of life.
    pub expires_at: Millis,
    /// Upper bound for renewals.
    pub max_expires_at: Millis,
    /// TTL granted at issue, the default extension on renew.
    pub ttl_ms: u64,
    /// Lifecycle state.
    pub state: LeaseState,
    /// Key that signed the latest token.
    pub kid: String,
    /// Number of renewals so far.
    pub renewals: u32,
    /// Start of the latest token's life (`iat` of the newest token).
    #[serde(default)]
    pub token_issued_at: Millis,
    /// When it was revoked.
    #[serde(default)]
    pub revoked_at: Option<Millis>,
    /// Who revoked it.
    #[serde(default)]
    pub revoked_by: Option<String>,
    /// Why it was revoked.
    #[serde(default)]
    pub revoke_reason: Option<String>,
    /// When the expiry task marked it expired.
    #[serde(default)]
    pub expired_at: Option<Millis>,
    /// Request this lease came from (approval tier).
    #[serde(default)]
    pub request_id: Option<String>,
    /// Approvers whose approvals produced it.
    #[serde(default)]
    pub approved_by: Vec<String>,
    /// Issued through break-glass.
    #[serde(default)]
    pub break_glass: bool,
    /// MAC of the newest token minted for it (HMAC-SHA256 under a key
    /// derived from the KEK), so introspection can recognise that exact
    /// token without a signature check. Never shown.
    #[serde(skip)]
    pub token_mac: Option<[u8; 32]>,
    /// Where it was delegated from (token exchange); `None` for a lease
    /// granted directly.
    #[serde(default)]
    pub delegation: Option<Delegation>,
    /// Base64url SHA-256 of the client certificate its tokens are bound to.
    #[serde(default)]
    pub cnf: Option<String>,
    /// The database login it holds (a login scope, issue 23).
    #[serde(default)]
    pub login: Option<Box<LeaseLogin>>,
}

/// The database login a lease holds (docs/design-db-credentials.md). Its
/// password is given to the caller once and kept nowhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLogin {
    /// The `[[database]]` it is made on.
    pub database: String,
    /// Its role name there.
    pub role: String,
    /// The group role it is a member of.
    pub group: String,
}

/// How a delegated lease hangs from its parent (docs/design-delegation.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// The lease it was delegated from.
    pub parent_id: String,
    /// Links from the lease granted directly (1 for its children).
    pub depth: u32,
    /// Who acts, nearest first (the token's nested `act` claims).
    pub actors: Vec<String>,
}

/// Lifecycle of a parked request: PENDING, then APPROVED (open for the
/// requester to claim) or a terminal state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for approvals.
    Pending,
    /// Approved; the token is minted when the requester claims it.
    Approved,
    /// Token delivered (terminal).
    Issued,
    /// Refused by an approver (terminal).
    Denied,
    /// Withdrawn by the requester (terminal).
    Withdrawn,
    /// Pending or claim window passed (terminal).
    Expired,
}

impl RequestState {
    /// Its name in messages (as stored: lowercase).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Issued => "issued",
            Self::Denied => "denied",
            Self::Withdrawn => "withdrawn",
            Self::Expired => "expired",
        }
    }

    /// Terminal states never change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Issued | Self::Denied | Self::Withdrawn | Self::Expired
        )
    }
}

/// What one approval-tier scope needs before the request can be issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// The scope.
    pub scope: String,
    /// Groups whose members may approve it.
    pub approver_groups: Vec<String>,
    /// Distinct approvals needed.
    pub approvals_required: u32,
    /// Policy rule that parked it.
    pub rule: String,
    /// The scope's description when the request was parked (empty when
    /// the policy has none, or in records written before descriptions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// One human approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Approver identity.
    pub approver: String,
    /// When.
    pub at: Millis,
    /// Why.
    pub reason: String,
    /// Shorter TTL this approver granted, if any.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// Scopes whose requirement this approval counted toward (fixed when it
    /// was given, so later group changes do not rewrite history).
    #[serde(default)]
    pub counted_for: Vec<String>,
}

/// One state change, kept for the record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Previous state (`None` at creation).
    pub from: Option<RequestState>,
    /// New state.
    pub to: RequestState,
    /// Who caused it (an identity, or `portcullis` for the scheduler).
    pub actor: String,
    /// When.
    pub at: Millis,
    /// Why.
    pub reason: String,
}

/// A parked request. Everything but `state`, `deadline`, `approvals`,
/// `lease_id` and `history` is immutable; approvals bind to `digest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Request id.
    pub id: String,
    /// Who asked.
    pub requester: String,
    /// Scopes asked for, sorted.
    pub scopes: Vec<String>,
    /// TTL the token gets once issued (already clamped).
    pub ttl_ms: u64,
    /// Renewal bound measured from issue.
    pub max_ttl_ms: u64,
    /// Audience.
    pub audience: String,
    /// Requester's reason.
    pub justification: String,
    /// State.
    pub state: RequestState,
    /// Creation time.
    pub created_at: Millis,
    /// When the current state times out (pending TTL or claim window).
    pub deadline: Millis,
    /// What it waits for.
    pub waiting_for: Vec<Requirement>,
    /// Approvals so far.
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// Lease created on issue.
    #[serde(default)]
    pub lease_id: Option<String>,
    /// Hex SHA-256 over the immutable part.
    pub digest: String,
    /// Every transition.
    #[serde(default)]
    pub history: Vec<Transition>,
    /// Caller's idempotency key.
    #[serde(default)]
    pub client_request_id: Option<String>,
    /// Granted at once through break-glass.
    #[serde(default)]
    pub break_glass: bool,
    /// Break-glass grant still awaiting an approver's acknowledgement.
    #[serde(default)]
    pub review_pending: bool,
    /// Who acknowledged the break-glass grant.
    #[serde(default)]
    pub reviewed_by: Option<String>,
    /// Their reason.
    #[serde(default)]
    pub review_reason: Option<String>,
    /// A parked token exchange (issue 12): where the lease it becomes hangs
    /// (its parent, depth and acting chain). Older records read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<Delegation>,
    /// A requester signed in with a platform token (issue 24): which
    /// sign-in. Older records read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in: Option<SignIn>,
    /// Hex SHA-256 of the claim secret such a requester proves itself with
    /// (it has no certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_digest: Option<String>,
}

/// A workload's sign-in with its platform's token, as approvers see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignIn {
    /// The `[[issuer]]` entry.
    pub issuer: String,
    /// The token's `sub`.
    pub subject: String,
    /// Hex SHA-256 of its payload segment.
    pub claims_digest: String,
    /// Verified claims naming the run or pod.
    #[serde(default)]
    pub evidence: std::collections::BTreeMap<String, String>,
}

/// What a lease grants, or a request asks for: the part both share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terms {
    /// Scopes, sorted and de-duplicated.
    pub scopes: Vec<String>,
    /// Audience.
    pub audience: String,
    /// The requester's reason.
    pub justification: String,
    /// Life of the token at issue.
    pub ttl_ms: u64,
    /// Renewal bound, measured from issue.
    pub max_ttl_ms: u64,
}

impl Lease {
    /// A new ACTIVE lease `id` for `subject` on `terms`, issued at `now`,
    /// its first token signed by `kid`.
    pub fn active(id: String, subject: &str, terms: &Terms, now: Millis, kid: &str) -> Self {
        Self {
            id,
            subject: subject.to_owned(),
            client_id: subject.to_owned(),
            scopes: terms.scopes.clone(),
            audience: terms.audience.clone(),
            justification: terms.justification.clone(),
            issued_at: now,
            expires_at: now.saturating_add(terms.ttl_ms),
            max_expires_at: now.saturating_add(terms.max_ttl_ms),
            ttl_ms: terms.ttl_ms,
            state: LeaseState::Active,
            kid: kid.to_owned(),
            renewals: 0,
            token_issued_at: now,
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            expired_at: None,
            request_id: None,
            approved_by: Vec::new(),
            break_glass: false,
            token_mac: None,
            delegation: None,
            cnf: None,
            login: None,
        }
    }

    /// When this lease ended, if it has.
    pub fn ended_at(&self) -> Option<Millis> {
        match self.state {
            LeaseState::Active => None,
            LeaseState::Revoked => Some(self.revoked_at.unwrap_or(self.expires_at)),
            LeaseState::Expired => Some(self.expired_at.unwrap_or(self.expires_at)),
        }
    }
}

impl TokenRequest {
    /// Who made it: the holder who asked for an exchange (its nearest
    /// actor), else its requester. A request counts against its maker's
    /// quota.
    pub fn made_by(&self) -> &str {
        self.delegation
            .as_ref()
            .and_then(|d| d.actors.first())
            .map_or(self.requester.as_str(), String::as_str)
    }

    /// Those a request concerns: its requester and its maker (once each).
    pub fn parties(&self) -> impl Iterator<Item = &str> {
        let maker = Some(self.made_by()).filter(|m| *m != self.requester);
        std::iter::once(self.requester.as_str()).chain(maker)
    }

    /// A new request `id` by `requester` for `terms`, created at `now` in
    /// `state` (its first transition); no deadline, requirements or digest
    /// yet.
    pub fn new(
        id: String,
        requester: &str,
        terms: &Terms,
        now: Millis,
        state: RequestState,
        reason: &str,
    ) -> Self {
        Self {
            id,
            requester: requester.to_owned(),
            scopes: terms.scopes.clone(),
            ttl_ms: terms.ttl_ms,
            max_ttl_ms: terms.max_ttl_ms,
            audience: terms.audience.clone(),
            justification: terms.justification.clone(),
            state,
            created_at: now,
            deadline: now,
            waiting_for: Vec::new(),
            approvals: Vec::new(),
            lease_id: None,
            digest: String::new(),
            history: vec![Transition {
                from: None,
                to: state,
                actor: requester.to_owned(),
                at: now,
                reason: reason.to_owned(),
            }],
            client_request_id: None,
            break_glass: false,
            review_pending: false,
            reviewed_by: None,
            review_reason: None,
            delegation: None,
            sign_in: None,
            claim_digest: None,
        }
    }

    /// What this request asks for.
    pub fn terms(&self) -> Terms {
        Terms {
            scopes: self.scopes.clone(),
            audience: self.audience.clone(),
            justification: self.justification.clone(),
            ttl_ms: self.ttl_ms,
            max_ttl_ms: self.max_ttl_ms,
        }
    }

    /// When this request ended (terminal, nothing left to review), if it has.
    pub fn ended_at(&self) -> Option<Millis> {
        (!self.is_open()).then(|| self.history.last().map_or(self.created_at, |t| t.at))
    }

    /// This request moved to `to` by `actor` at `at` for `reason`, with the
    /// transition recorded in its history.
    pub fn moved(&self, to: RequestState, actor: &str, at: Millis, reason: &str) -> Self {
        let mut new = self.clone();
        new.history.push(Transition {
            from: Some(self.state),
            to,
            actor: actor.to_owned(),
            at,
            reason: reason.to_owned(),
        });
        new.state = to;
        new
    }

    /// Open requests still need someone: a decision, a claim, or a review.
    pub fn is_open(&self) -> bool {
        !self.state.is_terminal() || self.review_pending
    }
}

/// What an idempotency key resolved to the first time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    /// Caller identity the key belongs to (keys are per caller).
    pub caller: String,
    /// The caller's key.
    pub key: String,
    /// Hex SHA-256 of the request parameters, to refuse reuse with others.
    pub params_digest: String,
    /// The outcome.
    pub outcome: IdempotentOutcome,
}

/// The first outcome of an idempotent request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdempotentOutcome {
    /// A lease was granted.
    Lease(String),
    /// A request was parked.
    Request(String),
}

/// Lifecycle of a signing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Published, not yet signing.
    Next,
    /// Signing.
    Active,
    /// Published until its last token expires.
    Retired,
    /// No longer published and its private part destroyed; the public key
    /// is kept so the audit trail's old checkpoints still verify.
    Removed,
    /// Withdrawn in an emergency (possibly compromised): never published
    /// or trusted again; kept so the trail can say which checkpoints it
    /// signed.
    Withdrawn,
}

impl KeyState {
    /// Published in the JWKS and trusted for tokens.
    pub fn is_published(self) -> bool {
        matches!(self, Self::Next | Self::Active | Self::Retired)
    }
}

/// A signing key. The private part is sealed (AES-256-GCM under the KEK).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Key id (RFC 7638 thumbprint).
    pub kid: String,
    /// JOSE algorithm name.
    pub alg: String,
    /// Lifecycle state.
    pub state: KeyState,
    /// Raw public key.
    pub public: Vec<u8>,
    /// Nonce ‖ ciphertext ‖ tag of the PKCS#8 private key.
    pub sealed_private: Vec<u8>,
    /// Creation.
    pub created_at: Millis,
    /// Activation.
    #[serde(default)]
    pub activated_at: Option<Millis>,
    /// Removal time once retired.
    #[serde(default)]
    pub retire_at: Option<Millis>,
}

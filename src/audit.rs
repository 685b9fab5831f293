//! `audit` keeps the decision trail: one record per decision and transition,
//! hash-chained (each record carries the SHA-256 of the previous record's
//! stored bytes) and periodically anchored by a checkpoint signed with the
//! broker's active key. Edits, deletions and reorderings are found by
//! [`verify`] at the sequence number where they happened.
//!
//! Records are part of the operation they describe: the engine puts their
//! bodies in the operation's batch, and the store numbers and chains them
//! inside the same atomic apply (`store::batch`), on every backend. So no
//! state exists without its record, and an action is acknowledged only when
//! the sync that makes both durable has returned. Tokens and key material
//! never appear; only `jti` and `kid`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::keys::KeySet;
use crate::store::{Millis, Store, StoreError};

pub use crate::chain::GENESIS;
use crate::chain::sha256_hex;

/// The call an audit record belongs to (set by the API layer per RPC).
#[derive(Clone, Debug, Default)]
pub struct CallCtx {
    /// Remote address.
    pub peer: String,
    /// Correlation id.
    pub call_id: String,
}

tokio::task_local! {
    /// The RPC being served, if any.
    pub static CALL: CallCtx;
}

fn current_call() -> CallCtx {
    CALL.try_with(Clone::clone).unwrap_or_default()
}

/// One stored record. Field order is the canonical order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When (ms since the epoch).
    pub at: Millis,
    /// Who acted.
    pub actor: String,
    /// What happened (`token.granted`, `request.approved`, …).
    pub action: String,
    /// Lease, request or key id.
    pub target: String,
    /// Scopes involved.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    /// Why (justification, approver's reason, refusal).
    #[serde(default)]
    pub reason: String,
    /// Policy rule that decided.
    #[serde(default)]
    pub rule: String,
    /// Remote address of the call.
    #[serde(default)]
    pub peer: String,
    /// Correlation id of the call.
    #[serde(default)]
    pub call_id: String,
    /// SHA-256 (hex) of the previous record's stored bytes.
    pub prev: String,
}

pub use crate::vocab::{Action, Outcome};

/// Failures of the trail itself.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store could not read or write a record.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A thread panicked while holding the chain head.
    #[error("the audit chain lock is poisoned")]
    Poisoned,
    /// A record could not be encoded.
    #[error("audit record encoding: {0}")]
    Encode(String),
    /// A checkpoint could not be signed.
    #[error("signing checkpoint: {0}")]
    Sign(String),
}

/// What to record (sequence and chain fields are added on append).
#[derive(Clone, Debug)]
pub struct Entry {
    /// Who acted.
    pub actor: String,
    /// What happened.
    pub action: Action,
    /// Lease, request or key id.
    pub target: String,
    /// Scopes involved.
    pub scopes: Vec<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why.
    pub reason: String,
    /// Rule.
    pub rule: String,
}

impl Entry {
    /// An `ok` entry.
    pub fn ok(actor: &str, action: Action, target: &str, scopes: &[String], reason: &str) -> Self {
        Self {
            actor: actor.to_owned(),
            action,
            target: target.to_owned(),
            scopes: scopes.to_vec(),
            outcome: Outcome::Ok,
            reason: reason.to_owned(),
            rule: String::new(),
        }
    }

    /// With the deciding rule.
    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = rule.into();
        self
    }

    /// With another outcome.
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}

/// A record's fields but its place in the chain (`seq`, `prev`), in
/// canonical order: the middle of its stored bytes.
#[derive(Serialize)]
struct Body<'a> {
    at: Millis,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    scopes: &'a [String],
    outcome: &'a str,
    reason: &'a str,
    rule: &'a str,
    peer: &'a str,
    call_id: &'a str,
}

/// `{"at":…,"call_id":"…"}` of `rec` (see [`crate::chain::chained`]).
fn body_json(rec: &AuditRecord) -> Result<Vec<u8>, AuditError> {
    serde_json::to_vec(&Body {
        at: rec.at,
        actor: &rec.actor,
        action: &rec.action,
        target: &rec.target,
        scopes: &rec.scopes,
        outcome: &rec.outcome,
        reason: &rec.reason,
        rule: &rec.rule,
        peer: &rec.peer,
        call_id: &rec.call_id,
    })
    .map_err(|e| AuditError::Encode(e.to_string()))
}

/// How far live followers have been handed the trail.
struct Head {
    next: u64,
}

/// The trail's live tail and its upkeep. Records are written by the store
/// inside each operation's batch ([`AuditLog::bodies`] encodes them);
/// followers are fed by reading back what was committed, by any broker
/// ([`AuditLog::poll_tail`]), in sequence order.
pub struct AuditLog {
    head: tokio::sync::Mutex<Head>,
    tail: broadcast::Sender<(AuditRecord, Vec<u8>)>,
}

impl AuditLog {
    /// Retention: the newest checkpoint whose record is older than
    /// `before` — the point the trail may be compacted to (records at or
    /// before it go, in the batch that records the compaction).
    pub async fn compaction_point(
        store: &dyn Store,
        keys: &KeySet,
        before: Millis,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut point = None;
        for (seq, jws) in store.checkpoints(0, u64::MAX).await? {
            let Some(c) = check_signature(keys, &String::from_utf8_lossy(&jws)) else {
                continue;
            };
            let old = store
                .audit_after(Some(seq.saturating_sub(1)), 1)
                .await?
                .first()
                .and_then(|(_, b)| serde_json::from_slice::<AuditRecord>(b).ok())
                .is_some_and(|r| r.seq == c.seq && r.at < before);
            if old {
                point = Some((seq, jws));
            }
        }
        Ok(point)
    }

    /// Follow the trail stored in `store` from its end.
    pub async fn open(store: &dyn Store) -> Result<Self, StoreError> {
        let next = store.audit_last().await?.map_or(1, |(seq, _)| seq + 1);
        Ok(Self {
            head: tokio::sync::Mutex::new(Head { next }),
            tail: broadcast::channel(4096).0,
        })
    }

    /// The bodies of `entries` at `now` (their canonical JSON without the
    /// place in the chain), for an operation's batch. The store numbers and
    /// chains them when it applies the batch.
    pub fn bodies(now: Millis, entries: Vec<Entry>) -> Result<Vec<Vec<u8>>, AuditError> {
        let call = current_call();
        entries
            .into_iter()
            .map(|e| {
                body_json(&AuditRecord {
                    seq: 0,
                    at: now,
                    actor: e.actor,
                    action: e.action.as_str().to_owned(),
                    target: e.target,
                    scopes: e.scopes,
                    outcome: e.outcome.as_str().to_owned(),
                    reason: e.reason,
                    rule: e.rule,
                    peer: call.peer.clone(),
                    call_id: call.call_id.clone(),
                    prev: String::new(),
                })
            })
            .collect()
    }

    /// Does anyone follow the live tail?
    pub fn followed(&self) -> bool {
        self.tail.receiver_count() > 0
    }

    /// Live records.
    pub fn subscribe(&self) -> broadcast::Receiver<(AuditRecord, Vec<u8>)> {
        self.tail.subscribe()
    }

    /// Records committed since the newest checkpoint (by any broker).
    pub async fn since_checkpoint(store: &dyn Store) -> Result<u64, StoreError> {
        let last = store.audit_last().await?.map_or(0, |(seq, _)| seq);
        let signed = store.last_checkpoint().await?.map_or(0, |(seq, _)| seq);
        Ok(last.saturating_sub(signed))
    }

    /// Hand records committed since the last call (by any broker) to live
    /// followers, in order. Returns how many.
    pub async fn poll_tail(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let mut head = self.head.lock().await;
        let mut sent = 0;
        loop {
            let page = store.audit_after(head.next.checked_sub(1), 1024).await?;
            let done = page.len() < 1024;
            for (seq, bytes) in page {
                head.next = seq + 1;
                if let Ok(rec) = serde_json::from_slice::<AuditRecord>(&bytes) {
                    let _ = self.tail.send((rec, bytes));
                    sent += 1;
                }
            }
            if done {
                return Ok(sent);
            }
        }
    }

    /// Sign a checkpoint over the newest record, if any since the last:
    /// its sequence number and JWS, for the caller to store (in a batch)
    /// and hand to an external witness.
    pub async fn checkpoint(
        store: &dyn Store,
        keys: &KeySet,
        issuer: &str,
        now: Millis,
    ) -> Result<Option<(u64, String)>, AuditError> {
        // Any broker may have appended or signed since: the store says
        // where the chain and the checkpoints stand.
        let Some((seq, bytes)) = store.audit_last().await? else {
            return Ok(None);
        };
        let last = store.last_checkpoint().await?;
        if last.as_ref().is_some_and(|(at, _)| *at >= seq) {
            return Ok(None);
        }
        let prev = last.map_or_else(|| GENESIS.to_owned(), |(_, jws)| sha256_hex(&jws));
        let claims = Checkpoint {
            iss: issuer.to_owned(),
            seq,
            hash: sha256_hex(&bytes),
            at: now,
            prev,
        };
        let mut header = jsonwebtoken::Header::new(keys.active.alg);
        header.kid = Some(keys.active.kid.clone());
        header.typ = Some("audit-checkpoint+jwt".into());
        let jws = jsonwebtoken::encode(&header, &claims, &keys.active.encoding)
            .map_err(|e| AuditError::Sign(e.to_string()))?;
        Ok(Some((seq, jws)))
    }
}

/// The JWS an `audit.compacted` record carries in its `rule` field: the
/// broker's signature over the point the trail was compacted to and the
/// checkpoint that anchors what remains, so a compaction record appended by
/// someone who can write the store but holds no signing key is found.
pub fn sign_compaction(
    keys: &KeySet,
    issuer: &str,
    point: u64,
    anchor_jws: &[u8],
    now: Millis,
) -> Result<String, AuditError> {
    let claims = Compaction {
        iss: issuer.to_owned(),
        point,
        anchor: sha256_hex(anchor_jws),
        at: now,
    };
    let mut header = jsonwebtoken::Header::new(keys.active.alg);
    header.kid = Some(keys.active.kid.clone());
    header.typ = Some(COMPACTION_TYP.into());
    jsonwebtoken::encode(&header, &claims, &keys.active.encoding)
        .map_err(|e| AuditError::Sign(e.to_string()))
}

/// The `typ` of a compaction's JWS.
const COMPACTION_TYP: &str = "audit-compaction+jwt";

/// What a compaction's JWS signs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Compaction {
    iss: String,
    /// Records 1..=point were removed.
    point: u64,
    /// SHA-256 (hex) of the JWS of the checkpoint at `point`.
    anchor: String,
    at: Millis,
}

/// The anchor a compaction record's `rule` names, if it is a JWS of this
/// broker's keys (not one withdrawn in an emergency) over `point`.
fn compaction_proof(keys: &KeySet, jws: &str, point: u64) -> Option<String> {
    let header = jsonwebtoken::decode_header(jws).ok()?;
    if header.typ.as_deref() != Some(COMPACTION_TYP) {
        return None;
    }
    let kid = header.kid?;
    if keys.withdrawn.contains(&kid) {
        return None;
    }
    let (alg, key) = keys.history.get(&kid)?;
    if header.alg != *alg {
        return None;
    }
    let mut v = jsonwebtoken::Validation::new(*alg);
    v.validate_exp = false;
    v.required_spec_claims.clear();
    v.validate_aud = false;
    let c = jsonwebtoken::decode::<Compaction>(jws, key, &v)
        .ok()?
        .claims;
    (c.point == point).then_some(c.anchor)
}

/// What a checkpoint signs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// Broker issuer.
    pub iss: String,
    /// Record covered.
    pub seq: u64,
    /// SHA-256 (hex) of that record's stored bytes.
    pub hash: String,
    /// When signed.
    pub at: Millis,
    /// SHA-256 (hex) of the previous checkpoint's JWS ([`GENESIS`] for the
    /// first; empty in checkpoints written before checkpoints chained).
    #[serde(default)]
    pub prev: String,
}

/// Result of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Report {
    /// Records walked.
    pub records: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// First problem: sequence number and description.
    pub problem: Option<(u64, String)>,
    /// What was found that is not tampering but limits what was proved
    /// (checkpoints signed by a key withdrawn in an emergency).
    pub notes: Vec<String>,
    /// First and last sequence number of the records walked (0 when none).
    pub first: u64,
    /// See `first`.
    pub last: u64,
    /// The newest record a valid checkpoint covers (0: none): records up to
    /// it cannot be edited, removed or reordered undetected; the ones after
    /// it are chained but unsigned, so dropping them leaves no trace here.
    pub covered: u64,
    /// The latest point the walked trail says, under the broker's
    /// signature, it was compacted to (its newest signed `audit.compacted`
    /// record): the records missing from its start and the checkpoints
    /// missing before its oldest end exactly there.
    pub compacted_to: Option<u64>,
    /// The checkpoint that compaction names (SHA-256 of its JWS).
    compaction_anchor: Option<String>,
    /// The latest point an `audit.compacted` record without a valid
    /// signature names (written by a build before signed compactions, or
    /// forged): accepted only on the operator's word.
    pub unsigned_compaction: Option<u64>,
    /// When record 1 was written (`None`: the trail does not start there).
    genesis_at: Option<Millis>,
    /// The oldest checkpoint, when it names the genesis but was signed
    /// more than [`FIRST_CHECKPOINT_WITHIN_MS`] after record 1: its
    /// sequence number and how much later. A broker signs one at start, so
    /// such a trail lost the checkpoints that witnessed its first records
    /// (a broker re-signs a trail it finds with none).
    pub late_first_checkpoint: Option<(u64, Millis)>,
}

/// How long after record 1 the first checkpoint of a trail may be signed
/// and still be taken as its witness from the start. A broker signs one
/// at start, within a second of its first records; builds before that
/// signed the first within 30 s.
pub const FIRST_CHECKPOINT_WITHIN_MS: Millis = 5 * 60 * 1000;

impl Report {
    /// The problem to report, the walk's own or — when `strict` — records
    /// after the newest checkpoint, or — unless `uncovered_ok` — records
    /// no checkpoint covers at all.
    pub fn judged(&self, strict: bool, uncovered_ok: bool) -> Option<(u64, String)> {
        if self.problem.is_some() {
            return self.problem.clone();
        }
        if let Some((seq, lag)) = self.late_first_checkpoint.filter(|_| !uncovered_ok) {
            return Some((
                1,
                format!(
                    "the first checkpoint (at {seq}) was signed {} after record 1, and none before it: no checkpoint witnessed records 1..{seq} as they were written (the checkpoints that did were removed, and a broker re-signed the trail as it found it; pass --allow-uncovered to accept the chain alone)",
                    humantime::format_duration(std::time::Duration::from_secs(lag / 1000))
                ),
            ));
        }
        if self.records > 0 && self.covered < self.first && !uncovered_ok {
            return Some((
                self.first,
                format!(
                    "no signed checkpoint covers records {}..{}: their chain proves nothing against someone who can rewrite the whole trail (the broker signs one at start, then every 30 s or 1,000 records; pass --allow-uncovered to accept the chain alone)",
                    self.first, self.last
                ),
            ));
        }
        if strict && self.unsigned_tail() > 0 {
            return Some((
                self.covered.max(self.first.saturating_sub(1)) + 1,
                format!(
                    "strict: {} records after the newest checkpoint are not signed yet",
                    self.unsigned_tail()
                ),
            ));
        }
        None
    }

    /// Records after the newest checkpoint: chained, not signed.
    pub fn unsigned_tail(&self) -> u64 {
        self.last
            .saturating_sub(self.covered.max(self.first.saturating_sub(1)))
    }

    /// Exactly what the walk proved, in one sentence.
    pub fn proved(&self) -> String {
        if self.records == 0 {
            return "no records".into();
        }
        let covered = if self.covered >= self.first {
            format!("checkpoints cover {}..{}", self.first, self.covered)
        } else {
            "no checkpoint covers them".into()
        };
        let tail = self.unsigned_tail();
        let plural = if tail == 1 { "" } else { "s" };
        format!(
            "records {}..{} chained, {covered}, {tail} unsigned trailing record{plural}",
            self.first, self.last
        )
    }
}

/// Who a compaction record names as its actor: the broker itself
/// (`engine::SYSTEM_ACTOR`).
const BROKER_ACTOR: &str = "portcullis";

/// The `kid` a checkpoint names.
fn signer(jws: &str) -> Option<String> {
    jsonwebtoken::decode_header(jws).ok()?.kid
}

/// Where the walk starts: record 1 after the genesis hash, or — after
/// retention compaction — the first stored record, hanging from a signed
/// checkpoint over the last removed one.
struct Start {
    seq: u64,
    prev: String,
    /// The anchoring checkpoint's (seq, hash of its record, hash of its
    /// JWS), when compacted.
    anchor: Option<(u64, String, String)>,
}

async fn start(
    store: &dyn Store,
    keys: &KeySet,
) -> Result<Result<Start, (u64, String)>, StoreError> {
    let Some((first, _)) = store.audit_after(None, 1).await?.first().cloned() else {
        return Ok(Ok(Start {
            seq: 1,
            prev: GENESIS.to_owned(),
            anchor: None,
        }));
    };
    if first <= 1 {
        return Ok(Ok(Start {
            seq: 1,
            prev: GENESIS.to_owned(),
            anchor: None,
        }));
    }
    let anchor = store
        .checkpoints(0, u64::MAX)
        .await?
        .into_iter()
        .find(|(seq, _)| *seq + 1 == first)
        .and_then(|(_, jws)| {
            check_signature(keys, &String::from_utf8_lossy(&jws)).map(|c| (c, sha256_hex(&jws)))
        });
    Ok(match anchor {
        Some((c, jws_hash)) => Ok(Start {
            seq: first,
            prev: c.hash.clone(),
            anchor: Some((c.seq, c.hash, jws_hash)),
        }),
        None => Err((
            1,
            format!(
                "records 1..{} are missing and no signed checkpoint anchors record {first}",
                first - 1
            ),
        )),
    })
}

/// Walk the chain from `start`: every record present, in order, decoding,
/// and linked to its predecessor. Fills `hashes` (seq -> hash of its bytes)
/// and counts records; returns the first problem.
async fn walk(
    store: &dyn Store,
    keys: &KeySet,
    start: Start,
    hashes: &mut HashMap<u64, String>,
    report: &mut Report,
) -> Result<Option<(u64, String)>, StoreError> {
    let (mut expected, mut prev_hash) = (start.seq, start.prev);
    if let Some((seq, hash, _)) = start.anchor {
        hashes.insert(seq, hash);
    }
    let mut after = None;
    loop {
        // An embedded store answers at once: let other tasks run between
        // pages of a long walk.
        tokio::task::yield_now().await;
        let page = store.audit_after(after, 4096).await?;
        let Some((last, _)) = page.last() else {
            return Ok(None);
        };
        after = Some(*last);
        for (key, bytes) in page {
            let rec = match linked(key, expected, &bytes, &prev_hash) {
                Ok(rec) => rec,
                Err(problem) => return Ok(Some(problem)),
            };
            // A compaction is the broker's own act, to a point before its
            // record, signed with its key.
            if rec.action == Action::AuditCompacted.as_str()
                && rec.actor == BROKER_ACTOR
                && let Ok(point) = rec.target.parse::<u64>()
                && point < key
            {
                match compaction_proof(keys, &rec.rule, point) {
                    Some(anchor) if report.compacted_to.is_none_or(|p| point >= p) => {
                        report.compacted_to = Some(point);
                        report.compaction_anchor = Some(anchor);
                    }
                    Some(_) => {}
                    None => {
                        report.unsigned_compaction = report.unsigned_compaction.max(Some(point));
                    }
                }
            }
            prev_hash = sha256_hex(&bytes);
            hashes.insert(key, prev_hash.clone());
            report.records += 1;
            if report.first == 0 {
                report.first = key;
            }
            if key == 1 {
                report.genesis_at = Some(rec.at);
            }
            report.last = key;
            expected += 1;
        }
    }
}

/// Record `key` as stored (`bytes`), where `expected` was due after a
/// record hashing to `prev`: decoded, or the problem.
fn linked(key: u64, expected: u64, bytes: &[u8], prev: &str) -> Result<AuditRecord, (u64, String)> {
    if key != expected {
        return Err((
            expected,
            format!("record {expected} is missing (next stored is {key})"),
        ));
    }
    let Ok(rec) = serde_json::from_slice::<AuditRecord>(bytes) else {
        return Err((key, format!("record {key} does not decode")));
    };
    if rec.seq != key {
        return Err((
            key,
            format!("record stored at {key} says it is {}", rec.seq),
        ));
    }
    if rec.prev != prev {
        // This record's link is intact only if its predecessor is: the
        // predecessor was altered (or this record was).
        let bad = key.saturating_sub(1).max(1);
        return Err((
            bad,
            format!("record {bad} does not match the hash recorded by record {key}"),
        ));
    }
    Ok(rec)
}

/// Checkpoint `seq`, naming `prev`, after the stored one hashing to
/// `before` (`None`: it is the oldest stored): the problem, if its link is
/// broken. The oldest anchors the chain: it is the first ever signed (it
/// names the genesis), or the trail's latest compaction is to it (which
/// removed the ones before). Each later one names its predecessor.
fn chain_link(
    seq: u64,
    prev: &str,
    before: Option<&str>,
    report: &Report,
) -> Option<(u64, String)> {
    if prev.is_empty() {
        return None;
    }
    match before {
        None if prev != GENESIS && report.compacted_to != Some(seq) => Some((
            seq,
            format!(
                "the checkpoints before {seq} are missing, and the trail records no compaction to {seq}: they were removed, not retained away"
            ),
        )),
        Some(b) if prev != b => Some((
            seq,
            format!(
                "checkpoint at {seq} does not follow the checkpoint before it: one was removed or replaced"
            ),
        )),
        _ => None,
    }
}

/// Check every checkpoint's signature against the walked hashes.
async fn check_checkpoints(
    store: &dyn Store,
    keys: &KeySet,
    hashes: &HashMap<u64, String>,
    report: &mut Report,
) -> Result<Vec<(u64, String)>, StoreError> {
    let mut problems = Vec::new();
    let mut before: Option<String> = None;
    for (seq, jws) in store.checkpoints(0, u64::MAX).await? {
        let text = String::from_utf8_lossy(&jws).into_owned();
        let Some(claims) = check_signature(keys, &text) else {
            problems.push((seq, format!("checkpoint at {seq} has an invalid signature")));
            continue;
        };
        let prior = before.replace(sha256_hex(&jws));
        if prior.is_none()
            && claims.prev == GENESIS
            && let Some(t1) = report.genesis_at
            && claims.at.saturating_sub(t1) > FIRST_CHECKPOINT_WITHIN_MS
        {
            report.late_first_checkpoint = Some((seq, claims.at - t1));
        }
        problems.extend(chain_link(seq, &claims.prev, prior.as_deref(), report));
        if let Some(kid) = signer(&text).filter(|k| keys.withdrawn.contains(k)) {
            report.notes.push(format!(
                "checkpoint at {seq} was signed by key {kid}, withdrawn in an emergency: it proves nothing"
            ));
            continue;
        }
        match hashes.get(&seq) {
            Some(h) if *h == claims.hash && claims.seq == seq => {
                report.checkpoints += 1;
                report.covered = report.covered.max(seq);
            }
            Some(_) => problems.push((
                seq,
                format!("record {seq} does not match its signed checkpoint"),
            )),
            None => problems.push((
                seq,
                format!("record {seq} is covered by a checkpoint but is missing or unreachable"),
            )),
        }
    }
    Ok(problems)
}

/// Walk the whole chain and every checkpoint.
pub async fn verify(store: &dyn Store, keys: &KeySet) -> Result<Report, StoreError> {
    verify_witnessed(store, keys, &[], None).await
}

/// [`verify`], and check that every checkpoint an external witness holds
/// (`witnessed`, JWS strings) is still matched by the store: a store
/// truncated or rolled back after those checkpoints fails here, although it
/// is consistent in itself.
///
/// `accept_unsigned`: a compaction to this point whose record carries no
/// valid signature is accepted (with a note) — for trails compacted by a
/// build before signed compactions, on the operator's word.
pub async fn verify_witnessed(
    store: &dyn Store,
    keys: &KeySet,
    witnessed: &[String],
    accept_unsigned: Option<u64>,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let start = match start(store, keys).await? {
        Ok(s) => s,
        Err(problem) => {
            report.problem = Some(problem);
            return Ok(report);
        }
    };
    let mut hashes = HashMap::new();
    let first = start.seq;
    let anchor = start.anchor.as_ref().map(|(_, _, jws)| jws.clone());
    let mut problems: Vec<(u64, String)> = walk(store, keys, start, &mut hashes, &mut report)
        .await?
        .into_iter()
        .collect();
    // A trail that does not start at record 1 was compacted, and says so in
    // the signed record of its latest compaction (written with the
    // deletion); without it the missing records were removed. (Only a
    // trail walked whole is judged so: a break in it is the problem to
    // report.)
    if first > 1 && problems.is_empty() {
        problems.extend(compaction_problem(
            &mut report,
            first - 1,
            anchor,
            accept_unsigned,
        ));
    }
    problems.extend(check_checkpoints(store, keys, &hashes, &mut report).await?);
    problems.extend(check_witnessed(keys, witnessed, &hashes));
    // The earliest problem is the one to look at first.
    report.problem = problems.into_iter().min_by_key(|(s, _)| *s);
    Ok(report)
}

/// Records 1..=`point` are missing: the problem, unless the trail's latest
/// signed compaction is to `point` and names the checkpoint that anchors
/// what remains (`anchor`), or the operator accepted an unsigned one there.
fn compaction_problem(
    report: &mut Report,
    point: u64,
    anchor: Option<String>,
    accept_unsigned: Option<u64>,
) -> Option<(u64, String)> {
    if report.compacted_to == Some(point) {
        return (report.compaction_anchor != anchor).then(|| {
            (
                point,
                format!(
                    "the compaction to {point} names another checkpoint than the one that anchors the trail: the checkpoint was replaced"
                ),
            )
        });
    }
    if report.unsigned_compaction == Some(point) {
        if accept_unsigned == Some(point) {
            report.compacted_to = Some(point);
            report.notes.push(format!(
                "records 1..{point} were compacted by a record that carries no signature (a build before signed compactions): accepted on the operator's word"
            ));
            return None;
        }
        return Some((
            point,
            format!(
                "records 1..{point} are missing, and the trail's record of a compaction to {point} is not signed: a broker of an older build wrote it, or someone who could write the store did (if your broker compacted it, pass --accept-unsigned-compaction {point})"
            ),
        ));
    }
    Some((
        point,
        format!(
            "records 1..{point} are missing, and the trail records no compaction to {point}: they were removed, not retained away"
        ),
    ))
}

/// Every witnessed checkpoint must verify and match the record the store
/// holds at its sequence number.
fn check_witnessed(
    keys: &KeySet,
    witnessed: &[String],
    hashes: &HashMap<u64, String>,
) -> Vec<(u64, String)> {
    let mut problems = Vec::new();
    for jws in witnessed {
        let Some(c) = check_signature(keys, jws.trim()) else {
            problems.push((0, "a witnessed checkpoint does not verify".to_owned()));
            continue;
        };
        if hashes.get(&c.seq) != Some(&c.hash) {
            problems.push((
                c.seq,
                format!(
                    "the witness holds a checkpoint over record {} that the store no longer matches: the trail was truncated or rewritten",
                    c.seq
                ),
            ));
        }
    }
    problems
}

/// The checkpoint `jws` carries, if its signature verifies under a key that
/// ever signed for this broker — published or not, so removing a key never
/// breaks the trail.
fn check_signature(keys: &KeySet, jws: &str) -> Option<Checkpoint> {
    let header = jsonwebtoken::decode_header(jws).ok()?;
    let (alg, key) = keys.history.get(header.kid.as_deref()?)?;
    if header.alg != *alg {
        return None;
    }
    let mut v = jsonwebtoken::Validation::new(*alg);
    v.validate_exp = false;
    v.required_spec_claims.clear();
    v.validate_aud = false;
    jsonwebtoken::decode::<Checkpoint>(jws, key, &v)
        .ok()
        .map(|d| d.claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::chained;
    #[allow(unused_imports)]
    use crate::store::conformance::TestWrites as _;

    #[test]
    fn assembled_bytes_are_exactly_the_records_json() {
        let tricky = [
            "",
            "plain",
            "quote \" back\\slash",
            "tab\t nl\n nul\0",
            "ünï ✓ \u{7f}",
        ];
        for (i, s) in tricky.iter().enumerate() {
            let rec = AuditRecord {
                seq: u64::MAX - i as u64,
                at: 1_700_000_000_000 + i as u64,
                actor: format!("spiffe://t/{s}"),
                action: "token.granted".into(),
                target: (*s).to_owned(),
                scopes: vec![(*s).to_owned(), "b".into()],
                outcome: "ok".into(),
                reason: (*s).to_owned(),
                rule: (*s).to_owned(),
                peer: "127.0.0.1:1".into(),
                call_id: (*s).to_owned(),
                prev: sha256_hex(s.as_bytes()),
            };
            let body = body_json(&rec).unwrap();
            assert_eq!(
                chained(rec.seq, &body, &rec.prev),
                serde_json::to_vec(&rec).unwrap(),
                "{s:?}"
            );
        }
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

//! The unit of the store contract: one operation's changes as one
//! [`Batch`], applied atomically by [`Store::apply`](super::Store::apply).
//!
//! A batch holds everything one operation changes — lease and request
//! creates and compare-and-swaps, the idempotency claim, key-ring and
//! metadata writes, a checkpoint — and the bodies of its audit records. A
//! backend applies it all or nothing, and chains the audit records after
//! its stored head inside the same apply, so no state is ever visible (or
//! recovered after a crash) without its record, and no record without its
//! state. A lost compare-and-swap, a taken idempotency key, a stale leader
//! or a withdrawn signing key is a typed [`Lost`], not an error: nothing was
//! written and the caller decides (read again, replay, refuse).
//!
//! Applied is not durable: durability is the shared sync that follows
//! (group commit), as before. Nothing that depends on a batch leaves the
//! broker until that sync has covered it.
//!
//! The embedded backends apply a batch through [`apply_to`] over their own
//! [`Tables`]; PostgreSQL runs the same checks as SQL in one transaction.

use super::StoreError;

use crate::chain::{chained, sha256_hex};
use crate::model::{Idempotency, KeyRecord, KeyState, Lease, TokenRequest};

/// One change inside a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Insert a new lease (and its indexes); with `idem`, claim that key in
    /// the same apply, or lose with [`Lost::Idempotency`].
    CreateLease {
        /// The lease.
        lease: Lease,
        /// The key to claim.
        idem: Option<Idempotency>,
    },
    /// Replace lease `old` by `new` if the stored lease still equals `old`.
    SwapLease {
        /// What the operation read.
        old: Lease,
        /// Its replacement.
        new: Lease,
    },
    /// Insert a new request (and its indexes), claiming `idem` likewise.
    CreateRequest {
        /// The request.
        req: TokenRequest,
        /// The key to claim.
        idem: Option<Idempotency>,
    },
    /// Replace request `old` by `new` if the stored one still equals `old`.
    SwapRequest {
        /// What the operation read.
        old: TokenRequest,
        /// Its replacement.
        new: TokenRequest,
    },
    /// Insert or replace a signing key.
    PutKey(KeyRecord),
    /// Remove a signing key record.
    DeleteKey(String),
    /// Set a metadata value.
    PutMeta(String, Vec<u8>),
    /// Store a signed audit checkpoint over record `seq`.
    PutCheckpoint(u64, Vec<u8>),
    /// Retention: delete an ended lease (and its index entries) if the
    /// stored lease still equals this one.
    DeleteLease(Lease),
    /// Retention: delete an ended request if the stored one still equals
    /// this one.
    DeleteRequest(TokenRequest),
    /// Retention: delete audit records `<= seq` and checkpoints `< seq`
    /// (the checkpoint at `seq` stays as the anchor of what remains; the
    /// head, and the batch's own records after it, are not affected).
    CompactAudit(u64),
    /// Store a row as it is, without the checks of a create (moving a
    /// store into an empty one); an existing lease or request loses.
    CopyRow(super::Row),
    /// Store an audit record as it is, chained already (moving a store):
    /// the head moves to it, and the batch's own records chain after it.
    CopyAudit(u64, Vec<u8>),
    /// Tests only: the backend fails right here, in the middle of the
    /// batch (what a full disk or a dropped connection does).
    #[cfg(test)]
    Fail,
}

/// Who may write a leader-only batch: the holder of `role` in term
/// `generation`. A shared store refuses the batch once another term began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The role (`upkeep`, `keys`, ...).
    pub role: String,
    /// This broker's holder name.
    pub holder: String,
    /// The term it was granted.
    pub generation: u64,
}

/// One operation's changes and records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Changes, applied in order (a later write sees the earlier ones).
    pub writes: Vec<Write>,
    /// Audit record bodies (`audit::body_json`), chained in order after the
    /// stored head by the store.
    pub audit: Vec<Vec<u8>>,
    /// For leader-only work on a shared store.
    pub fence: Option<Fence>,
}

impl Batch {
    /// Nothing to write and nothing to record.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.audit.is_empty()
    }
}

/// Why a batch was not applied (nothing of it was written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// The idempotency key was taken first; this is its entry.
    Idempotency(Idempotency),
    /// Lease `id` changed since it was read (or a new lease's id exists).
    Lease(String),
    /// Request `id` changed since it was read (or a new one's id exists).
    Request(String),
    /// The batch's fence is stale: another broker leads now.
    Fenced,
    /// A new lease names signing key `kid`, which no longer signs.
    KeyInactive(String),
}

/// What [`Store::apply`](super::Store::apply) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Everything is written and visible; these records were chained
    /// (sequence number, stored bytes), in order.
    Done(Vec<(u64, Vec<u8>)>),
    /// Nothing was written.
    Lost(Lost),
}

/// Where an embedded store's trail ends: the next record's number and the
/// hash it chains to. Kept in memory beside the store, under the lock that
/// serialises applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// The last record's sequence number (0: none yet).
    pub seq: u64,
    /// SHA-256 (hex) of the last record's stored bytes.
    pub hash: String,
}

impl ChainHead {
    /// The head after the stored `last` record (genesis when none).
    pub fn after(last: Option<&(u64, Vec<u8>)>) -> Self {
        match last {
            Some((seq, bytes)) => Self {
                seq: *seq,
                hash: sha256_hex(bytes),
            },
            None => Self {
                seq: 0,
                hash: crate::chain::GENESIS.to_owned(),
            },
        }
    }

    /// Chain `bodies` after this head: their stored form, and the new head.
    pub fn chain(&self, bodies: &[Vec<u8>]) -> (Vec<(u64, Vec<u8>)>, Self) {
        let mut head = self.clone();
        let records = bodies
            .iter()
            .map(|body| {
                head.seq += 1;
                let bytes = chained(head.seq, body, &head.hash);
                head.hash = sha256_hex(&bytes);
                (head.seq, bytes)
            })
            .collect();
        (records, head)
    }
}

/// The tables an embedded backend applies a batch to, inside whatever makes
/// the apply atomic there (sled: one multi-tree transaction; memory: a
/// staged copy under its one lock). Writers keep their own indexes.
pub(crate) trait Tables {
    /// Lease `id`.
    fn lease(&mut self, id: &str) -> Result<Option<Lease>, StoreError>;
    /// Store `new` (replacing `old`, whose index entries go).
    fn put_lease(&mut self, old: Option<&Lease>, new: &Lease) -> Result<(), StoreError>;
    /// Request `id`.
    fn request(&mut self, id: &str) -> Result<Option<TokenRequest>, StoreError>;
    /// Store `new` (replacing `old`, whose index entries go).
    fn put_request(
        &mut self,
        old: Option<&TokenRequest>,
        new: &TokenRequest,
    ) -> Result<(), StoreError>;
    /// The entry under (caller, key).
    fn idempotency(&mut self, caller: &str, key: &str) -> Result<Option<Idempotency>, StoreError>;
    /// Store an idempotency entry.
    fn put_idempotency(&mut self, entry: &Idempotency) -> Result<(), StoreError>;
    /// Signing key `kid`.
    fn key(&mut self, kid: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Insert or replace a signing key.
    fn put_key(&mut self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Remove a signing key.
    fn delete_key(&mut self, kid: &str) -> Result<(), StoreError>;
    /// Set a metadata value.
    fn put_meta(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Store a checkpoint.
    fn put_checkpoint(&mut self, seq: u64, jws: &[u8]) -> Result<(), StoreError>;
    /// Store a chained audit record.
    fn put_audit(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;
    /// Delete a lease and its index entries.
    fn delete_lease(&mut self, lease: &Lease) -> Result<(), StoreError>;
    /// Delete a request and its index entries.
    fn delete_request(&mut self, req: &TokenRequest) -> Result<(), StoreError>;
    /// Delete audit records `<= seq` and checkpoints `< seq`.
    fn compact_audit(&mut self, seq: u64) -> Result<(), StoreError>;
}

/// Does `kid` still sign (or at least verify: a key retired a moment ago
/// signed tokens that are still good)? A key withdrawn in an emergency, or
/// removed, or never stored does not.
pub(crate) fn key_signs(key: Option<&KeyRecord>) -> bool {
    key.is_some_and(|k| matches!(k.state, KeyState::Active | KeyState::Retired))
}

/// Does the swap `old` → `new` hand out a new token (a renewal)? Then its
/// signing key must still sign, as for a new lease.
pub(crate) fn mints(old: &Lease, new: &Lease) -> bool {
    new.state == crate::model::LeaseState::Active
        && (new.kid != old.kid || new.token_issued_at != old.token_issued_at)
}

/// Check a create's idempotency claim: `Some(lost)` when the key is taken.
fn claim(t: &mut impl Tables, idem: Option<&Idempotency>) -> Result<Option<Lost>, StoreError> {
    let Some(i) = idem else { return Ok(None) };
    if let Some(existing) = t.idempotency(&i.caller, &i.key)? {
        return Ok(Some(Lost::Idempotency(existing)));
    }
    t.put_idempotency(i)?;
    Ok(None)
}

/// Apply one write; `Some(lost)` when it cannot be (the caller then
/// discards everything written so far).
fn write(t: &mut impl Tables, w: &Write) -> Result<Option<Lost>, StoreError> {
    match w {
        Write::CreateLease { lease, idem } => {
            if let Some(lost) = claim(t, idem.as_ref())? {
                return Ok(Some(lost));
            }
            if t.lease(&lease.id)?.is_some() {
                return Ok(Some(Lost::Lease(lease.id.clone())));
            }
            if lease.state == crate::model::LeaseState::Active
                && !key_signs(t.key(&lease.kid)?.as_ref())
            {
                return Ok(Some(Lost::KeyInactive(lease.kid.clone())));
            }
            t.put_lease(None, lease)?;
        }
        Write::SwapLease { old, new } => {
            if t.lease(&old.id)?.as_ref() != Some(old) {
                return Ok(Some(Lost::Lease(old.id.clone())));
            }
            if mints(old, new) && !key_signs(t.key(&new.kid)?.as_ref()) {
                return Ok(Some(Lost::KeyInactive(new.kid.clone())));
            }
            t.put_lease(Some(old), new)?;
        }
        Write::CreateRequest { req, idem } => {
            if let Some(lost) = claim(t, idem.as_ref())? {
                return Ok(Some(lost));
            }
            if t.request(&req.id)?.is_some() {
                return Ok(Some(Lost::Request(req.id.clone())));
            }
            t.put_request(None, req)?;
        }
        Write::SwapRequest { old, new } => {
            if t.request(&old.id)?.as_ref() != Some(old) {
                return Ok(Some(Lost::Request(old.id.clone())));
            }
            t.put_request(Some(old), new)?;
        }
        Write::PutKey(k) => t.put_key(k)?,
        Write::DeleteKey(kid) => t.delete_key(kid)?,
        Write::PutMeta(name, value) => t.put_meta(name, value)?,
        Write::PutCheckpoint(seq, jws) => t.put_checkpoint(*seq, jws)?,
        Write::DeleteLease(_) | Write::DeleteRequest(_) | Write::CompactAudit(_) => {
            return retain(t, w);
        }
        Write::CopyRow(row) => return copy_row(t, row),
        // Moves the head: see `apply_to`.
        Write::CopyAudit(seq, bytes) => t.put_audit(*seq, bytes)?,
        #[cfg(test)]
        Write::Fail => return Err(StoreError::Unavailable("injected failure".into())),
    }
    Ok(None)
}

/// A retention write: an ended record deleted if unchanged, or the trail
/// compacted.
fn retain(t: &mut impl Tables, w: &Write) -> Result<Option<Lost>, StoreError> {
    match w {
        Write::DeleteLease(l) => {
            if t.lease(&l.id)?.as_ref() != Some(l) {
                return Ok(Some(Lost::Lease(l.id.clone())));
            }
            t.delete_lease(l)?;
        }
        Write::DeleteRequest(r) => {
            if t.request(&r.id)?.as_ref() != Some(r) {
                return Ok(Some(Lost::Request(r.id.clone())));
            }
            t.delete_request(r)?;
        }
        Write::CompactAudit(seq) => t.compact_audit(*seq)?,
        _ => {}
    }
    Ok(None)
}

fn copy_row(t: &mut impl Tables, row: &super::Row) -> Result<Option<Lost>, StoreError> {
    use super::Row;
    match row {
        Row::Lease(l) => {
            if t.lease(&l.id)?.is_some() {
                return Ok(Some(Lost::Lease(l.id.clone())));
            }
            t.put_lease(None, l)?;
        }
        Row::Request(r) => {
            if t.request(&r.id)?.is_some() {
                return Ok(Some(Lost::Request(r.id.clone())));
            }
            t.put_request(None, r)?;
        }
        Row::Idempotency(i) => t.put_idempotency(i)?,
        Row::Meta(name, value) => t.put_meta(name, value)?,
    }
    Ok(None)
}

/// Apply `batch` to `t` after `head`: every write in order, then the
/// records chained after the head. On [`Applied::Lost`] the caller must
/// discard what was written to `t`; on `Done` it commits `t` and moves its
/// head to the returned one. A single-broker store has no fence to check.
pub(crate) fn apply_to(
    t: &mut impl Tables,
    head: &ChainHead,
    batch: &Batch,
) -> Result<(Applied, ChainHead), StoreError> {
    let mut head = head.clone();
    for w in &batch.writes {
        if let Some(lost) = write(t, w)? {
            return Ok((Applied::Lost(lost), head));
        }
        if let Write::CopyAudit(seq, bytes) = w
            && *seq > head.seq
        {
            head = ChainHead::after(Some(&(*seq, bytes.clone())));
        }
    }
    let (records, next) = head.chain(&batch.audit);
    for (seq, bytes) in &records {
        t.put_audit(*seq, bytes)?;
    }
    Ok((Applied::Done(records), next))
}

/// A batch handed to [`Store::apply`](super::Store::apply), on its way:
/// resolves once the store has applied it (or refused it). The caller does
/// not block meanwhile; awaiting it never holds a runtime thread.
pub type Applying = tokio::sync::oneshot::Receiver<Result<Applied, StoreError>>;

/// An [`Applying`] that is already decided (a store that applies in the
/// caller's thread).
pub fn decided(outcome: Result<Applied, StoreError>) -> Applying {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(outcome);
    rx
}

/// The outcome of a batch, awaited.
pub async fn applied(pending: Applying) -> Result<Applied, StoreError> {
    pending.await.map_err(|_| stopped())?
}

/// The writer dropped the batch's reply: it ends only with the store, so
/// the broker is stopping.
fn stopped() -> StoreError {
    StoreError::Stopping
}

/// Apply `w` alone, with no record: for what a store holds before any
/// operation can run (the KEK check value, the first signing key, the
/// issuer), and for moving a store. A write that loses is an error.
pub async fn write_one<S: super::Store + ?Sized>(store: &S, w: Write) -> Result<(), StoreError> {
    match applied(store.apply(Batch {
        writes: vec![w],
        ..Batch::default()
    }))
    .await?
    {
        Applied::Done(_) => Ok(()),
        Applied::Lost(lost) => Err(StoreError::Contended(format!(
            "a single write was refused: {lost:?}"
        ))),
    }
}

/// A write's effect on the gauges: (active leases, open requests).
pub fn gauge_delta(w: &Write) -> (i64, i64) {
    let active = |l: &Lease| i64::from(l.state == crate::model::LeaseState::Active);
    let open = |r: &TokenRequest| i64::from(r.is_open());
    match w {
        Write::CreateLease { lease, .. } => (active(lease), 0),
        Write::SwapLease { old, new } => (active(new) - active(old), 0),
        Write::CreateRequest { req, .. } => (0, open(req)),
        Write::SwapRequest { old, new } => (0, open(new) - open(old)),
        Write::DeleteLease(l) => (-active(l), 0),
        Write::DeleteRequest(r) => (0, -open(r)),
        _ => (0, 0),
    }
}

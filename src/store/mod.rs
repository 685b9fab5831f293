//! `store` remembers: leases, parked requests, signing keys and small metadata.
//!
//! The [`Store`] trait is the storage contract. It has no sled types in it so
//! that another backend (PostgreSQL for HA) can pass the same conformance
//! suite (`conformance` tests at the bottom of this module).
//!
//! # Durability contract
//! An operation's writes and records are one [`Batch`], applied all or
//! nothing by [`Store::apply`]; they are visible once applied but only
//! *durable* once a later [`Store::sync`] has returned `Ok`. Nothing that
//! depends on a batch may leave the broker (a token, an acknowledgement)
//! before that. [`commit::GroupCommit`] batches the `sync` calls of many
//! concurrent writers into one flush + fsync.
//!
//! Every method is async and none has a default: a backend says what it
//! does, and a test decorator (`conformance::Decorate`) passes through
//! what it does not change.
//!
//! # Layout (sled trees; a SQL backend maps each to a table)
//! | tree | key | value |
//! |---|---|---|
//! | `leases` | lease id | [`Lease`]: format byte ‖ record (see `record`) |
//! | `lease_expiry` | big-endian `expires_at` ms ‖ lease id | empty; only ACTIVE leases |
//! | `leases_by_subject` | subject ‖ 0x00 ‖ lease id | empty |
//! | `lease_children` | parent lease id ‖ 0x00 ‖ lease id | empty; delegated leases only |
//! | `requests` | request id | [`TokenRequest`] |
//! | `request_expiry` | big-endian deadline ms ‖ request id | empty; only non-terminal requests |
//! | `requests_open` | request id | empty; requests needing a decision, claim or review |
//! | `idempotency` | caller ‖ 0x00 ‖ client request id | [`Idempotency`] |
//! | `audit` | big-endian seq | canonical JSON of an audit record (hash chain) |
//! | `audit_checkpoints` | big-endian seq | JWS signed over that record's hash |
//! | `keys` | kid | [`KeyRecord`] (private part sealed) |
//! | `meta` | name | bytes (schema version, KEK check, schedules) |
//!
//! Records are JSON with `#[serde(default)]` on every field added after v1, so
//! older records keep decoding as the schema grows.

pub mod batch;
pub mod commit;
pub mod copy;
mod journal;
pub mod mem;
pub mod postgres;
mod record;
pub mod sled_store;

use serde::Serialize;

pub use crate::clock::Millis;

/// Current layout version, written to `meta/schema_version` on first open.
/// Version 2 stores leases in the compact encoding of [`record`]; version 3
/// adds delegation to that record and the `lease_children` index; version 4
/// writes every batch through sled's batch slot (`batch_slot`,
/// `meta/batch_seq`), which an older build would not complete after a
/// crash; version 5 makes the journal (`journal-0`, `journal-1`) the
/// durability point, which an older build would not replay; version 6 ties
/// the journal's frames to the store (`meta/store_id`), which a version 5
/// build would not read. An older
/// store is upgraded in place (its leases stay readable), and a broker that
/// knows only older versions refuses a newer store: it would drop fields it
/// does not know when it rewrites a record.
pub const SCHEMA_VERSION: u32 = 6;

/// Older layout versions this build opens (and upgrades).
pub const READABLE_SCHEMA_VERSIONS: &[u32] = &[1, 2, 3, 4, 5, 6];

pub(crate) use record::{decode_lease, encode_lease};

pub use self::batch::{Applied, Applying, Batch, Fence, Lost, Write};
use crate::model::{Idempotency, KeyRecord, Lease, TokenRequest};

/// Errors from a storage backend.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not read or persist (I/O, disk full, lock lost).
    /// Nothing that depended on the write may be acknowledged.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded; the data is refused, never
    /// silently replaced.
    #[error("corrupt record in `{tree}` at `{key}`: {detail}")]
    Corrupt {
        /// Which tree/table.
        tree: &'static str,
        /// Which key (printable form).
        key: String,
        /// What failed.
        detail: String,
    },
    /// The data directory was written by an incompatible version.
    #[error("store schema version {found} is not supported (expected {expected})")]
    Schema {
        /// Version found on disk.
        found: u32,
        /// Version this build writes.
        expected: u32,
    },
    /// Other writers won every try (compare-and-swap races, a role another
    /// broker holds): nothing was changed, and the call may be retried.
    #[error("{0}")]
    Contended(String),
    /// The broker is stopping: nothing more is accepted.
    #[error("the broker is shutting down; nothing was changed")]
    Stopping,
    /// The store was asked for something it will not do (a malformed
    /// connection setting, a copy into a store that is not empty): nothing
    /// was changed, and retrying the same will not help.
    #[error("{0}")]
    Refused(String),
    /// The store's own defect (a value that would not encode, a poisoned
    /// lock, no randomness): not an outage of the storage, nothing was
    /// changed.
    #[error("store failure: {0}")]
    Internal(String),
}

/// Which time index [`Store::due`] and [`Store::next_deadline`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// ACTIVE leases by `expires_at`.
    Leases,
    /// Non-terminal requests by their deadline.
    Requests,
}

/// The storage contract. One write, [`Store::apply`], whose unit is an
/// operation ([`Batch`]); durability after it, shared by many operations
/// ([`Store::sync`], which group commit calls); reads, one per question
/// the broker asks; and what several brokers on one store need
/// ([`Store::changes`], [`Store::lead`], [`Store::resign`]), which a store
/// with one broker answers plainly: no news, and `lead` always grants
/// generation 0, a term that never ends. Every method is async: a backend that
/// talks to a server awaits it, an embedded one answers at once, and no
/// caller blocks a runtime thread. There are no default methods: each
/// backend says what it does.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    // Writing.

    /// Apply one operation's [`Batch`] atomically: every write and the
    /// batch's audit records, chained after the stored head, become visible
    /// together — or, on [`Applied::Lost`], nothing does. Returns at once;
    /// the outcome comes through the [`batch::Applying`] (a backend with a
    /// writer of its own applies there, in order). Durable only once a
    /// later [`Store::sync`] returns.
    fn apply(&self, batch: Batch) -> batch::Applying;
    /// Make every batch applied before this call durable.
    async fn sync(&self) -> Result<(), StoreError>;

    // Leases.

    /// One lease.
    async fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError>;
    /// Leases of one subject in id order (ids sort by creation time),
    /// starting after `after`, at most `limit`.
    async fn leases_of(
        &self,
        subject: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError>;
    /// Ids of the leases delegated directly from `parent`, in id order,
    /// after `after`, at most `limit`.
    async fn children(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// Ids of ACTIVE leases whose latest token was signed by `kid`, in id
    /// order after `after`, at most `limit` (emergency rotation; a backend
    /// without an index on `kid` scans).
    async fn signed_by(
        &self,
        kid: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    // Requests.

    /// One request.
    async fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError>;
    /// Open requests ([`TokenRequest::is_open`]) in id (creation) order,
    /// after `after`, at most `limit`.
    async fn open_requests(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError>;
    /// The open requests `who` is a party to ([`TokenRequest::parties`]:
    /// its requester, or the holder who made an exchange for another), in
    /// id order, after `after`, at most `limit` — read through an index,
    /// not a scan of every open request.
    async fn open_requests_of(
        &self,
        who: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError>;

    // Time-driven work.

    /// Ids in `index` whose time is `<= now`, earliest first, at most `limit`.
    async fn due(&self, index: Due, now: Millis, limit: usize) -> Result<Vec<String>, StoreError>;
    /// The earliest time in `index`.
    async fn next_deadline(&self, index: Due) -> Result<Option<Millis>, StoreError>;
    /// (ACTIVE leases, open requests): the gauges' starting point.
    async fn counts(&self) -> Result<(u64, u64), StoreError>;

    // The trail.

    /// Audit records after `after` (all when `None`), in order, at most `limit`.
    async fn audit_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The last audit record.
    async fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// The signed checkpoints over records `after < seq <= to`, in order.
    async fn checkpoints(&self, after: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The newest signed checkpoint (asked every second by the leader: one
    /// row, whatever the number of checkpoints).
    async fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;

    // Keys and metadata.

    /// Every signing key (private parts sealed).
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// A metadata value.
    async fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    // Short-lived secrets of the approver console (sessions, one-time
    // sign-in links): a value under the SHA-256 of the secret, with its
    // end. On a shared store every broker sees them, so a session or a
    // link works whichever broker a browser reaches. Best effort, not
    // durable: never synced on their own (a crash may forget some: people
    // sign in again), never copied between backends, swept once they end.

    /// Keep `value` under `key` until `expires_at` (replacing any).
    async fn put_ephemeral(
        &self,
        key: &[u8; 32],
        value: &[u8],
        expires_at: Millis,
    ) -> Result<(), StoreError>;
    /// The value under `key` if it has not ended at `now`.
    async fn ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError>;
    /// Remove the value under `key`, returning it if it had not ended at
    /// `now`: of several brokers taking the same key at once, one gets it.
    async fn take_ephemeral(
        &self,
        key: &[u8; 32],
        now: Millis,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    /// Forget every value that ended at or before `now`; how many.
    async fn purge_ephemeral(&self, now: Millis) -> Result<u64, StoreError>;

    // Moving a store, and retention.

    /// Rows of `table` in key order after the key `after`, at most `limit`,
    /// with their keys (the cursor for the next page).
    async fn scan(
        &self,
        table: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError>;

    // Several brokers on one store.

    /// News from other brokers: `request:<id>` when a request changed,
    /// `keys` when the key ring did, `*` when anything may have (a
    /// listener reconnected). `None`: no other broker can change anything,
    /// so time-driven work needs no [`Fence`] either.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>>;
    /// Take or keep `role` for `holder` for `ttl_ms`: the term's generation
    /// (for the [`Fence`] of its batches), or `None` while another holder's
    /// term runs.
    async fn lead(&self, role: &str, holder: &str, ttl_ms: u64) -> Result<Option<u64>, StoreError>;
    /// Give `role` up at once (shutdown), so another broker takes over
    /// without waiting for the term to run out.
    async fn resign(&self, role: &str, holder: &str) -> Result<(), StoreError>;
}

/// What [`Store::scan`] reads: the record kinds that have no reader of
/// their own (keys, the trail and checkpoints do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Every lease, ended or not.
    Leases,
    /// Every request, ended or not.
    Requests,
    /// Every idempotency entry.
    Idempotency,
    /// Every metadata value.
    Meta,
}

/// One row of a [`Table`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    /// A lease.
    Lease(Lease),
    /// A request.
    Request(TokenRequest),
    /// An idempotency entry.
    Idempotency(Idempotency),
    /// A metadata value by name.
    Meta(String, Vec<u8>),
}

/// Big-endian deadline ‖ id: sorts by time, then id.
pub(crate) fn deadline_key(at: Millis, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Split a [`deadline_key`] back into its parts.
pub(crate) fn split_deadline_key(k: &[u8]) -> Option<(Millis, String)> {
    let (at, id) = k.split_at_checked(8)?;
    let at = Millis::from_be_bytes(at.try_into().ok()?);
    Some((at, String::from_utf8(id.to_vec()).ok()?))
}

/// Subject ‖ 0x00 ‖ id (identities never contain NUL: they are URIs).
pub(crate) fn subject_key(subject: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(subject.len() + 1 + id.len());
    k.extend_from_slice(subject.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Where a page of a `head ‖ 0x00 ‖ id` index starts: the prefix every key
/// of `head` shares, and the first key after `after` (else the prefix).
pub(crate) fn page_bounds(head: &str, after: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let prefix = subject_key(head, "");
    let start = match after {
        Some(a) => {
            let mut k = subject_key(head, a);
            k.push(0);
            k
        }
        None => prefix.clone(),
    };
    (prefix, start)
}

pub(crate) fn idem_key(caller: &str, key: &str) -> Vec<u8> {
    subject_key(caller, key)
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Internal(format!("encode: {e}")))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod conformance;

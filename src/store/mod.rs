//! `store` remembers: leases, parked requests, signing keys and small metadata.
//!
//! The [`Store`] trait is the storage contract. It has no sled types in it so
//! that another backend (PostgreSQL for HA) can pass the same conformance
//! suite (`conformance` tests at the bottom of this module).
//!
//! # Durability contract
//! Writes are applied at once and are visible to readers, but they are only
//! *durable* once a later [`Store::sync`] has returned `Ok`. Nothing that
//! depends on a write may leave the broker (a token, an acknowledgement)
//! before that. [`commit::GroupCommit`] batches the `sync` calls of many
//! concurrent writers into one flush + fsync.
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
/// crash. An older
/// store is upgraded in place (its leases stay readable), and a broker that
/// knows only older versions refuses a newer store: it would drop fields it
/// does not know when it rewrites a record.
pub const SCHEMA_VERSION: u32 = 4;

/// Older layout versions this build opens (and upgrades).
pub const READABLE_SCHEMA_VERSIONS: &[u32] = &[1, 2, 3, 4];

pub(crate) use record::{decode_lease, encode_lease};

pub use self::batch::{Applied, Applying, Batch, Fence, Lost, Write};
use crate::model::{Idempotency, KeyRecord, Lease, TokenRequest};

/// Errors from a storage backend.
#[derive(Debug, thiserror::Error)]
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
}

/// Leases: the durable record of every grant, with the indexes that serve
/// expiry (ACTIVE by `expires_at`), listing (by subject) and emergency
/// rotation (by signing key).
pub trait LeaseStore {
    /// One lease.
    fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError>;
    /// Leases of one subject in id order (ids sort by creation time),
    /// starting after `after`, at most `limit`.
    fn leases_of(
        &self,
        subject: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError>;
    /// Ids of the leases delegated directly from `parent`, in id order,
    /// after `after`, at most `limit`.
    fn children(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// Ids of ACTIVE leases whose `expires_at <= now`, earliest first.
    fn leases_due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Earliest `expires_at` among ACTIVE leases.
    fn next_lease_deadline(&self) -> Result<Option<Millis>, StoreError>;
    /// Ids of ACTIVE leases whose latest token was signed by `kid` (a full
    /// scan: for emergency rotation only).
    fn active_leases_signed_by(&self, kid: &str) -> Result<Vec<String>, StoreError>;
    /// Number of ACTIVE leases (the gauge's starting point).
    fn count_active_leases(&self) -> Result<u64, StoreError>;
    /// Delete leases that ended before `before`; returns how many.
    fn purge_leases(&self, before: Millis) -> Result<u64, StoreError>;
}

/// Parked requests, indexed by deadline while not terminal and kept in an
/// open set while someone still has to act on them.
pub trait RequestStore {
    /// One request.
    fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError>;
    /// Open requests ([`TokenRequest::is_open`]) in id (creation) order,
    /// after `after`, at most `limit`.
    fn open_requests(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError>;
    /// Ids of non-terminal requests whose deadline `<= now`.
    fn requests_due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Earliest deadline among non-terminal requests.
    fn next_request_deadline(&self) -> Result<Option<Millis>, StoreError>;
    /// Number of open requests (the gauge's starting point).
    fn count_open_requests(&self) -> Result<u64, StoreError>;
    /// Delete requests that ended before `before`; returns how many.
    fn purge_requests(&self, before: Millis) -> Result<u64, StoreError>;
}

/// The decision trail's records (by sequence number) and checkpoints.
pub trait AuditStore {
    /// Audit records after `after` (all when `None`), in order, at most `limit`.
    fn audit_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The last audit record.
    fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Retention: delete audit records `<= seq` and checkpoints `< seq`
    /// (the checkpoint at `seq` stays as the anchor of what remains).
    fn compact_audit(&self, seq: u64) -> Result<(), StoreError>;
    /// Every checkpoint, in order.
    fn checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The newest checkpoint.
    fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self.checkpoints()?.pop())
    }
    /// The checkpoints over records `after < seq <= to`, in order (an
    /// export page's own; a backend with ordered keys reads just those).
    fn checkpoints_between(&self, after: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .checkpoints()?
            .into_iter()
            .filter(|(seq, _)| *seq > after && *seq <= to)
            .collect())
    }
}

/// Signing-key records (private parts sealed).
pub trait KeyStore {
    /// Every signing key.
    fn keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
}

/// Short-lived secrets of the approver console (sessions, one-time
/// sign-in links): a value under the SHA-256 of the secret, with its end.
/// On a shared store every broker sees them, so a session or a link works
/// whichever broker a browser reaches. Best effort, not durable: they are
/// never synced on their own (a crash may forget some: people sign in
/// again), never copied between backends, and swept once they end.
pub trait EphemeralStore {
    /// Keep `value` under `key` until `expires_at` (replacing any).
    fn put_ephemeral(
        &self,
        key: &[u8; 32],
        value: &[u8],
        expires_at: Millis,
    ) -> Result<(), StoreError>;
    /// The value under `key` if it has not ended at `now`.
    fn ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError>;
    /// Remove the value under `key`, returning it if it had not ended at
    /// `now`: of several brokers taking the same key at once, one gets it.
    fn take_ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError>;
    /// Forget every value that ended at or before `now`; how many.
    fn purge_ephemeral(&self, now: Millis) -> Result<u64, StoreError>;
}

/// The storage contract: one part per record kind for reading, so a
/// backend can be written and conformance-tested a part at a time; one
/// write, [`Store::apply`], whose unit is an operation; and the sync that
/// group commit calls. Durability is separate: see the module docs and
/// [`Store::sync`].
pub trait Store:
    LeaseStore + RequestStore + AuditStore + KeyStore + EphemeralStore + Send + Sync + 'static
{
    /// Apply one operation's [`Batch`] atomically: every write and the
    /// batch's audit records, chained after the stored head, become visible
    /// together — or, on [`Applied::Lost`], nothing does. Returns at once;
    /// the outcome comes through the [`batch::Applying`] (a backend with a
    /// writer of its own applies there, in order). Durable only once a
    /// later [`Store::sync`] returns.
    fn apply(&self, batch: Batch) -> batch::Applying;
    /// A metadata value.
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Make every batch applied before this call durable. Blocking.
    fn sync(&self) -> Result<(), StoreError>;

    /// (ACTIVE leases, open requests).
    fn counts(&self) -> Result<(u64, u64), StoreError> {
        Ok((self.count_active_leases()?, self.count_open_requests()?))
    }

    /// Retention: delete leases and requests that ended before `before`.
    /// Returns how many of each.
    fn purge_ended(&self, before: Millis) -> Result<(u64, u64), StoreError> {
        Ok((self.purge_leases(before)?, self.purge_requests(before)?))
    }

    /// Rows of `table` in key order after the key `after`, at most `limit`,
    /// with their keys (the cursor for the next page): for moving a store
    /// to another backend (`store::copy`).
    fn scan(
        &self,
        table: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError>;

    // What only a store several brokers share has. The embedded stores
    // keep the defaults: one broker, which leads always and hears of every
    // change in-process.

    /// Several brokers may use this store at once. Then time-driven work
    /// needs [`Store::lead`] (and its batches a [`Fence`]), and other
    /// brokers' news comes through [`Store::changes`].
    fn shared(&self) -> bool {
        false
    }

    /// News from other brokers: `request:<id>` when a request changed,
    /// `keys` when the key ring did, `*` when anything may have (a
    /// listener reconnected). `None`: no other broker can change anything.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }

    /// Take or keep `role` for `holder` for `ttl_ms`: the term's generation
    /// (for the [`Fence`] of its batches), or `None` while another holder's
    /// term runs. A store with one broker always says yes.
    fn lead(&self, role: &str, holder: &str, ttl_ms: u64) -> Result<Option<u64>, StoreError> {
        let _ = (role, holder, ttl_ms);
        Ok(Some(0))
    }

    /// Give `role` up at once (shutdown), so another broker takes over
    /// without waiting for the term to run out.
    fn resign(&self, role: &str, holder: &str) -> Result<(), StoreError> {
        let _ = (role, holder);
        Ok(())
    }
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
    serde_json::to_vec(v).map_err(|e| StoreError::Unavailable(format!("encode: {e}")))
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

/// Implement every read part of the contract ([`LeaseStore`],
/// [`RequestStore`], [`AuditStore`], [`KeyStore`], [`EphemeralStore`]) for
/// a wrapper by passing each call to the store it dereferences to, so a
/// wrapper (sled's writer-owning handle, a test's failing store) writes
/// only what it changes.
macro_rules! delegate_reads {
    ($t:ty) => {
        impl $crate::store::LeaseStore for $t {
            fn lease(
                &self,
                id: &str,
            ) -> Result<Option<$crate::model::Lease>, $crate::store::StoreError> {
                (**self).lease(id)
            }
            fn leases_of(
                &self,
                s: &str,
                a: Option<&str>,
                l: usize,
            ) -> Result<Vec<$crate::model::Lease>, $crate::store::StoreError> {
                (**self).leases_of(s, a, l)
            }
            fn children(
                &self,
                p: &str,
                a: Option<&str>,
                l: usize,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                (**self).children(p, a, l)
            }
            fn leases_due(
                &self,
                n: $crate::store::Millis,
                l: usize,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                (**self).leases_due(n, l)
            }
            fn next_lease_deadline(
                &self,
            ) -> Result<Option<$crate::store::Millis>, $crate::store::StoreError> {
                (**self).next_lease_deadline()
            }
            fn active_leases_signed_by(
                &self,
                k: &str,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                (**self).active_leases_signed_by(k)
            }
            fn count_active_leases(&self) -> Result<u64, $crate::store::StoreError> {
                (**self).count_active_leases()
            }
            fn purge_leases(
                &self,
                b: $crate::store::Millis,
            ) -> Result<u64, $crate::store::StoreError> {
                (**self).purge_leases(b)
            }
        }
        impl $crate::store::RequestStore for $t {
            fn request(
                &self,
                id: &str,
            ) -> Result<Option<$crate::model::TokenRequest>, $crate::store::StoreError> {
                (**self).request(id)
            }
            fn open_requests(
                &self,
                a: Option<&str>,
                l: usize,
            ) -> Result<Vec<$crate::model::TokenRequest>, $crate::store::StoreError> {
                (**self).open_requests(a, l)
            }
            fn requests_due(
                &self,
                n: $crate::store::Millis,
                l: usize,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                (**self).requests_due(n, l)
            }
            fn next_request_deadline(
                &self,
            ) -> Result<Option<$crate::store::Millis>, $crate::store::StoreError> {
                (**self).next_request_deadline()
            }
            fn count_open_requests(&self) -> Result<u64, $crate::store::StoreError> {
                (**self).count_open_requests()
            }
            fn purge_requests(
                &self,
                b: $crate::store::Millis,
            ) -> Result<u64, $crate::store::StoreError> {
                (**self).purge_requests(b)
            }
        }
        impl $crate::store::AuditStore for $t {
            fn audit_after(
                &self,
                a: Option<u64>,
                l: usize,
            ) -> Result<Vec<(u64, Vec<u8>)>, $crate::store::StoreError> {
                (**self).audit_after(a, l)
            }
            fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, $crate::store::StoreError> {
                (**self).audit_last()
            }
            fn compact_audit(&self, s: u64) -> Result<(), $crate::store::StoreError> {
                (**self).compact_audit(s)
            }
            fn checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, $crate::store::StoreError> {
                (**self).checkpoints()
            }
        }
        impl $crate::store::KeyStore for $t {
            fn keys(&self) -> Result<Vec<$crate::model::KeyRecord>, $crate::store::StoreError> {
                (**self).keys()
            }
        }
        impl $crate::store::EphemeralStore for $t {
            fn put_ephemeral(
                &self,
                k: &[u8; 32],
                v: &[u8],
                e: $crate::store::Millis,
            ) -> Result<(), $crate::store::StoreError> {
                (**self).put_ephemeral(k, v, e)
            }
            fn ephemeral(
                &self,
                k: &[u8; 32],
                n: $crate::store::Millis,
            ) -> Result<Option<Vec<u8>>, $crate::store::StoreError> {
                (**self).ephemeral(k, n)
            }
            fn take_ephemeral(
                &self,
                k: &[u8; 32],
                n: $crate::store::Millis,
            ) -> Result<Option<Vec<u8>>, $crate::store::StoreError> {
                (**self).take_ephemeral(k, n)
            }
            fn purge_ephemeral(
                &self,
                n: $crate::store::Millis,
            ) -> Result<u64, $crate::store::StoreError> {
                (**self).purge_ephemeral(n)
            }
        }
    };
}
pub(crate) use delegate_reads;

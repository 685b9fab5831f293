//! The embedded default backend: sled 0.34, one tree per table, behind a
//! journal of its own (`journal.rs`).
//!
//! Each group of batches is appended to the journal and made durable there
//! (one `fdatasync`) before sled sees it, so [`Store::sync`] has nothing
//! left to do. sled is made durable lazily, at checkpoints: its `flush()` writes and
//! `sync_file_range`s its data file but does not fsync it, so a checkpoint
//! follows it with `sync_data()` on a second handle to the data file, and
//! an fsync of any new file in `blobs/` (where sled writes a node over 128
//! KiB, and never fsyncs it).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sled::{Db, Tree};

use super::batch::{Applied, Applying, Batch, ChainHead, Tables, apply_to};
use super::journal::{Checkpoint, Frame, Journal};
use super::{
    Due, Millis, READABLE_SCHEMA_VERSIONS, Row, SCHEMA_VERSION, Store, StoreError, Table,
    deadline_key, decode, decode_lease, encode, encode_lease, idem_key, page_bounds,
    split_deadline_key, subject_key,
};
use crate::model::{Idempotency, KeyRecord, Lease, LeaseState, TokenRequest};

/// sled-backed store rooted at a data directory. Reads run in the
/// caller's thread; batches are applied by a writer thread of its own, in
/// groups (see `SledCore::apply_group`), so no runtime thread ever waits
/// on another's writes.
pub struct SledStore {
    core: std::sync::Arc<SledCore>,
    writer: Option<std::sync::mpsc::Sender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A batch for the writer thread, and where its outcome goes.
type Queued = (Batch, Reply);
/// Where a batch's outcome goes.
type Reply = tokio::sync::oneshot::Sender<Result<Applied, StoreError>>;

/// Most batches the writer applies as one group (one journal frame).
const GROUP_MAX: usize = 48;

impl std::ops::Deref for SledStore {
    type Target = SledCore;
    fn deref(&self) -> &SledCore {
        &self.core
    }
}

impl Drop for SledStore {
    /// The writer finishes what it was given, then lets go of the trees,
    /// so the data directory is free again when this returns.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: takes every batch waiting (up to a group) and
/// applies them together, until the store's handle lets go of the queue.
fn spawn_writer(
    core: std::sync::Arc<SledCore>,
) -> Result<(std::sync::mpsc::Sender<Queued>, std::thread::JoinHandle<()>), StoreError> {
    let (writer, queue) = std::sync::mpsc::channel::<Queued>();
    let thread = std::thread::Builder::new()
        .name("portcullis-sled-writer".into())
        .spawn(move || {
            while let Ok(first) = queue.recv() {
                let mut group = vec![first];
                while group.len() < GROUP_MAX {
                    match queue.try_recv() {
                        Ok(q) => group.push(q),
                        Err(_) => break,
                    }
                }
                core.apply_group(group);
            }
            // Closing: sled takes over what the journal held.
            if let Err(e) = core.lock_head().and_then(|mut a| a.journal.close()) {
                tracing::error!(error = %e, "the store's last checkpoint failed; the journal is replayed at the next open");
            }
        })
        .map_err(unavailable)?;
    Ok((writer, thread))
}

/// The trees of a [`SledStore`] and what its writer keeps.
pub struct SledCore {
    /// sled's own durability point (see [`checkpoint`]); it holds the
    /// database handle the trees belong to.
    checkpoint: Checkpoint,
    pub(super) leases: Tree,
    pub(super) lease_expiry: Tree,
    by_subject: Tree,
    children: Tree,
    requests: Tree,
    request_expiry: Tree,
    requests_open: Tree,
    /// Party ‖ NUL ‖ id of open requests ([`TokenRequest::parties`]):
    /// derived, rebuilt at every open.
    requests_open_by: Tree,
    idem: Tree,
    keys: Tree,
    pub(crate) audit: Tree,
    checkpoints: Tree,
    meta: Tree,
    /// Console sessions and links: key → expiry (8 bytes, big-endian) ‖
    /// value. An older build ignores the tree.
    ephemeral: Tree,
    /// Where a build before the journal wrote the last group first (see
    /// `finish_last_batch`); emptied at open.
    slot: Tree,
    /// `meta/schema_version` is [`SCHEMA_VERSION`]. An older readable store
    /// keeps its number until the first record only this version reads is
    /// written ([`SledStore::mark_current`]), so a build that cannot start
    /// for another reason leaves the store to the version that wrote it.
    schema_current: std::sync::atomic::AtomicBool,
    /// Where the trail ends, and the signing keys' states. Held for the
    /// whole of an apply: batches are checked, chained and written one
    /// after another.
    head: std::sync::Mutex<Applier>,
    /// A group's write failed part-way: the trees may hold part of it and
    /// the head no longer matches them. Every later batch is refused until
    /// a restart completes the group from the journal (fail closed).
    broken: Arc<std::sync::atomic::AtomicBool>,
}

/// What applies share, under one lock.
struct Applier {
    head: ChainHead,
    /// Signing keys as stored, read once: only batches change them, and a
    /// batch that does empties this.
    keys: std::collections::HashMap<String, Option<KeyRecord>>,
    /// The number of the last group written (`meta/batch_seq`): each
    /// group's last change sets it one higher, so sled says which groups it
    /// holds whole, and which journal frames come after them.
    groups: u64,
    /// Where each group is written first.
    journal: Journal,
}

/// Where the number of the last group written is kept, in `meta`.
const GROUP_SEQ: &str = "batch_seq";

/// The trees a batch may write, in the order of [`SledStore::batch_trees`].
const LEASES: usize = 0;
const LEASE_EXPIRY: usize = 1;
const BY_SUBJECT: usize = 2;
const CHILDREN: usize = 3;
const REQUESTS: usize = 4;
const REQUEST_EXPIRY: usize = 5;
const REQUESTS_OPEN: usize = 6;
const IDEM: usize = 7;
const KEYS: usize = 8;
const AUDIT: usize = 9;
const CHECKPOINTS: usize = 10;
const META: usize = 11;
const REQUESTS_OPEN_BY: usize = 12;
/// Trees a batch may write.
const TREES: usize = 13;

/// A group checked and chained, not yet written (see
/// `SledCore::stage_group`).
struct Staging {
    head: ChainHead,
    changes: Vec<Change>,
    answers: Answers,
}

/// The outcomes of a group's batches, sent once the group is written:
/// those that stay (with their records) and those that lost.
#[derive(Default)]
struct Answers {
    done: Vec<(Reply, Records)>,
    lost: Vec<(Reply, Result<Applied, StoreError>)>,
}

/// The records a batch appended: (number, stored bytes).
type Records = Vec<(u64, Vec<u8>)>;

impl Answers {
    /// Send them: as they are if the group was written, else every one
    /// refused with `written`'s error.
    fn send(self, written: Result<(), &StoreError>) {
        match written {
            Ok(()) => {
                for (reply, records) in self.done {
                    let _ = reply.send(Ok(Applied::Done(records)));
                }
                for (reply, outcome) in self.lost {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                let replies = self.done.into_iter().map(|(r, _)| r);
                let lost = self.lost.into_iter().map(|(r, _)| r);
                for reply in replies.chain(lost) {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

/// One change to one tree: (tree index, key, new value or removal).
type Change = (u8, Vec<u8>, Option<Vec<u8>>);

/// A batch worked out against the trees without writing them: reads see
/// the batch's own earlier changes, changes are kept in order. Applies are
/// serialised (the chain head's lock), so what was read stays true until
/// the changes are written.
struct Staged<'a> {
    trees: [&'a Tree; TREES],
    keys: &'a mut std::collections::HashMap<String, Option<KeyRecord>>,
    /// What the batches of this group before this one changed.
    group: &'a [Change],
    /// Where in `group` each key changed last.
    group_at: &'a Overlay,
    changes: Vec<Change>,
    overlay: Overlay,
}

/// Where in a list of changes each key changed last, a map per tree:
/// looked up by a borrowed key, and an index rather than a second copy
/// of the value (a group of a bulk revocation changes hundreds of
/// thousands of keys).
#[derive(Default)]
struct Overlay([std::collections::HashMap<Vec<u8>, usize>; TREES]);

impl Overlay {
    /// The value `changes` last gave `key` of `tree` (`Some(None)`:
    /// removed), if they changed it.
    fn get<'c>(
        &self,
        changes: &'c [Change],
        tree: usize,
        key: &[u8],
    ) -> Option<&'c Option<Vec<u8>>> {
        let at = *self.0.get(tree)?.get(key)?;
        changes.get(at).map(|c| &c.2)
    }

    fn insert(&mut self, tree: usize, key: Vec<u8>, at: usize) {
        if let Some(t) = self.0.get_mut(tree) {
            t.insert(key, at);
        }
    }

    /// Take in `later`'s changes (which win), appended after the first
    /// `before` changes of this one's list.
    fn extend(&mut self, later: Self, before: usize) {
        for (t, l) in self.0.iter_mut().zip(later.0) {
            t.extend(l.into_iter().map(|(k, at)| (k, at + before)));
        }
    }

    /// The keys of `tree` that `changes` left with a value (not removed).
    fn written<'c>(
        &'c self,
        changes: &'c [Change],
        tree: usize,
    ) -> impl Iterator<Item = &'c Vec<u8>> {
        self.0
            .get(tree)
            .into_iter()
            .flatten()
            .filter(|(_, at)| changes.get(**at).is_some_and(|c| c.2.is_some()))
            .map(|(k, _)| k)
    }
}

impl Staged<'_> {
    /// Has this batch or its group changed `key` of `tree`?
    fn staged(&self, tree: usize, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.overlay
            .get(&self.changes, tree, key)
            .or_else(|| self.group_at.get(self.group, tree, key))
    }

    fn get(&self, tree: usize, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.staged(tree, key) {
            return Ok(v.clone());
        }
        Ok(self.trees[tree]
            .get(key)
            .map_err(unavailable)?
            .map(|v| v.to_vec()))
    }

    fn set(&mut self, tree: usize, key: &[u8], value: Option<&[u8]>) {
        self.overlay.insert(tree, key.to_vec(), self.changes.len());
        self.changes
            .push((tree as u8, key.to_vec(), value.map(<[u8]>::to_vec)));
    }

    fn put(&mut self, tree: usize, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.set(tree, key, Some(value));
        Ok(())
    }

    fn del(&mut self, tree: usize, key: &[u8]) -> Result<(), StoreError> {
        self.set(tree, key, None);
        Ok(())
    }
}

/// The changes as one blob: per change, tree (1 byte), key length (4,
/// big-endian), key, 0 (removal) or 1 and value length (4) and value.
fn encode_changes(changes: &[Change]) -> Vec<u8> {
    let size = changes
        .iter()
        .map(|(_, k, v)| 10 + k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(size);
    for (tree, key, value) in changes {
        out.push(*tree);
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        match value {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

fn decode_changes(mut b: &[u8]) -> Option<Vec<Change>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = b.split_at_checked(n)?;
        *b = rest;
        Some(head)
    }
    fn len(b: &mut &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let tree = *take(&mut b, 1)?.first()?;
        let n = len(&mut b)?;
        let key = take(&mut b, n)?.to_vec();
        let value = match *take(&mut b, 1)?.first()? {
            0 => None,
            _ => {
                let n = len(&mut b)?;
                Some(take(&mut b, n)?.to_vec())
            }
        };
        out.push((tree, key, value));
    }
    Some(out)
}

/// The first byte of an `audit` entry that holds a block of records.
/// A record on its own (as builds before blocks wrote each one) is
/// canonical JSON, which starts with `{`.
const AUDIT_BLOCK: u8 = 0xB1;
/// The same, its records deflated (RFC 1951, raw): records of one group
/// share most of their text, and the trail is half of what a grant stores.
const AUDIT_BLOCK_DEFLATED: u8 = 0xB2;
/// How hard blocks are deflated: the fastest level; most of the gain is in
/// the repeated field names and values.
const DEFLATE_LEVEL: u8 = 1;
/// Most bytes a deflated block inflates to: a block of several records is
/// at most [`AUDIT_BLOCK_MAX`] and a little; one record is far smaller.
const INFLATED_MAX: usize = 16 * AUDIT_BLOCK_MAX;

/// Most bytes of records in one block. sled 0.34 splits a leaf only past
/// 16 items, and writes a node larger than 128 KiB as a blob (a file of its
/// own, never fsynced): 17 blocks of 6 KiB and their keys stay below that.
const AUDIT_BLOCK_MAX: usize = 6 * 1024;

/// The records of one `audit` entry: the key is the first one's number; a
/// block holds consecutive records, each as its length (u32, big-endian)
/// and its bytes, after [`AUDIT_BLOCK`]; any other value is one record.
pub fn audit_entry(key: &[u8], value: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let first = seq_of(key);
    let corrupt = || StoreError::Corrupt {
        tree: "audit",
        key: first.to_string(),
        detail: "a block of records is cut short".into(),
    };
    let inflated;
    let mut rest = match value.split_first() {
        Some((&AUDIT_BLOCK, rest)) => rest,
        Some((&AUDIT_BLOCK_DEFLATED, packed)) => {
            inflated = miniz_oxide::inflate::decompress_to_vec_with_limit(packed, INFLATED_MAX)
                .map_err(|_| StoreError::Corrupt {
                    tree: "audit",
                    key: first.to_string(),
                    detail: "a deflated block of records does not inflate".into(),
                })?;
            &inflated[..]
        }
        _ => return Ok(vec![(first, value.to_vec())]),
    };
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_at_checked(4).ok_or_else(corrupt)?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| corrupt())?) as usize;
        let (record, tail) = tail.split_at_checked(len).ok_or_else(corrupt)?;
        out.push((first.saturating_add(out.len() as u64), record.to_vec()));
        rest = tail;
    }
    Ok(out)
}

/// Consecutive records as one `audit` entry's value (see
/// [`audit_entry`]), deflated when that makes it smaller.
pub fn audit_block<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut plain = vec![AUDIT_BLOCK];
    for r in records {
        plain.extend_from_slice(&(r.len() as u32).to_be_bytes());
        plain.extend_from_slice(r);
    }
    // Reading inflates at most INFLATED_MAX bytes: a larger block (one
    // huge record, copied from elsewhere) stays plain.
    if plain.len() > INFLATED_MAX {
        return plain;
    }
    let packed = miniz_oxide::deflate::compress_to_vec(&plain[1..], DEFLATE_LEVEL);
    if packed.len() + 1 >= plain.len() {
        return plain;
    }
    let mut out = Vec::with_capacity(packed.len() + 1);
    out.push(AUDIT_BLOCK_DEFLATED);
    out.extend_from_slice(&packed);
    out
}

/// A group's changes with its new records (one `audit` key each, as the
/// batches stage them) packed into blocks of consecutive records: one key
/// per block instead of one per record, so ~211 bytes of sled's own less
/// per record, on disk and in memory, and one insert per block.
fn pack_audit(changes: Vec<Change>) -> Vec<Change> {
    // A record a later change of the group removed (a compaction after a
    // copy) is not written at all.
    let mut last = std::collections::HashMap::new();
    for (i, (tree, key, _)) in changes.iter().enumerate() {
        if usize::from(*tree) == AUDIT {
            last.insert(key.clone(), i);
        }
    }
    let changes = changes.into_iter().enumerate().filter_map(|(i, c)| {
        let superseded = usize::from(c.0) == AUDIT && c.2.is_some() && last.get(&c.1) != Some(&i);
        (!superseded).then_some(c)
    });
    let (records, mut out): (Vec<Change>, Vec<Change>) = changes.partition(|(tree, key, value)| {
        usize::from(*tree) == AUDIT
            && key.len() == 8
            && value
                .as_ref()
                .is_some_and(|v| !matches!(v.first(), Some(&(AUDIT_BLOCK | AUDIT_BLOCK_DEFLATED))))
    });
    let mut block: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut size = 0;
    let mut seal = |block: &mut Vec<(u64, Vec<u8>)>| {
        if let Some((first, _)) = block.first() {
            let value = audit_block(block.iter().map(|(_, r)| r.as_slice()));
            out.push((AUDIT as u8, first.to_be_bytes().to_vec(), Some(value)));
        }
        block.clear();
    };
    for (_, key, value) in records {
        let (seq, record) = (seq_of(&key), value.unwrap_or_default());
        let follows = block
            .last()
            .is_none_or(|(last, _)| last.checked_add(1) == Some(seq));
        if !follows || size + 4 + record.len() > AUDIT_BLOCK_MAX {
            seal(&mut block);
            size = 0;
        }
        size += 4 + record.len();
        block.push((seq, record));
    }
    seal(&mut block);
    out
}

/// The key of the batch slot, alone in its tree (`batch_slot`), where a
/// build before the journal (schema 4) wrote each group first.
const BATCH_SLOT: &str = "last";

impl Tables for Staged<'_> {
    fn lease(&mut self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.get(LEASES, id.as_bytes())?
            .map(|v| decode_lease(id.as_bytes(), &v))
            .transpose()
    }

    fn put_lease(&mut self, old: Option<&Lease>, new: &Lease) -> Result<(), StoreError> {
        // INVARIANT: the record before its index entries, the new expiry
        // entry before the old one goes: a reader between two writes never
        // finds an expiry entry that does not match its lease (expiry drops
        // such entries as left over by a crash).
        self.put(LEASES, new.id.as_bytes(), &encode_lease(new))?;
        let new_key =
            (new.state == LeaseState::Active).then(|| deadline_key(new.expires_at, &new.id));
        if let Some(k) = &new_key {
            self.put(LEASE_EXPIRY, k, &[])?;
        }
        if let Some(o) = old.filter(|o| o.state == LeaseState::Active) {
            let k = deadline_key(o.expires_at, &o.id);
            if Some(&k) != new_key.as_ref() {
                self.del(LEASE_EXPIRY, &k)?;
            }
        }
        if old.is_none() {
            self.put(BY_SUBJECT, &subject_key(&new.subject, &new.id), &[])?;
            if let Some(d) = &new.delegation {
                self.put(CHILDREN, &subject_key(&d.parent_id, &new.id), &[])?;
            }
        }
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        self.get(REQUESTS, id.as_bytes())?
            .map(|v| decode("requests", id.as_bytes(), &v))
            .transpose()
    }

    fn put_request(
        &mut self,
        old: Option<&TokenRequest>,
        new: &TokenRequest,
    ) -> Result<(), StoreError> {
        self.put(REQUESTS, new.id.as_bytes(), &encode(new)?)?;
        let new_key = (!new.state.is_terminal()).then(|| deadline_key(new.deadline, &new.id));
        if let Some(k) = &new_key {
            self.put(REQUEST_EXPIRY, k, &[])?;
        }
        if let Some(o) = old.filter(|o| !o.state.is_terminal()) {
            let k = deadline_key(o.deadline, &o.id);
            if Some(&k) != new_key.as_ref() {
                self.del(REQUEST_EXPIRY, &k)?;
            }
        }
        if let Some(o) = old {
            for p in o.parties() {
                self.del(REQUESTS_OPEN_BY, &party_key(p, &o.id))?;
            }
        }
        if new.is_open() {
            for p in new.parties() {
                self.put(REQUESTS_OPEN_BY, &party_key(p, &new.id), &[])?;
            }
            self.put(REQUESTS_OPEN, new.id.as_bytes(), &[])
        } else {
            self.del(REQUESTS_OPEN, new.id.as_bytes())
        }
    }

    fn idempotency(&mut self, caller: &str, key: &str) -> Result<Option<Idempotency>, StoreError> {
        let k = idem_key(caller, key);
        self.get(IDEM, &k)?
            .map(|v| decode("idempotency", &k, &v))
            .transpose()
    }

    fn put_idempotency(&mut self, entry: &Idempotency) -> Result<(), StoreError> {
        self.put(IDEM, &idem_key(&entry.caller, &entry.key), &encode(entry)?)
    }

    fn key(&mut self, kid: &str) -> Result<Option<KeyRecord>, StoreError> {
        if let Some(v) = self.staged(KEYS, kid.as_bytes()) {
            // Changed in this group: not what the tree holds, not cached.
            return v
                .as_ref()
                .map(|v| decode("keys", kid.as_bytes(), v))
                .transpose();
        }
        if let Some(k) = self.keys.get(kid) {
            return Ok(k.clone());
        }
        let key: Option<KeyRecord> = self
            .get(KEYS, kid.as_bytes())?
            .map(|v| decode("keys", kid.as_bytes(), &v))
            .transpose()?;
        self.keys.insert(kid.to_owned(), key.clone());
        Ok(key)
    }

    fn put_key(&mut self, key: &KeyRecord) -> Result<(), StoreError> {
        self.put(KEYS, key.kid.as_bytes(), &encode(key)?)
    }

    fn delete_key(&mut self, kid: &str) -> Result<(), StoreError> {
        self.del(KEYS, kid.as_bytes())
    }

    fn put_meta(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put(META, name.as_bytes(), value)
    }

    fn put_checkpoint(&mut self, seq: u64, jws: &[u8]) -> Result<(), StoreError> {
        self.put(CHECKPOINTS, &seq.to_be_bytes(), jws)
    }

    fn put_audit(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        // Records are canonical JSON; one that starts as a block would be
        // read as one.
        if matches!(bytes.first(), Some(&(AUDIT_BLOCK | AUDIT_BLOCK_DEFLATED))) {
            return Err(StoreError::Refused(format!(
                "audit record {seq} starts with a block marker; records are JSON"
            )));
        }
        self.put(AUDIT, &seq.to_be_bytes(), bytes)
    }

    fn delete_lease(&mut self, l: &Lease) -> Result<(), StoreError> {
        if l.state == LeaseState::Active {
            self.del(LEASE_EXPIRY, &deadline_key(l.expires_at, &l.id))?;
        }
        self.del(BY_SUBJECT, &subject_key(&l.subject, &l.id))?;
        if let Some(d) = &l.delegation {
            self.del(CHILDREN, &subject_key(&d.parent_id, &l.id))?;
        }
        self.del(LEASES, l.id.as_bytes())
    }

    fn delete_request(&mut self, r: &TokenRequest) -> Result<(), StoreError> {
        if !r.state.is_terminal() {
            self.del(REQUEST_EXPIRY, &deadline_key(r.deadline, &r.id))?;
        }
        self.del(REQUESTS_OPEN, r.id.as_bytes())?;
        for p in r.parties() {
            self.del(REQUESTS_OPEN_BY, &party_key(p, &r.id))?;
        }
        self.del(REQUESTS, r.id.as_bytes())
    }

    fn compact_audit(&mut self, seq: u64) -> Result<(), StoreError> {
        // What the trees hold: records this group adds come after the
        // head, above any compaction point.
        let gone =
            |tree: &Tree, end: std::ops::Bound<[u8; 8]>| -> Result<Vec<Vec<u8>>, StoreError> {
                tree.range((std::ops::Bound::Unbounded, end))
                    .map(|item| item.map(|(k, _)| k.to_vec()).map_err(unavailable))
                    .collect()
            };
        // The entries at or below the point: as stored, and as this group
        // left them (an earlier compaction in it may have moved a block).
        let point = seq.to_be_bytes();
        let mut entries: std::collections::BTreeSet<Vec<u8>> =
            gone(self.trees[AUDIT], std::ops::Bound::Included(point))?
                .into_iter()
                .collect();
        for k in self
            .overlay
            .written(&self.changes, AUDIT)
            .chain(self.group_at.written(self.group, AUDIT))
        {
            if k.as_slice() <= point.as_slice() {
                entries.insert(k.clone());
            }
        }
        for k in entries {
            // A block that reaches past the point keeps its later records,
            // under the first of them.
            let Some(value) = self.get(AUDIT, &k)? else {
                continue;
            };
            let kept: Vec<(u64, Vec<u8>)> = audit_entry(&k, &value)?
                .into_iter()
                .filter(|(n, _)| *n > seq)
                .collect();
            self.del(AUDIT, &k)?;
            if let Some((first, _)) = kept.first() {
                let block = audit_block(kept.iter().map(|(_, r)| r.as_slice()));
                self.put(AUDIT, &first.to_be_bytes(), &block)?;
            }
        }
        for k in gone(
            self.trees[CHECKPOINTS],
            std::ops::Bound::Excluded(seq.to_be_bytes()),
        )? {
            self.del(CHECKPOINTS, &k)?;
        }
        Ok(())
    }
}

/// A big-endian sequence key (a malformed key reads as `u64::MAX`, which the
/// verifier then reports as out of order).
fn seq_of(k: &[u8]) -> u64 {
    <[u8; 8]>::try_from(k).map_or(u64::MAX, u64::from_be_bytes)
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The ids under `head` in a `head ‖ 0x00 ‖ id` index, after `after`, in
/// order.
fn ids_under<'t>(
    index: &'t Tree,
    head: &str,
    after: Option<&str>,
) -> impl Iterator<Item = Result<String, StoreError>> + 't {
    let (prefix, start) = page_bounds(head, after);
    index.range(start..).map_while(move |item| match item {
        Ok((k, _)) => k
            .strip_prefix(prefix.as_slice())
            .map(|id| Ok(String::from_utf8_lossy(id).into_owned())),
        Err(e) => Some(Err(unavailable(e))),
    })
}

/// sled releases its file lock from a background thread after its last
/// handle drops, so a store closed a moment ago (a restart in the same
/// process) may still hold it briefly. Wait for that, a bounded time; a lock
/// still held afterwards is another broker's, and sled's open reports it.
fn wait_for_release(db: &Path) {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(3);
    let Ok(file) = File::open(db) else {
        return; // a new store: nothing to wait for
    };
    let until = std::time::Instant::now() + WAIT;
    while let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
        if std::time::Instant::now() >= until {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Dropping `file` releases the probe's own lock before sled takes it.
}

/// Owner-only access to `path` (the store holds sealed keys, leases and
/// the trail: nobody else on the machine reads or writes it).
#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        // sled removes its own temporary files as it goes: one gone between
        // listing and chmod needs no protection.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(unavailable),
    }
}

#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) -> Result<(), StoreError> {
    Ok(())
}

/// Every file sled has written so far is 0600, every directory 0700 (the
/// data directory itself being 0700 already keeps others out of files it
/// writes later).
fn restrict_files(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(unavailable)? {
        let entry = entry.map_err(unavailable)?;
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            restrict(&entry.path(), 0o700)?;
            restrict_files(&entry.path())?;
        } else if kind.is_file() {
            restrict(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

/// Tuning of the embedded store.
#[derive(Clone, Copy, Debug)]
pub struct SledOptions {
    /// Bytes of decoded pages sled keeps in memory (its page cache). The
    /// rest of the store is read back from the OS page cache on demand.
    pub cache_capacity: u64,
}

impl SledOptions {
    /// 32 MiB: the hot set is recent leases (introspection of live tokens,
    /// renewals), and a million leases belong on disk, not here. Measured
    /// at a million leases (docs/benchmarks.md): RSS 247 MB after the fill
    /// against ~380 MB with 64 MiB, at the same grant and introspection
    /// rates; sled's own default of 1 GiB let RSS pass a gigabyte.
    pub const DEFAULT_CACHE_CAPACITY: u64 = 32 * 1024 * 1024;
}

impl Default for SledOptions {
    fn default() -> Self {
        Self {
            cache_capacity: Self::DEFAULT_CACHE_CAPACITY,
        }
    }
}

impl SledStore {
    /// Open (or create) the store under `dir` with the default options.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, SledOptions::default())
    }

    /// Open (or create) the store under `dir`. Creating the directory is made
    /// durable with a directory fsync; an unknown schema version is refused,
    /// an older readable one upgraded.
    pub fn open_with(dir: &Path, opts: SledOptions) -> Result<Self, StoreError> {
        let fresh = !dir.join("db").exists();
        std::fs::create_dir_all(dir).map_err(unavailable)?;
        restrict(dir, 0o700)?;
        wait_for_release(&dir.join("db"));
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(opts.cache_capacity)
            .open()
            .map_err(unavailable)?;
        restrict_files(dir)?;
        let data_path: PathBuf = dir.join("db");
        let data_file = Arc::new(File::open(&data_path).map_err(unavailable)?);
        // A layout this build does not know is refused before anything is
        // written to it.
        refuse_unknown_schema(&db)?;
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpoint = checkpoint(dir, &db, &data_file, &broken);
        let stored_id = store_id(&db)?;
        let (id, untied) = match stored_id {
            Some(id) => (id, None),
            None => (new_store_id()?, Some(Journal::untied_frames(dir)?)),
        };
        let (journal, frames) = Journal::open(dir, id, checkpoint.clone())?;
        restrict_files(dir)?;
        let core = SledCore::new(db, journal, checkpoint, broken)?;
        core.check_schema()?;
        core.finish_last_batch()?;
        // A store without an id yet replays the frames written before ids
        // (none read with the new one), and only then, durably, takes it.
        core.replay(untied.unwrap_or(frames))?;
        if stored_id.is_none() {
            core.meta.insert(STORE_ID, &id).map_err(unavailable)?;
            core.checkpoint_now()?;
        }
        core.index_open_requests()?;
        core.continue_from_stored()?;
        if fresh {
            // The new files' directory entries must survive a crash too.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(unavailable)?;
        }
        let core = std::sync::Arc::new(core);
        let (writer, thread) = spawn_writer(core.clone())?;
        Ok(Self {
            core,
            writer: Some(writer),
            thread: Some(thread),
        })
    }
}

/// sled's `flush()` and an fsync of its data file: everything written to
/// sled so far is then durable in sled itself.
/// A checkpoint that fails marks the store `broken` at once (health goes
/// NOT_SERVING, writes are refused): the journal file it was to free
/// cannot be written over.
fn checkpoint(
    dir: &Path,
    db: &Db,
    data_file: &Arc<File>,
    broken: &Arc<std::sync::atomic::AtomicBool>,
) -> Checkpoint {
    let (db, data_file, blobs) = (db.clone(), data_file.clone(), dir.join("blobs"));
    let broken = broken.clone();
    let synced = std::sync::Mutex::new(std::collections::HashSet::new());
    Arc::new(move || {
        let done = db
            .flush()
            .map_err(unavailable)
            // INVARIANT: on Linux, fsync of any handle covers the whole
            // file, so this makes every page `flush()` just wrote durable.
            .and_then(|_| data_file.sync_data().map_err(unavailable))
            .and_then(|()| sync_blobs(&blobs, &synced));
        if let Err(e) = &done {
            broken.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(error = %e, "a checkpoint of sled failed; refusing every write until a restart");
        }
        done
    })
}

/// The store's id (`meta/store_id`), which its journal frames are tied
/// to; none before the first open of a build that ties them.
fn store_id(db: &Db) -> Result<Option<super::journal::StoreId>, StoreError> {
    let meta = db.open_tree("meta").map_err(unavailable)?;
    meta.get(STORE_ID)
        .map_err(unavailable)?
        .map(|v| {
            <[u8; 16]>::try_from(v.as_ref()).map_err(|_| StoreError::Corrupt {
                tree: "meta",
                key: STORE_ID.into(),
                detail: "not 16 bytes".into(),
            })
        })
        .transpose()
}

fn new_store_id() -> Result<super::journal::StoreId, StoreError> {
    use ring::rand::SecureRandom as _;
    let mut id = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| unavailable("no randomness for the store's id"))?;
    Ok(id)
}

/// Refuse a store whose layout version this build does not know, before
/// anything is written to it.
fn refuse_unknown_schema(db: &Db) -> Result<(), StoreError> {
    let meta = db.open_tree("meta").map_err(unavailable)?;
    let found = meta.get("schema_version").map_err(unavailable)?.map(|v| {
        std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0)
    });
    match found {
        Some(v) if !READABLE_SCHEMA_VERSIONS.contains(&v) => Err(StoreError::Schema {
            found: v,
            expected: SCHEMA_VERSION,
        }),
        _ => Ok(()),
    }
}

/// Where the store's id is kept, in `meta`.
const STORE_ID: &str = "store_id";

/// sled writes a node larger than 128 KiB (a leaf of large values: sled
/// splits a leaf by its number of items, not its size) as a file of its own
/// under `blobs/`, which it never fsyncs, and its data file points at it.
/// Blob files are written once, so each is synced once, with the directory.
fn sync_blobs(
    dir: &Path,
    synced: &std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(unavailable(e)),
    };
    let mut synced = synced
        .lock()
        .map_err(|_| unavailable("blob list poisoned"))?;
    let mut new = false;
    for entry in entries {
        let entry = entry.map_err(unavailable)?;
        if synced.contains(&entry.file_name()) {
            continue;
        }
        File::open(entry.path())
            .and_then(|f| f.sync_all())
            .map_err(unavailable)?;
        synced.insert(entry.file_name());
        new = true;
    }
    if new {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(unavailable)?;
    }
    Ok(())
}

impl SledCore {
    /// The trees of the store `db`, written through `journal`.
    fn new(
        db: Db,
        journal: Journal,
        checkpoint: Checkpoint,
        broken: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, StoreError> {
        let tree = |name: &str| db.open_tree(name).map_err(unavailable);
        Ok(SledCore {
            leases: tree("leases")?,
            lease_expiry: tree("lease_expiry")?,
            by_subject: tree("leases_by_subject")?,
            children: tree("lease_children")?,
            requests: tree("requests")?,
            request_expiry: tree("request_expiry")?,
            requests_open: tree("requests_open")?,
            requests_open_by: tree("requests_open_by")?,
            idem: tree("idempotency")?,
            keys: tree("keys")?,
            audit: tree("audit")?,
            checkpoints: tree("audit_checkpoints")?,
            meta: tree("meta")?,
            ephemeral: tree("console_ephemeral")?,
            slot: tree("batch_slot")?,
            checkpoint,
            schema_current: std::sync::atomic::AtomicBool::new(false),
            head: std::sync::Mutex::new(Applier {
                head: ChainHead::after(None),
                keys: std::collections::HashMap::new(),
                groups: 0,
                journal,
            }),
            broken,
        })
    }

    /// Take up the trail and the group numbers where the store ends.
    fn continue_from_stored(&self) -> Result<(), StoreError> {
        let last = self.audit_last()?;
        let groups = self.stored_seq()?;
        let mut applier = self.lock_head()?;
        applier.head = ChainHead::after(last.as_ref());
        applier.groups = groups;
        Ok(())
    }
}

/// The key of `id` under `party` in `requests_open_by`.
fn party_key(party: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(party.len() + 1 + id.len());
    k.extend_from_slice(party.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

impl SledCore {
    /// Build `requests_open_by` afresh from `requests_open`: it is derived,
    /// and a build before it (which opens this store too) does not keep it.
    /// Open requests are few (a quota per identity), so this is quick.
    fn index_open_requests(&self) -> Result<(), StoreError> {
        self.requests_open_by.clear().map_err(unavailable)?;
        for item in &self.requests_open {
            let (id, _) = item.map_err(unavailable)?;
            if let Some(r) = self.request(&String::from_utf8_lossy(&id))? {
                for p in r.parties() {
                    self.requests_open_by
                        .insert(party_key(p, &r.id), &[])
                        .map_err(unavailable)?;
                }
            }
        }
        Ok(())
    }

    /// Refuse a layout this build does not know; record the current version
    /// on a new store. A readable older version is left as it is until
    /// [`Self::mark_current`].
    fn check_schema(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let found = self.meta_value("schema_version")?.map(|v| {
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
                .unwrap_or(0)
        });
        match found {
            Some(v) if v == SCHEMA_VERSION => {
                self.schema_current.store(true, Ordering::SeqCst);
                Ok(())
            }
            Some(v) if READABLE_SCHEMA_VERSIONS.contains(&v) => Ok(()),
            Some(found) => Err(StoreError::Schema {
                found,
                expected: SCHEMA_VERSION,
            }),
            None => self.mark_current(),
        }
    }

    /// Before writing a record only this version reads: record the current
    /// schema version, durably in sled itself (an older build does not read
    /// the journal). It is written ahead of the record, so a crash never
    /// leaves such a record in a store an older build would open.
    fn mark_current(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if !self.schema_current.load(Ordering::SeqCst) {
            self.meta
                .insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())
                .map_err(unavailable)?;
            self.checkpoint_now()?;
            self.schema_current.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// sled's own durability point: everything written to it so far.
    fn checkpoint_now(&self) -> Result<(), StoreError> {
        (self.checkpoint)()
    }

    /// At open, after sled's own recovery: write again, in order, every
    /// group the journal holds after the last one sled holds whole (a
    /// SIGKILL loses what sled had not written out), then checkpoint, so
    /// the journal may be written over from its start.
    fn replay(&self, frames: Vec<Frame>) -> Result<(), StoreError> {
        let frames = Journal::after(frames, self.stored_seq()?)?;
        if !frames.is_empty() {
            tracing::warn!(
                groups = frames.len(),
                "writing again, from the journal, the groups a crash kept from sled"
            );
        }
        let trees = self.batch_trees();
        for (seq, payload) in &frames {
            let changes = decode_changes(payload).ok_or_else(|| StoreError::Corrupt {
                tree: "journal",
                key: seq.to_string(),
                detail: "the group's changes do not decode".into(),
            })?;
            Self::write_each(&trees, &changes)?;
        }
        self.checkpoint_now()
    }

    /// The number of the last group written (0: none yet).
    fn stored_seq(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta
            .get(GROUP_SEQ)
            .map_err(unavailable)?
            .map_or(0, |v| seq_of(&v)))
    }

    fn lock_head(&self) -> Result<std::sync::MutexGuard<'_, Applier>, StoreError> {
        self.head
            .lock()
            .map_err(|_| StoreError::Internal("audit chain head poisoned".into()))
    }

    /// Write group `seq`'s checked changes so that a crash keeps all of
    /// them or none: durably into the journal first, then into sled change
    /// by change. Whatever part of the group sled keeps after a crash, the
    /// journal completes at open ([`Self::replay`]).
    fn write_changes(
        &self,
        journal: &mut Journal,
        seq: u64,
        changes: &[Change],
    ) -> Result<(), StoreError> {
        journal.append(seq, &encode_changes(changes))?;
        let trees = self.batch_trees();
        let (first, rest) = changes.split_at(changes.len() / 2);
        Self::write_each(&trees, first)?;
        self.failpoint("sled-mid-group");
        Self::write_each(&trees, rest)
    }

    /// Debug builds only, for the crash tests: with
    /// `PORTCULLIS_FAILPOINT=NAME:N`, the Nth time the writer passes the
    /// point `NAME` it writes out what sled holds, says so in the log, and
    /// stops there for good, so a test can SIGKILL the process at exactly
    /// that point.
    #[cfg(debug_assertions)]
    fn failpoint(&self, name: &str) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
        static HITS: AtomicU64 = AtomicU64::new(0);
        let at = AT.get_or_init(|| {
            let v = std::env::var("PORTCULLIS_FAILPOINT").ok()?;
            let (n, count) = v.split_once(':')?;
            Some((n.to_owned(), count.parse().ok()?))
        });
        if let Some((n, count)) = at
            && n == name
            && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *count
        {
            let _ = (self.checkpoint)();
            tracing::warn!(failpoint = name, "failpoint reached; the writer stops here");
            loop {
                std::thread::park();
            }
        }
    }

    #[cfg(not(debug_assertions))]
    fn failpoint(&self, _: &str) {}

    fn write_each(trees: &[&Tree; TREES], changes: &[Change]) -> Result<(), StoreError> {
        for (tree, key, value) in changes {
            let t = trees
                .get(usize::from(*tree))
                .ok_or_else(|| unavailable("a group's change names an unknown tree"))?;
            match value {
                Some(v) => t.insert(key.as_slice(), v.as_slice()),
                None => t.remove(key.as_slice()),
            }
            .map_err(unavailable)?;
        }
        Ok(())
    }

    /// At open of a store a build before the journal wrote (schema 4): if
    /// a crash cut its last batch short — its last change is not there
    /// (sled recovers a prefix: if the last is there, all are) — write its
    /// changes again from the batch slot, which completes it (no batch came
    /// after it). A complete batch is left alone. Then the slot goes: this
    /// build writes through the journal.
    fn finish_last_batch(&self) -> Result<(), StoreError> {
        let Some(blob) = self.slot.get(BATCH_SLOT).map_err(unavailable)? else {
            return Ok(());
        };
        self.complete_from_slot(&blob)?;
        self.slot.remove(BATCH_SLOT).map_err(unavailable)?;
        Ok(())
    }

    fn complete_from_slot(&self, blob: &[u8]) -> Result<(), StoreError> {
        let changes = decode_changes(blob).ok_or_else(|| StoreError::Corrupt {
            tree: "batch_slot",
            key: BATCH_SLOT.into(),
            detail: "the last batch's changes do not decode".into(),
        })?;
        let trees = self.batch_trees();
        // The group's last change sets its number: written whole when the
        // stored number is the slot's; cut short when it is one below (the
        // group before); anything else is not this store's last group.
        let slot_seq = match changes.last() {
            Some((tree, key, Some(v)))
                if usize::from(*tree) == META && key == GROUP_SEQ.as_bytes() =>
            {
                seq_of(v)
            }
            _ => {
                tracing::warn!("the batch slot holds no group number; left alone");
                return Ok(());
            }
        };
        let stored = self.stored_seq()?;
        if stored == slot_seq {
            return Ok(());
        }
        if stored.checked_add(1) != Some(slot_seq) {
            tracing::warn!(
                stored,
                slot_seq,
                "the batch slot holds a group that is not the last one; left alone"
            );
            return Ok(());
        }
        tracing::warn!(
            changes = changes.len(),
            "completing the last batch, which a crash cut short"
        );
        Self::write_each(&trees, &changes)
    }

    /// Apply a group of batches, in order, as the writer thread: each is
    /// checked (against the trees and the group's earlier changes) and
    /// chained; those that lose write nothing; the changes of all that
    /// stay are written together (one journal frame, see `write_changes`);
    /// then each gets its outcome, durable.
    fn apply_group(&self, group: Vec<Queued>) {
        use std::sync::atomic::Ordering;
        let refuse = |replies: Vec<Reply>, why: &str| {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Unavailable(why.to_owned())));
            }
        };
        if self.broken.load(Ordering::SeqCst) {
            return refuse(
                group.into_iter().map(|q| q.1).collect(),
                "the store failed a write; restart the broker",
            );
        }
        if let Err(e) = self.mark_current() {
            return refuse(group.into_iter().map(|q| q.1).collect(), &e.to_string());
        }
        let Ok(mut guard) = self.lock_head() else {
            return refuse(
                group.into_iter().map(|q| q.1).collect(),
                "audit chain head poisoned",
            );
        };
        let applier = &mut *guard;
        let Staging {
            head,
            changes,
            answers,
        } = self.stage_group(applier, group);
        let mut changes = pack_audit(changes);
        let seq = applier.groups + 1;
        if !changes.is_empty() {
            // Last: the group's number (see `finish_last_batch`).
            changes.push((
                META as u8,
                GROUP_SEQ.as_bytes().to_vec(),
                Some(seq.to_be_bytes().to_vec()),
            ));
        }
        if changes.iter().any(|c| usize::from(c.0) == KEYS) {
            applier.keys.clear();
        }
        let written = if changes.is_empty() {
            Ok(())
        } else {
            self.write_changes(&mut applier.journal, seq, &changes)
        };
        match &written {
            Ok(()) => {
                applier.head = head;
                if !changes.is_empty() {
                    applier.groups = seq;
                }
            }
            Err(e) => {
                self.broken.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "a batch write failed part-way; refusing every write until a restart completes it");
            }
        }
        answers.send(written.as_ref().map(|_| ()));
    }

    /// Check and chain each batch of `group` in order, against the trees
    /// and the changes of the group's batches before it. For those that
    /// stay: the head after them, their changes, and where their outcomes
    /// go; and the outcomes of those that lost, which are sent only once
    /// the group is written: a batch may have lost to an earlier one of
    /// the same group, and its caller then reads what that one wrote (an
    /// idempotent retry reads the first call's lease).
    fn stage_group(&self, applier: &mut Applier, group: Vec<Queued>) -> Staging {
        let mut head = applier.head.clone();
        let mut overlay = Overlay::default();
        let mut changes = Vec::new();
        let mut answers = Answers::default();
        for (batch, reply) in group {
            let (outcome, staged) = {
                let mut staged = Staged {
                    trees: self.batch_trees(),
                    keys: &mut applier.keys,
                    group: &changes,
                    group_at: &overlay,
                    changes: Vec::new(),
                    overlay: Overlay::default(),
                };
                let outcome = apply_to(&mut staged, &head, &batch);
                (outcome, (staged.changes, staged.overlay))
            };
            match outcome {
                Ok((Applied::Done(records), next)) => {
                    head = next;
                    overlay.extend(staged.1, changes.len());
                    changes.extend(staged.0);
                    answers.done.push((reply, records));
                }
                Ok((outcome, _)) => answers.lost.push((reply, Ok(outcome))),
                Err(e) => answers.lost.push((reply, Err(e))),
            }
        }
        Staging {
            head,
            changes,
            answers,
        }
    }

    /// Every tree a batch may write, in the order of the index constants.
    fn batch_trees(&self) -> [&Tree; TREES] {
        [
            &self.leases,
            &self.lease_expiry,
            &self.by_subject,
            &self.children,
            &self.requests,
            &self.request_expiry,
            &self.requests_open,
            &self.idem,
            &self.keys,
            &self.audit,
            &self.checkpoints,
            &self.meta,
            &self.requests_open_by,
        ]
    }

    /// Does expiry entry `k` match an ACTIVE lease expiring at that time?
    fn entry_is_live(&self, k: &[u8]) -> Result<bool, StoreError> {
        let Some((at, id)) = split_deadline_key(k) else {
            return Ok(false);
        };
        Ok(self
            .lease(&id)?
            .is_some_and(|l| l.state == LeaseState::Active && l.expires_at == at))
    }

    fn due_in(index: &Tree, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in index.iter() {
            let (k, _) = item.map_err(unavailable)?;
            match split_deadline_key(&k) {
                Some((at, id)) if at <= now => out.push(id),
                _ => break,
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn first(index: &Tree) -> Result<Option<Millis>, StoreError> {
        Ok(index
            .first()
            .map_err(unavailable)?
            .and_then(|(k, _)| split_deadline_key(&k))
            .map(|(at, _)| at))
    }
}

/// Reads, answered in the caller's thread (see [`Store`] for each).
impl SledCore {
    fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.leases
            .get(id.as_bytes())
            .map_err(unavailable)?
            .map(|v| decode_lease(id.as_bytes(), &v))
            .transpose()
    }

    fn leases_of(
        &self,
        subject: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        for id in ids_under(&self.by_subject, subject, after) {
            if out.len() >= limit {
                break;
            }
            // An index entry whose lease is gone is skipped.
            if let Some(l) = self.lease(&id?)? {
                out.push(l);
            }
        }
        Ok(out)
    }

    fn children(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        ids_under(&self.children, parent, after)
            .take(limit)
            .collect()
    }

    fn due(&self, index: Due, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        match index {
            Due::Leases => self.leases_due(now, limit),
            Due::Requests => Self::due_in(&self.request_expiry, now, limit),
        }
    }

    fn next_deadline(&self, index: Due) -> Result<Option<Millis>, StoreError> {
        Self::first(match index {
            Due::Leases => &self.lease_expiry,
            Due::Requests => &self.request_expiry,
        })
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.lease_expiry.len() as u64,
            self.requests_open.len() as u64,
        )
    }

    fn leases_due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in self.lease_expiry.iter() {
            let (k, _) = item.map_err(unavailable)?;
            let Some((at, id)) = split_deadline_key(&k) else {
                break;
            };
            if at > now || out.len() >= limit {
                break;
            }
            // Entries a crash left behind (see `create_lease`, `swap_lease`)
            // no longer match their lease: drop them here so the contract —
            // ids of ACTIVE leases due by `now` — holds.
            if self.entry_is_live(&k)? {
                out.push(id);
            } else {
                self.lease_expiry.remove(&k).map_err(unavailable)?;
            }
        }
        Ok(out)
    }

    fn signed_by(
        &self,
        kid: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let range = match after {
            Some(a) => self.leases.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.leases.iter(),
        };
        let mut out = Vec::new();
        for item in range {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(unavailable)?;
            let l: Lease = decode_lease(&k, &v)?;
            if l.kid == kid && l.state == LeaseState::Active {
                out.push(l.id);
            }
        }
        Ok(out)
    }

    fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        self.requests
            .get(id.as_bytes())
            .map_err(unavailable)?
            .map(|v| decode("requests", id.as_bytes(), &v))
            .transpose()
    }

    fn open_requests_of(
        &self,
        who: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        let prefix = party_key(who, "");
        let from = party_key(who, after.unwrap_or_default());
        let start = if after.is_some() {
            std::ops::Bound::Excluded(from)
        } else {
            std::ops::Bound::Included(from)
        };
        let mut out = Vec::new();
        for item in self
            .requests_open_by
            .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded))
        {
            let (k, _) = item.map_err(unavailable)?;
            let Some(id) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            if out.len() >= limit {
                break;
            }
            if let Some(r) = self.request(&String::from_utf8_lossy(id))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn open_requests(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        let range = match after {
            Some(a) => self.requests_open.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.requests_open.iter(),
        };
        let mut out = Vec::new();
        for item in range {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(unavailable)?;
            if let Some(r) = self.request(&String::from_utf8_lossy(&k))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn audit_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(0, |a| a.saturating_add(1));
        // The entry that may hold `from` inside a block, then the rest.
        let holding = self
            .audit
            .range(..=from.to_be_bytes())
            .next_back()
            .transpose()
            .map_err(unavailable)?;
        let later = self.audit.range((Excluded(from.to_be_bytes()), Unbounded));
        let mut out = Vec::new();
        for item in holding.into_iter().map(Ok).chain(later) {
            let (k, v) = item.map_err(unavailable)?;
            for (n, record) in audit_entry(&k, &v)? {
                if out.len() >= limit {
                    return Ok(out);
                }
                if n >= from {
                    out.push((n, record));
                }
            }
        }
        Ok(out)
    }

    fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self.audit.last().map_err(unavailable)? {
            Some((k, v)) => Ok(audit_entry(&k, &v)?.pop()),
            None => Ok(None),
        }
    }

    fn checkpoints(&self, after: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if to <= after {
            return Ok(Vec::new());
        }
        self.checkpoints
            .range(after.saturating_add(1).to_be_bytes()..=to.to_be_bytes())
            .map(|item| {
                item.map(|(k, v)| (seq_of(&k), v.to_vec()))
                    .map_err(unavailable)
            })
            .collect()
    }

    fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.keys
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(unavailable)?;
                decode("keys", &k, &v)
            })
            .collect()
    }
}

/// An ephemeral entry's value if it has not ended at `now`.
fn live_ephemeral(raw: &[u8], now: Millis) -> Option<Vec<u8>> {
    let (end, value) = raw.split_at_checked(8)?;
    let end = u64::from_be_bytes(end.try_into().ok()?);
    (end > now).then(|| value.to_vec())
}

/// The console's short-lived secrets (see [`Store::put_ephemeral`]).
impl SledCore {
    fn put_ephemeral(
        &self,
        key: &[u8; 32],
        value: &[u8],
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        let mut raw = expires_at.to_be_bytes().to_vec();
        raw.extend_from_slice(value);
        self.ephemeral.insert(key, raw).map_err(unavailable)?;
        // Durable in sled itself before the caller goes on (the journal
        // does not carry these): an end mark must not come undone in a
        // crash while its record stays. They are rare (a sign-in, a link,
        // an end mark), so a checkpoint each is cheap.
        self.checkpoint_now()
    }

    fn ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .ephemeral
            .get(key)
            .map_err(unavailable)?
            .and_then(|raw| live_ephemeral(&raw, now)))
    }

    fn take_ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        // `remove` is atomic: of two takers, one gets the value. Made
        // durable in sled itself (the journal does not carry these), so a
        // crash cannot bring back a used link or an ended session.
        let gone = self.ephemeral.remove(key).map_err(unavailable)?;
        if gone.is_some() {
            self.checkpoint_now()?;
        }
        Ok(gone.and_then(|raw| live_ephemeral(&raw, now)))
    }

    fn purge_ephemeral(&self, now: Millis) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in &self.ephemeral {
            let (k, raw) = item.map_err(unavailable)?;
            // Only the value read: one renewed meanwhile is kept.
            if live_ephemeral(&raw, now).is_none()
                && self
                    .ephemeral
                    .compare_and_swap(k, Some(raw), None as Option<&[u8]>)
                    .map_err(unavailable)?
                    .is_ok()
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    fn apply(&self, batch: Batch) -> Applying {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match &self.writer {
            Some(w) => {
                if let Err(std::sync::mpsc::SendError((_, tx))) = w.send((batch, tx)) {
                    let _ = tx.send(Err(unavailable("the store's writer stopped")));
                }
            }
            None => {
                let _ = tx.send(Err(unavailable("the store is closing")));
            }
        }
        rx
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // Every group is durable in the journal before its outcome is sent.
        self.core.sync_now()
    }

    async fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.core.lease(id)
    }

    async fn leases_of(
        &self,
        subject: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.core.leases_of(subject, after, limit)
    }

    async fn children(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.core.children(parent, after, limit)
    }

    async fn signed_by(
        &self,
        kid: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.core.signed_by(kid, after, limit)
    }

    async fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        self.core.request(id)
    }

    async fn open_requests(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        self.core.open_requests(after, limit)
    }

    async fn open_requests_of(
        &self,
        who: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        self.core.open_requests_of(who, after, limit)
    }

    async fn due(&self, index: Due, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.core.due(index, now, limit)
    }

    async fn next_deadline(&self, index: Due) -> Result<Option<Millis>, StoreError> {
        self.core.next_deadline(index)
    }

    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        // sled counts a tree by walking it: on a blocking thread.
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || core.counts())
            .await
            .map_err(unavailable)
    }

    async fn audit_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.core.audit_after(after, limit)
    }

    async fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.core.audit_last()
    }

    async fn checkpoints(&self, after: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.core.checkpoints(after, to)
    }

    async fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .core
            .checkpoints
            .last()
            .map_err(unavailable)?
            .map(|(k, v)| (seq_of(&k), v.to_vec())))
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.core.keys()
    }

    async fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.core.meta_value(name)
    }

    async fn put_ephemeral(
        &self,
        key: &[u8; 32],
        value: &[u8],
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        let (core, key, value) = (self.core.clone(), *key, value.to_vec());
        tokio::task::spawn_blocking(move || core.put_ephemeral(&key, &value, expires_at))
            .await
            .map_err(unavailable)?
    }

    async fn ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        self.core.ephemeral(key, now)
    }

    async fn take_ephemeral(
        &self,
        key: &[u8; 32],
        now: Millis,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (core, key) = (self.core.clone(), *key);
        tokio::task::spawn_blocking(move || core.take_ephemeral(&key, now))
            .await
            .map_err(unavailable)?
    }

    async fn purge_ephemeral(&self, now: Millis) -> Result<u64, StoreError> {
        self.core.purge_ephemeral(now)
    }

    async fn scan(
        &self,
        table: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        self.core.scan_rows(table, after, limit)
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        // One broker (sled locks its directory): every change is its own.
        None
    }

    async fn lead(&self, _: &str, _: &str, _: u64) -> Result<Option<u64>, StoreError> {
        // One broker: it always leads, in one term that never ends.
        Ok(Some(0))
    }

    async fn resign(&self, _: &str, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

impl SledCore {
    /// A metadata value.
    pub fn meta_value(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .meta
            .get(name.as_bytes())
            .map_err(unavailable)?
            .map(|v| v.to_vec()))
    }

    /// See [`Store::scan`].
    pub fn scan_rows(
        &self,
        table: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        let tree = match table {
            Table::Leases => &self.leases,
            Table::Requests => &self.requests,
            Table::Idempotency => &self.idem,
            Table::Meta => &self.meta,
        };
        let iter = match after {
            Some(a) => tree.range::<Vec<u8>, _>((
                std::ops::Bound::Excluded(a.to_vec()),
                std::ops::Bound::Unbounded,
            )),
            None => tree.iter(),
        };
        iter.take(limit)
            .map(|item| {
                let (k, v) = item.map_err(unavailable)?;
                let row = match table {
                    Table::Leases => Row::Lease(decode_lease(&k, &v)?),
                    Table::Requests => Row::Request(decode("requests", &k, &v)?),
                    Table::Idempotency => Row::Idempotency(decode("idempotency", &k, &v)?),
                    Table::Meta => Row::Meta(String::from_utf8_lossy(&k).into_owned(), v.to_vec()),
                };
                Ok((k.to_vec(), row))
            })
            .collect()
    }

    /// See [`Store::sync`]: every applied group is durable already (the
    /// writer syncs the journal before it answers); what is left is to say
    /// whether the store is healthy.
    pub fn sync_now(&self) -> Result<(), StoreError> {
        // A store whose write failed part-way is not healthy, whatever the
        // disk says now: the group commit reports it, health goes
        // NOT_SERVING, until a restart completes the group.
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(unavailable(
                "the store failed a write or a checkpoint; restart the broker",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Write;
    use crate::store::conformance::{TestWrites as _, lease, put_test_key};

    #[test]
    fn changes_round_trip_through_the_slot_encoding() {
        let changes: Vec<Change> = vec![
            (0, b"l_1".to_vec(), Some(b"record".to_vec())),
            (1, vec![0, 1, 2], Some(Vec::new())),
            (6, b"r_1".to_vec(), None),
        ];
        assert_eq!(decode_changes(&encode_changes(&changes)), Some(changes));
        assert_eq!(
            decode_changes(&[0, 0, 0, 0, 9]),
            None,
            "a cut blob is refused"
        );
    }

    /// Write `batch` as the writer would, up to a crash: the slot and the
    /// first change on disk, the rest not. The group's number.
    fn crash_after_the_slot(s: &SledStore, batch: &Batch) -> u64 {
        let (changes, group_seq) = staged_changes(s, batch);
        s.slot.insert(BATCH_SLOT, encode_changes(&changes)).unwrap();
        SledCore::write_each(&s.batch_trees(), &changes[..1]).unwrap();
        group_seq
    }

    /// The numbers of the records `audit_after(after, limit)` gives.
    async fn seqs(s: &SledStore, after: Option<u64>, limit: usize) -> Vec<u64> {
        s.audit_after(after, limit)
            .await
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect()
    }

    /// A grant of lease `id` (expiring at 10) with its record.
    fn granted(id: &str) -> Batch {
        Batch {
            writes: vec![Write::CreateLease {
                lease: lease(id, "spiffe://t/a", 10),
                idem: None,
            }],
            audit: vec![format!(r#"{{"at":1,"actor":"a","action":"token.granted","target":"{id}","scopes":[],"outcome":"ok","reason":"","rule":"","peer":"","call_id":""}}"#).into_bytes()],
            fence: None,
        }
    }

    /// `batch` checked and chained as the writer would, as the next group:
    /// its changes, the group number last, and that number.
    fn staged_changes(s: &SledStore, batch: &Batch) -> (Vec<Change>, u64) {
        let head = s.lock_head().unwrap().head.clone();
        let mut keys = std::collections::HashMap::new();
        let group = Overlay::default();
        let mut staged = Staged {
            trees: s.batch_trees(),
            keys: &mut keys,
            group: &[],
            group_at: &group,
            changes: Vec::new(),
            overlay: Overlay::default(),
        };
        let (applied, _) = apply_to(&mut staged, &head, batch).unwrap();
        assert!(matches!(applied, Applied::Done(_)));
        let group_seq = s.stored_seq().unwrap() + 1;
        staged.changes.push((
            META as u8,
            GROUP_SEQ.as_bytes().to_vec(),
            Some(group_seq.to_be_bytes().to_vec()),
        ));
        (staged.changes, group_seq)
    }

    /// A store a build before ids wrote (schema 5, its frames untied) gets
    /// its id only after the groups its journal alone holds were written
    /// into sled.
    #[tokio::test]
    async fn frames_written_before_the_store_had_an_id_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        put_test_key(&s, "k").await;
        let (changes, seq) = staged_changes(&s, &granted("l_1"));
        drop(s);
        // As a schema 5 build left it after a SIGKILL: no id, and a group
        // only its journal holds.
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree("meta").unwrap();
            meta.remove(STORE_ID).unwrap();
            meta.insert("schema_version", b"5").unwrap();
            db.flush().unwrap();
        }
        let payload = encode_changes(&changes);
        let frame = super::super::journal::frame(None, seq, payload.len() as u32, &payload);
        std::fs::write(dir.path().join("journal-1"), frame).unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert!(s.lease("l_1").await.unwrap().is_some());
        assert_eq!(s.stored_seq().unwrap(), seq);
        assert!(s.meta_value(STORE_ID).unwrap().is_some());
        put_test_key(&s, "k2").await;
        assert_eq!(s.meta_value("schema_version").unwrap().unwrap(), b"6");
    }

    /// `store copy` leaves the target its own id (its journal's frames are
    /// tied to it) and its own group number.
    #[tokio::test]
    async fn a_copy_keeps_the_targets_own_id() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = SledStore::open(a.path()).unwrap();
        put_test_key(&from, "k").await;
        from.create_lease(&lease("l_1", "spiffe://t/a", 10), None)
            .await
            .unwrap();
        let to = SledStore::open(b.path()).unwrap();
        let id = to.meta_value(STORE_ID).unwrap().unwrap();
        assert_ne!(from.meta_value(STORE_ID).unwrap().unwrap(), id);
        crate::store::copy::copy(&from, &to).await.unwrap();
        assert_eq!(to.meta_value(STORE_ID).unwrap().unwrap(), id);
        let groups = to.stored_seq().unwrap();
        drop(to);
        let to = SledStore::open(b.path()).unwrap();
        assert!(to.lease("l_1").await.unwrap().is_some());
        assert_eq!(to.stored_seq().unwrap(), groups);
    }

    /// Records copied and compacted away in one batch are not written;
    /// a record that would read as a block is refused.
    #[tokio::test]
    async fn a_group_writes_only_the_records_it_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut writes: Vec<Write> = (1..=5u64)
            .map(|n| Write::CopyAudit(n, format!("{{\"r\":{n}}}").into_bytes()))
            .collect();
        writes.push(Write::CompactAudit(3));
        let batch = Batch {
            writes,
            ..Batch::default()
        };
        assert!(matches!(
            s.apply_now(batch).await.unwrap(),
            Applied::Done(_)
        ));
        let left: Vec<u64> = seqs(&s, None, 10).await;
        assert_eq!(left, vec![4, 5]);
        let marker = Batch {
            writes: vec![Write::CopyAudit(6, vec![AUDIT_BLOCK, 1, 2])],
            ..Batch::default()
        };
        assert!(matches!(
            s.apply_now(marker).await,
            Err(StoreError::Refused(_))
        ));
        assert_eq!(s.audit_last().await.unwrap().unwrap().0, 5);
    }

    /// Records that share their text are deflated, and come back byte for
    /// byte; a block cut short is corrupt, not fewer records.
    #[test]
    fn a_block_of_similar_records_is_deflated_and_read_back_exactly() {
        let records: Vec<Vec<u8>> = (0..15)
            .map(|n| format!(r#"{{"action":"token.granted","actor":"spiffe://portcullis.dev/ns/demo/sa/app","call_id":"c_{n:020}","prev":"{:064x}","seq":{n}}}"#, n * 7919).into_bytes())
            .collect();
        let value = audit_block(records.iter().map(Vec::as_slice));
        let plain: usize = records.iter().map(|r| r.len() + 4).sum();
        assert_eq!(value[0], AUDIT_BLOCK_DEFLATED);
        assert!(value.len() * 2 < plain, "{} of {plain} bytes", value.len());
        let back = audit_entry(&40u64.to_be_bytes(), &value).unwrap();
        assert_eq!(back.len(), 15);
        for (i, (seq, bytes)) in back.iter().enumerate() {
            assert_eq!(*seq, 40 + i as u64);
            assert_eq!(bytes, &records[i]);
        }
        assert!(matches!(
            audit_entry(&40u64.to_be_bytes(), &value[..value.len() / 2]),
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// A group's records are one `audit` entry; a store that holds one
    /// record per key (builds before blocks) reads the same, and a
    /// compaction point inside a block keeps the block's later records.
    #[tokio::test]
    async fn records_are_kept_in_blocks_and_read_beside_single_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        for seq in 1..=2u64 {
            // As an older build wrote them.
            s.audit
                .insert(seq.to_be_bytes(), format!("{{\"r\":{seq}}}").as_bytes())
                .unwrap();
        }
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        let batch = Batch {
            writes: (3..=7u64)
                .map(|n| Write::CopyAudit(n, format!("{{\"r\":{n}}}").into_bytes()))
                .collect(),
            ..Batch::default()
        };
        assert!(matches!(
            s.apply_now(batch).await.unwrap(),
            Applied::Done(_)
        ));
        assert_eq!(s.audit.len(), 3, "two single records and one block");
        let all = s.audit_after(None, 100).await.unwrap();
        let numbers: Vec<u64> = all.iter().map(|r| r.0).collect();
        assert_eq!(numbers, (1..=7).collect::<Vec<_>>());
        assert_eq!(all[4].1, br#"{"r":5}"#);
        let page: Vec<u64> = seqs(&s, Some(4), 2).await;
        assert_eq!(page, vec![5, 6]);
        assert_eq!(s.audit_last().await.unwrap().unwrap().0, 7);
        // Two points inside the block in one batch: the second sees the
        // block the first left.
        let compact = Batch {
            writes: vec![Write::CompactAudit(4), Write::CompactAudit(5)],
            audit: vec![br#"{"at":1,"actor":"a","action":"audit.compacted","target":"4","scopes":[],"outcome":"ok","reason":"","rule":"","peer":"","call_id":""}"#.to_vec()],
            fence: None,
        };
        assert!(matches!(
            s.apply_now(compact).await.unwrap(),
            Applied::Done(_)
        ));
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        let left: Vec<u64> = seqs(&s, None, 100).await;
        assert_eq!(left, vec![6, 7, 8]);
        assert_eq!(s.audit_after(Some(6), 1).await.unwrap()[0].0, 7);
        assert_eq!(s.audit_after(Some(6), 1).await.unwrap()[0].1, br#"{"r":7}"#);
    }

    /// A group that reached the journal but not sled (a SIGKILL before
    /// sled wrote out its buffer) is written into sled at the next open,
    /// whole, its records chained where they were.
    #[tokio::test]
    async fn a_group_only_the_journal_holds_is_written_again_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        put_test_key(&s, "k").await;
        let (changes, seq) = staged_changes(&s, &granted("l_1"));
        s.lock_head()
            .unwrap()
            .journal
            .append(seq, &encode_changes(&changes))
            .unwrap();
        s.sync().await.unwrap();
        assert!(s.lease("l_1").await.unwrap().is_none(), "sled never saw it");
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert!(s.lease("l_1").await.unwrap().is_some());
        assert_eq!(s.due(Due::Leases, 10, 10).await.unwrap(), vec!["l_1"]);
        let (n, bytes) = s.audit_last().await.unwrap().unwrap();
        assert_eq!(n, 1);
        assert!(String::from_utf8(bytes).unwrap().contains("token.granted"));
        assert_eq!(s.stored_seq().unwrap(), seq);
        // Written again at the next open, it is not written twice.
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.audit_after(None, 10).await.unwrap().len(), 1);
        put_test_key(&s, "k2").await;
        assert_eq!(s.stored_seq().unwrap(), seq + 1);
    }

    /// What a crash in the middle of writing a batch leaves — its slot and
    /// only the first of its changes — is completed at the next open.
    #[tokio::test]
    async fn a_batch_a_crash_cut_short_is_completed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        put_test_key(&s, "k").await;
        s.create_lease(&lease("l_1", "spiffe://t/a", 10), None)
            .await
            .unwrap();
        let l1 = s.lease("l_1").await.unwrap().unwrap();
        let mut revoked = l1.clone();
        revoked.state = LeaseState::Revoked;
        let batch = Batch {
            writes: vec![
                Write::SwapLease { old: l1, new: revoked },
                Write::CreateLease { lease: lease("l_2", "spiffe://t/b", 20), idem: None },
            ],
            audit: vec![br#"{"at":1,"actor":"a","action":"lease.revoked","target":"l_1","scopes":[],"outcome":"ok","reason":"","rule":"","peer":"","call_id":""}"#.to_vec()],
            fence: None,
        };
        let group_seq = crash_after_the_slot(&s, &batch);
        s.sync().await.unwrap();
        assert!(s.lease("l_2").await.unwrap().is_none());
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            s.lease("l_1").await.unwrap().unwrap().state,
            LeaseState::Revoked
        );
        assert!(s.lease("l_2").await.unwrap().is_some());
        assert_eq!(
            s.due(Due::Leases, 15, 10).await.unwrap(),
            Vec::<String>::new(),
            "l_1 left the expiry index"
        );
        let (seq, bytes) = s.audit_last().await.unwrap().unwrap();
        assert_eq!(seq, 1);
        assert!(String::from_utf8(bytes).unwrap().contains("lease.revoked"));
        assert_eq!(
            s.stored_seq().unwrap(),
            group_seq,
            "the group's number is written last"
        );
        // The next batch chains after the completed one.
        put_test_key(&s, "k2").await;
        assert_eq!(s.lock_head().unwrap().head.seq, 1);
    }
}

//! Moving a store to another backend (sled → PostgreSQL when a team
//! outgrows one machine, or back): every key, metadata value, lease,
//! request, idempotency entry, audit record and checkpoint, through the
//! [`Store`] contract, so any backend can be either side.
//!
//! Records are copied as they mean, not as they are encoded: a lease the
//! source holds as schema-1 JSON arrives in the target's current encoding.
//! Audit records and checkpoints are copied byte for byte (their hashes
//! and signatures cover those bytes), so the trail verifies after the move.
//! Both stores must be quiet: stop every broker on the source first (sled's
//! lock enforces it for sled; nothing can for PostgreSQL).

use super::batch::write_one;
use super::{Applied, Batch, Store, StoreError, Table, Write};
use crate::store::Row;

/// Rows read per page.
const PAGE: usize = 1000;

/// What was copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Signing keys (sealed as they were).
    pub keys: u64,
    /// Metadata values.
    pub meta: u64,
    /// Leases.
    pub leases: u64,
    /// Requests.
    pub requests: u64,
    /// Idempotency entries.
    pub idempotency: u64,
    /// Audit records.
    pub audit: u64,
    /// Audit checkpoints.
    pub checkpoints: u64,
}

/// Metadata the target manages itself: its layout, the id its journal
/// frames are tied to, and the number of its last group (sled).
const OWN_META: &[&str] = &["schema_version", "store_id", "batch_seq"];

/// Copy everything in `from` into `to`, which must be empty, and make it
/// durable. Refuses a target that already holds keys, leases or a trail.
pub async fn copy(from: &dyn Store, to: &dyn Store) -> Result<Copied, StoreError> {
    if !to.keys().await?.is_empty()
        || to.audit_last().await?.is_some()
        || !to.scan(Table::Leases, None, 1).await?.is_empty()
        || !to.scan(Table::Requests, None, 1).await?.is_empty()
    {
        return Err(StoreError::Refused(
            "the target store is not empty; copy only into a new one".into(),
        ));
    }
    let mut n = Copied::default();
    for key in from.keys().await? {
        write_one(to, Write::PutKey(key)).await?;
        n.keys += 1;
    }
    for table in [
        Table::Meta,
        Table::Leases,
        Table::Requests,
        Table::Idempotency,
    ] {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = from.scan(table, after.as_deref(), PAGE).await?;
            let done = page.len() < PAGE;
            let mut batch = Batch::default();
            for (key, row) in page {
                count(&row, &mut n);
                if !matches!(&row, Row::Meta(name, _) if OWN_META.contains(&name.as_str())) {
                    batch.writes.push(Write::CopyRow(row));
                }
                after = Some(key);
            }
            apply_all(to, batch).await?;
            if done {
                break;
            }
        }
    }
    copy_trail(from, to, &mut n).await?;
    to.sync().await?;
    check(from, to).await?;
    Ok(n)
}

/// The trail, byte for byte, a page per batch; then its checkpoints.
async fn copy_trail(from: &dyn Store, to: &dyn Store, n: &mut Copied) -> Result<(), StoreError> {
    let mut after = None;
    loop {
        let page = from.audit_after(after, PAGE).await?;
        let done = page.len() < PAGE;
        let mut batch = Batch::default();
        for (seq, bytes) in page {
            batch.writes.push(Write::CopyAudit(seq, bytes));
            after = Some(seq);
            n.audit += 1;
        }
        apply_all(to, batch).await?;
        if done {
            break;
        }
    }
    for (seq, jws) in from.checkpoints(0, u64::MAX).await? {
        write_one(to, Write::PutCheckpoint(seq, jws)).await?;
        n.checkpoints += 1;
    }
    Ok(())
}

/// Count `row` as copied (metadata the target manages is not).
fn count(row: &Row, n: &mut Copied) {
    match row {
        Row::Meta(name, _) if OWN_META.contains(&name.as_str()) => {}
        Row::Meta(..) => n.meta += 1,
        Row::Lease(_) => n.leases += 1,
        Row::Request(_) => n.requests += 1,
        Row::Idempotency(_) => n.idempotency += 1,
    }
}

/// Apply one page; anything lost means the target was not empty.
async fn apply_all(to: &dyn Store, batch: Batch) -> Result<(), StoreError> {
    match super::batch::applied(to.apply(batch)).await? {
        Applied::Done(_) => Ok(()),
        Applied::Lost(lost) => Err(StoreError::Refused(format!(
            "the target already holds a row being copied ({lost:?}); copy only into a new store"
        ))),
    }
}

/// The target now reads back what the source holds: the same newest audit
/// record, checkpoints, keys, and every lease and request.
async fn check(from: &dyn Store, to: &dyn Store) -> Result<(), StoreError> {
    let differs = |what: &str| {
        Err(StoreError::Internal(format!(
            "after the copy the target's {what} differ from the source's"
        )))
    };
    if from.audit_last().await? != to.audit_last().await? {
        return differs("newest audit record");
    }
    if from.checkpoints(0, u64::MAX).await? != to.checkpoints(0, u64::MAX).await? {
        return differs("checkpoints");
    }
    let mut kids = Vec::new();
    for s in [from, to] {
        let mut k: Vec<String> = s.keys().await?.into_iter().map(|k| k.kid).collect();
        k.sort();
        kids.push(k);
    }
    if kids[0] != kids[1] {
        return differs("signing keys");
    }
    for table in [Table::Leases, Table::Requests] {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = from.scan(table, after.as_deref(), PAGE).await?;
            let done = page.len() < PAGE;
            for (key, row) in page {
                let same = match &row {
                    Row::Lease(l) => to.lease(&l.id).await?.as_ref() == Some(l),
                    Row::Request(r) => to.request(&r.id).await?.as_ref() == Some(r),
                    _ => true,
                };
                if !same {
                    return differs("leases or requests");
                }
                after = Some(key);
            }
            if done {
                break;
            }
        }
    }
    Ok(())
}

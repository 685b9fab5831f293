//! In-memory [`Store`]: the test double and the reference model for the
//! conformance suite. `sync` is a no-op: nothing here survives a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use super::batch::{Applied, Applying, Batch, ChainHead, Tables, apply_to, decided};
use super::{
    Due, Millis, Row, Store, StoreError, Table, deadline_key, idem_key, page_bounds,
    split_deadline_key, subject_key,
};
use crate::model::{Idempotency, KeyRecord, Lease, LeaseState, TokenRequest};

#[derive(Default)]
struct Inner {
    leases: BTreeMap<String, Lease>,
    lease_expiry: BTreeSet<Vec<u8>>,
    by_subject: BTreeSet<Vec<u8>>,
    children: BTreeSet<Vec<u8>>,
    requests: BTreeMap<String, TokenRequest>,
    request_expiry: BTreeSet<Vec<u8>>,
    requests_open: BTreeSet<String>,
    /// (party, id) of open requests ([`TokenRequest::parties`]).
    requests_open_by: BTreeSet<(String, String)>,
    idem: BTreeMap<Vec<u8>, Idempotency>,
    keys: BTreeMap<String, KeyRecord>,
    audit: BTreeMap<u64, Vec<u8>>,
    checkpoints: BTreeMap<u64, Vec<u8>>,
    meta: BTreeMap<String, Vec<u8>>,
    ephemeral: BTreeMap<[u8; 32], (Vec<u8>, Millis)>,
    head: Option<ChainHead>,
}

impl Inner {
    fn index(&self, index: Due) -> &BTreeSet<Vec<u8>> {
        match index {
            Due::Leases => &self.lease_expiry,
            Due::Requests => &self.request_expiry,
        }
    }

    fn head(&self) -> ChainHead {
        self.head.clone().unwrap_or_else(|| {
            ChainHead::after(
                self.audit
                    .iter()
                    .next_back()
                    .map(|(k, v)| (*k, v.clone()))
                    .as_ref(),
            )
        })
    }
}

/// The writes of a batch on `Inner` itself, indexes kept in step.
impl Tables for Inner {
    fn lease(&mut self, id: &str) -> Result<Option<Lease>, StoreError> {
        Ok(self.leases.get(id).cloned())
    }

    fn put_lease(&mut self, old: Option<&Lease>, new: &Lease) -> Result<(), StoreError> {
        if let Some(o) = old
            && o.state == LeaseState::Active
        {
            self.lease_expiry.remove(&deadline_key(o.expires_at, &o.id));
        }
        if new.state == LeaseState::Active {
            self.lease_expiry
                .insert(deadline_key(new.expires_at, &new.id));
        }
        self.by_subject.insert(subject_key(&new.subject, &new.id));
        if let Some(d) = &new.delegation {
            self.children.insert(subject_key(&d.parent_id, &new.id));
        }
        self.leases.insert(new.id.clone(), new.clone());
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        Ok(self.requests.get(id).cloned())
    }

    fn put_request(
        &mut self,
        old: Option<&TokenRequest>,
        new: &TokenRequest,
    ) -> Result<(), StoreError> {
        if let Some(o) = old.filter(|o| !o.state.is_terminal()) {
            self.request_expiry.remove(&deadline_key(o.deadline, &o.id));
        }
        if !new.state.is_terminal() {
            self.request_expiry
                .insert(deadline_key(new.deadline, &new.id));
        }
        if let Some(o) = old {
            for p in o.parties() {
                self.requests_open_by.remove(&(p.to_owned(), o.id.clone()));
            }
        }
        if new.is_open() {
            self.requests_open.insert(new.id.clone());
            for p in new.parties() {
                self.requests_open_by.insert((p.to_owned(), new.id.clone()));
            }
        } else {
            self.requests_open.remove(&new.id);
        }
        self.requests.insert(new.id.clone(), new.clone());
        Ok(())
    }

    fn idempotency(&mut self, caller: &str, key: &str) -> Result<Option<Idempotency>, StoreError> {
        Ok(self.idem.get(&idem_key(caller, key)).cloned())
    }

    fn put_idempotency(&mut self, entry: &Idempotency) -> Result<(), StoreError> {
        self.idem
            .insert(idem_key(&entry.caller, &entry.key), entry.clone());
        Ok(())
    }

    fn key(&mut self, kid: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.keys.get(kid).cloned())
    }

    fn put_key(&mut self, key: &KeyRecord) -> Result<(), StoreError> {
        self.keys.insert(key.kid.clone(), key.clone());
        Ok(())
    }

    fn delete_key(&mut self, kid: &str) -> Result<(), StoreError> {
        self.keys.remove(kid);
        Ok(())
    }

    fn put_meta(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(name.to_owned(), value.to_vec());
        Ok(())
    }

    fn put_checkpoint(&mut self, seq: u64, jws: &[u8]) -> Result<(), StoreError> {
        self.checkpoints.insert(seq, jws.to_vec());
        Ok(())
    }

    fn put_audit(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.audit.insert(seq, bytes.to_vec());
        Ok(())
    }

    fn delete_lease(&mut self, l: &Lease) -> Result<(), StoreError> {
        self.lease_expiry.remove(&deadline_key(l.expires_at, &l.id));
        self.by_subject.remove(&subject_key(&l.subject, &l.id));
        if let Some(d) = &l.delegation {
            self.children.remove(&subject_key(&d.parent_id, &l.id));
        }
        self.leases.remove(&l.id);
        Ok(())
    }

    fn delete_request(&mut self, r: &TokenRequest) -> Result<(), StoreError> {
        self.request_expiry.remove(&deadline_key(r.deadline, &r.id));
        self.requests_open.remove(&r.id);
        for p in r.parties() {
            self.requests_open_by.remove(&(p.to_owned(), r.id.clone()));
        }
        self.requests.remove(&r.id);
        Ok(())
    }

    fn compact_audit(&mut self, seq: u64) -> Result<(), StoreError> {
        // The head outlives the records it hangs from.
        self.head = Some(self.head());
        self.audit.retain(|k, _| *k > seq);
        self.checkpoints.retain(|k, _| *k >= seq);
        Ok(())
    }
}

/// A batch tried against `Inner` without touching it: reads see the
/// batch's own earlier writes, writes go nowhere else. Only what a later
/// check reads is kept.
struct Trial<'a> {
    base: &'a Inner,
    leases: BTreeMap<String, Option<Lease>>,
    requests: BTreeMap<String, Option<TokenRequest>>,
    idem: BTreeSet<Vec<u8>>,
    keys: BTreeMap<String, Option<KeyRecord>>,
}

impl Tables for Trial<'_> {
    fn lease(&mut self, id: &str) -> Result<Option<Lease>, StoreError> {
        Ok(match self.leases.get(id) {
            Some(l) => l.clone(),
            None => self.base.leases.get(id).cloned(),
        })
    }

    fn put_lease(&mut self, _: Option<&Lease>, new: &Lease) -> Result<(), StoreError> {
        self.leases.insert(new.id.clone(), Some(new.clone()));
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        Ok(match self.requests.get(id) {
            Some(r) => r.clone(),
            None => self.base.requests.get(id).cloned(),
        })
    }

    fn put_request(
        &mut self,
        _: Option<&TokenRequest>,
        new: &TokenRequest,
    ) -> Result<(), StoreError> {
        self.requests.insert(new.id.clone(), Some(new.clone()));
        Ok(())
    }

    fn idempotency(&mut self, caller: &str, key: &str) -> Result<Option<Idempotency>, StoreError> {
        let k = idem_key(caller, key);
        // A key this batch claimed itself reads as taken, by a placeholder
        // (a batch never claims one key twice).
        Ok(self.base.idem.get(&k).cloned().or_else(|| {
            self.idem.contains(&k).then(|| Idempotency {
                caller: caller.to_owned(),
                key: key.to_owned(),
                params_digest: String::new(),
                outcome: crate::model::IdempotentOutcome::Request(String::new()),
            })
        }))
    }

    fn put_idempotency(&mut self, entry: &Idempotency) -> Result<(), StoreError> {
        self.idem.insert(idem_key(&entry.caller, &entry.key));
        Ok(())
    }

    fn key(&mut self, kid: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(match self.keys.get(kid) {
            Some(k) => k.clone(),
            None => self.base.keys.get(kid).cloned(),
        })
    }

    fn put_key(&mut self, key: &KeyRecord) -> Result<(), StoreError> {
        self.keys.insert(key.kid.clone(), Some(key.clone()));
        Ok(())
    }

    fn delete_key(&mut self, kid: &str) -> Result<(), StoreError> {
        self.keys.insert(kid.to_owned(), None);
        Ok(())
    }

    fn put_meta(&mut self, _: &str, _: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn put_checkpoint(&mut self, _: u64, _: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn put_audit(&mut self, _: u64, _: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn delete_lease(&mut self, l: &Lease) -> Result<(), StoreError> {
        self.leases.insert(l.id.clone(), None);
        Ok(())
    }

    fn delete_request(&mut self, r: &TokenRequest) -> Result<(), StoreError> {
        self.requests.insert(r.id.clone(), None);
        Ok(())
    }

    fn compact_audit(&mut self, _: u64) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store that lives in process memory.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    /// Apply `batch` under the one lock: readers see all of a batch or
    /// none of it. The batch is tried first on a view, so a lost check
    /// leaves nothing behind.
    fn apply_now(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let mut g = self.lock()?;
        let head = g.head();
        let mut trial = Trial {
            base: &g,
            leases: BTreeMap::new(),
            requests: BTreeMap::new(),
            idem: BTreeSet::new(),
            keys: BTreeMap::new(),
        };
        if let (Applied::Lost(lost), _) = apply_to(&mut trial, &head, batch)? {
            return Ok(Applied::Lost(lost));
        }
        let (applied, head) = apply_to(&mut *g, &head, batch)?;
        g.head = Some(head);
        Ok(applied)
    }

    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Internal("memory store lock poisoned".into()))
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    fn apply(&self, batch: Batch) -> Applying {
        decided(self.apply_now(&batch))
    }

    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        Ok(self.lock()?.leases.get(id).cloned())
    }

    async fn leases_of(
        &self,
        subject: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let g = self.lock()?;
        let (prefix, start) = page_bounds(subject, after);
        Ok(g.by_subject
            .range(start..)
            .take_while(|k| k.starts_with(&prefix))
            .filter_map(|k| {
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                g.leases.get(&id).cloned()
            })
            .take(limit)
            .collect())
    }

    async fn children(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (prefix, start) = page_bounds(parent, after);
        Ok(self
            .lock()?
            .children
            .range(start..)
            .take_while(|k| k.starts_with(&prefix))
            .map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .take(limit)
            .collect())
    }

    async fn signed_by(
        &self,
        kid: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let g = self.lock()?;
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_owned()));
        Ok(g.leases
            .range((start, Bound::Unbounded))
            .filter(|(_, l)| l.kid == kid && l.state == LeaseState::Active)
            .map(|(id, _)| id.clone())
            .take(limit)
            .collect())
    }

    async fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        Ok(self.lock()?.requests.get(id).cloned())
    }

    async fn open_requests(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        let g = self.lock()?;
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_owned()));
        Ok(g.requests_open
            .range((start, Bound::Unbounded))
            .filter_map(|id| g.requests.get(id).cloned())
            .take(limit)
            .collect())
    }

    async fn open_requests_of(
        &self,
        who: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        let g = self.lock()?;
        let from = (who.to_owned(), after.unwrap_or_default().to_owned());
        let start = if after.is_some() {
            Bound::Excluded(from)
        } else {
            Bound::Included(from)
        };
        Ok(g.requests_open_by
            .range((start, Bound::Unbounded))
            .take_while(|(p, _)| p == who)
            .filter_map(|(_, id)| g.requests.get(id).cloned())
            .take(limit)
            .collect())
    }

    async fn due(&self, index: Due, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        let g = self.lock()?;
        Ok(g.index(index)
            .iter()
            .map_while(|k| split_deadline_key(k).filter(|(at, _)| *at <= now))
            .take(limit)
            .map(|(_, id)| id)
            .collect())
    }

    async fn next_deadline(&self, index: Due) -> Result<Option<Millis>, StoreError> {
        let g = self.lock()?;
        Ok(g.index(index)
            .iter()
            .next()
            .and_then(|k| split_deadline_key(k))
            .map(|(at, _)| at))
    }

    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let g = self.lock()?;
        Ok((g.lease_expiry.len() as u64, g.requests_open.len() as u64))
    }

    async fn audit_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let g = self.lock()?;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(g.audit
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    async fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()?
            .audit
            .iter()
            .next_back()
            .map(|(k, v)| (*k, v.clone())))
    }

    async fn checkpoints(&self, after: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if after >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .lock()?
            .checkpoints
            .range((Bound::Excluded(after), Bound::Included(to)))
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    async fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()?
            .checkpoints
            .iter()
            .next_back()
            .map(|(k, v)| (*k, v.clone())))
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        Ok(self.lock()?.keys.values().cloned().collect())
    }

    async fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.meta.get(name).cloned())
    }

    async fn put_ephemeral(
        &self,
        key: &[u8; 32],
        value: &[u8],
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        self.lock()?
            .ephemeral
            .insert(*key, (value.to_vec(), expires_at));
        Ok(())
    }

    async fn ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .lock()?
            .ephemeral
            .get(key)
            .filter(|(_, end)| *end > now)
            .map(|(v, _)| v.clone()))
    }

    async fn take_ephemeral(
        &self,
        key: &[u8; 32],
        now: Millis,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .lock()?
            .ephemeral
            .remove(key)
            .filter(|(_, end)| *end > now)
            .map(|(v, _)| v))
    }

    async fn purge_ephemeral(&self, now: Millis) -> Result<u64, StoreError> {
        let mut inner = self.lock()?;
        let before = inner.ephemeral.len();
        inner.ephemeral.retain(|_, (_, end)| *end > now);
        Ok((before - inner.ephemeral.len()) as u64)
    }

    async fn scan(
        &self,
        table: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        Ok(scan_page(&*self.lock()?, table, after, limit))
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        // One broker: every change is its own.
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

/// A page of `table` for [`Store::scan`].
fn scan_page(g: &Inner, table: Table, after: Option<&[u8]>, limit: usize) -> Vec<(Vec<u8>, Row)> {
    fn page<V: Clone>(
        map: &BTreeMap<Vec<u8>, V>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Vec<(Vec<u8>, V)> {
        map.iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    fn bytes<V: Clone>(map: &BTreeMap<String, V>) -> BTreeMap<Vec<u8>, V> {
        map.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect()
    }
    match table {
        Table::Leases => page(&bytes(&g.leases), after, limit)
            .into_iter()
            .map(|(k, l)| (k, Row::Lease(l)))
            .collect(),
        Table::Requests => page(&bytes(&g.requests), after, limit)
            .into_iter()
            .map(|(k, r)| (k, Row::Request(r)))
            .collect(),
        Table::Idempotency => page(&g.idem, after, limit)
            .into_iter()
            .map(|(k, i)| (k, Row::Idempotency(i)))
            .collect(),
        Table::Meta => page(&bytes(&g.meta), after, limit)
            .into_iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Row::Meta(String::from_utf8_lossy(&k).into_owned(), v),
                )
            })
            .collect(),
    }
}

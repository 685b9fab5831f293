//! How [`Store::apply`](crate::store::Store::apply) runs on PostgreSQL:
//! several batches per transaction, one transaction per group commit.
//!
//! Batches from every caller of this broker queue up for one committer
//! task, which takes all that are waiting and runs them in one transaction
//! on one connection, at the server's durable `synchronous_commit` level:
//! per batch one round trip, pipelined — a savepoint; the fence check (`FOR
//! SHARE` on this broker's leadership row, so a takeover waits for this
//! commit); the signing keys of new leases (`FOR SHARE`, so an emergency
//! withdrawal waits, and a withdrawn key is seen); then every write, each
//! reporting whether it took (`RETURNING 1`). A batch whose check failed,
//! or whose statement failed, is rolled back to its savepoint — it alone.
//! Then, in one last round trip: the records of every batch that stayed,
//! numbered and hash-chained in order by one statement under the
//! `audit_head` row lock, the notices for other brokers, and `COMMIT`. So
//! a batch is all there or not at all, with its records; the chain lock is
//! taken once per group and held for the last round trip only; and when
//! `apply` returns, the batch is durable (the barrier has nothing left to
//! do). Batches that arrive meanwhile form the next group.

use std::future::Future;
use std::pin::Pin;

use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::connect::{self, Target};
use super::{LeaseRow, Params, RequestRow, ms, pg_err, refs};
use crate::model::{Idempotency, KeyRecord, Lease};
use crate::store::batch::{Applied, Batch, Fence, Lost, Write, key_signs};
use crate::store::{StoreError, decode, decode_lease, encode};

const FENCE: &str = "SELECT 1 FROM leadership
     WHERE role = $1 AND holder = $2 AND generation = $3 AND expires_at > now() FOR SHARE";
const KEYS: &str = "SELECT kid, record FROM keys WHERE kid = ANY($1) FOR SHARE";
const CLAIM: &str = "INSERT INTO idempotency (caller, key, record) VALUES ($1, $2, $3)
     ON CONFLICT DO NOTHING RETURNING 1";
const LEASE_NEW: &str =
    "INSERT INTO leases (id, subject, active, expires_at, kid, ended_at, record, parent_id)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING RETURNING 1";
const LEASE_SWAP: &str = "UPDATE leases
     SET active = $3, expires_at = $4, kid = $5, ended_at = $6, record = $7
     WHERE id = $1 AND record = $2 RETURNING 1";
const REQUEST_NEW: &str = "INSERT INTO requests
     (id, live, deadline, open, ended_at, record, requester, made_by)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING RETURNING 1";
const REQUEST_SWAP: &str = "UPDATE requests
     SET live = $3, deadline = $4, open = $5, ended_at = $6, record = $7,
         requester = $8, made_by = $9
     WHERE id = $1 AND record = $2 RETURNING 1";
const LEASE_DELETE: &str = "DELETE FROM leases WHERE id = $1 AND record = $2 RETURNING 1";
const REQUEST_DELETE: &str = "DELETE FROM requests WHERE id = $1 AND record = $2 RETURNING 1";
/// Retention of the trail: records up to the point, checkpoints before it.
const AUDIT_COMPACT: &str = "WITH c AS (DELETE FROM audit_checkpoints WHERE seq < $1)
     DELETE FROM audit WHERE seq <= $1";
const KEY_PUT: &str = "INSERT INTO keys (kid, record) VALUES ($1, $2)
     ON CONFLICT (kid) DO UPDATE SET record = excluded.record RETURNING 1";
const KEY_DELETE: &str = "DELETE FROM keys WHERE kid = $1 RETURNING 1";
const META_PUT: &str = "INSERT INTO meta (name, value) VALUES ($1, $2)
     ON CONFLICT (name) DO UPDATE SET value = excluded.value RETURNING 1";
// A checkpoint, once written (and perhaps handed to a witness), is never
// replaced.
const CHECKPOINT_PUT: &str = "INSERT INTO audit_checkpoints (seq, jws) VALUES ($1, $2)
     ON CONFLICT (seq) DO NOTHING RETURNING 1";
/// A record copied as it is; the head moves to it.
const AUDIT_COPY: &str = "WITH a AS (INSERT INTO audit (seq, record) VALUES ($1, $2) RETURNING 1)
     UPDATE audit_head SET seq = $1, hash = $3 WHERE id = 1 AND seq < $1 RETURNING 1";
const NOTIFY: &str = "SELECT pg_notify('portcullis', n) FROM unnest($1::text[]) AS n";
/// Number and chain the batch's record bodies (their JSON without the
/// outer braces) after the locked head, exactly as `chain::chained` does,
/// store them, move the head, and return them.
const AUDIT: &str = r#"WITH RECURSIVE
  head AS (SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE),
  body AS (SELECT b, n FROM unnest($1::bytea[]) WITH ORDINALITY AS t(b, n)),
  chain (n, seq, hash, record) AS (
      SELECT 0::bigint, head.seq, head.hash, NULL::bytea FROM head
    UNION ALL
      SELECT body.n, r.seq, encode(sha256(r.record), 'hex'), r.record
      FROM chain JOIN body ON body.n = chain.n + 1,
      LATERAL (SELECT chain.seq + 1 AS seq,
                      convert_to('{"seq":' || (chain.seq + 1)::text || ',', 'UTF8')
                      || body.b
                      || convert_to(',"prev":"' || chain.hash || '"}', 'UTF8') AS record) AS r),
  ins AS (INSERT INTO audit (seq, record) SELECT seq, record FROM chain WHERE n > 0),
  upd AS (UPDATE audit_head SET seq = last.seq, hash = last.hash
          FROM (SELECT seq, hash FROM chain ORDER BY n DESC LIMIT 1) AS last
          WHERE audit_head.id = 1)
SELECT seq, record FROM chain WHERE n > 0 ORDER BY n"#;

/// How a statement's rows answer for the batch.
enum Check {
    /// Nothing to check.
    None,
    /// One row or the fence is stale.
    Fence,
    /// The keys of new leases: each must still sign.
    Keys(Vec<String>),
    /// One row or the key was taken.
    Claim(Idempotency),
    /// One row or lease `id` changed (or exists).
    Lease(String),
    /// One row or request `id` changed (or exists).
    Request(String),
}

/// A statement of the batch, with what its rows must show.
struct Step {
    sql: &'static str,
    params: Params,
    check: Check,
}

fn step(sql: &'static str, params: Params, check: Check) -> Step {
    Step { sql, params, check }
}

fn lease_params(l: &Lease, expected: Option<Vec<u8>>) -> Params {
    let row = LeaseRow::of(l);
    match expected {
        None => vec![
            Box::new(l.id.clone()),
            Box::new(l.subject.clone()),
            Box::new(row.active),
            Box::new(row.expires_at),
            Box::new(l.kid.clone()),
            Box::new(row.ended_at),
            Box::new(row.record),
            Box::new(l.delegation.as_ref().map(|d| d.parent_id.clone())),
        ],
        Some(old) => vec![
            Box::new(l.id.clone()),
            Box::new(old),
            Box::new(row.active),
            Box::new(row.expires_at),
            Box::new(l.kid.clone()),
            Box::new(row.ended_at),
            Box::new(row.record),
        ],
    }
}

fn request_params(
    r: &crate::model::TokenRequest,
    expected: Option<Vec<u8>>,
) -> Result<Params, StoreError> {
    let row = RequestRow::of(r)?;
    let head: Params = match expected {
        None => vec![Box::new(r.id.clone())],
        Some(old) => vec![Box::new(r.id.clone()), Box::new(old)],
    };
    let mut p = head;
    p.extend::<Params>(vec![
        Box::new(row.live),
        Box::new(row.deadline),
        Box::new(row.open),
        Box::new(row.ended_at),
        Box::new(row.record),
        Box::new(r.requester.clone()),
        Box::new(r.made_by().to_owned()),
    ]);
    Ok(p)
}

fn claim(i: &Idempotency) -> Result<Step, StoreError> {
    Ok(step(
        CLAIM,
        vec![
            Box::new(i.caller.clone()),
            Box::new(i.key.clone()),
            Box::new(encode(i)?),
        ],
        Check::Claim(i.clone()),
    ))
}

/// The statements of `w`, and the notices it sends on commit.
fn steps_of(w: &Write, out: &mut Vec<Step>, notices: &mut Vec<String>) -> Result<(), StoreError> {
    match w {
        Write::CreateLease { lease, idem } => {
            if let Some(i) = idem {
                out.push(claim(i)?);
            }
            out.push(step(
                LEASE_NEW,
                lease_params(lease, None),
                Check::Lease(lease.id.clone()),
            ));
        }
        Write::SwapLease { old, new } => out.push(step(
            LEASE_SWAP,
            lease_params(new, Some(crate::store::encode_lease(old))),
            Check::Lease(old.id.clone()),
        )),
        Write::CreateRequest { req, idem } => {
            if let Some(i) = idem {
                out.push(claim(i)?);
            }
            out.push(step(
                REQUEST_NEW,
                request_params(req, None)?,
                Check::Request(req.id.clone()),
            ));
            notices.push(format!("request:{}", req.id));
        }
        Write::SwapRequest { old, new } => {
            out.push(step(
                REQUEST_SWAP,
                request_params(new, Some(encode(old)?))?,
                Check::Request(old.id.clone()),
            ));
            notices.push(format!("request:{}", old.id));
        }
        other => out.push(other_step(other, notices)?),
    }
    Ok(())
}

/// The statement of a write that is not a lease or request change.
fn other_step(w: &Write, notices: &mut Vec<String>) -> Result<Step, StoreError> {
    Ok(match w {
        Write::PutKey(k) => {
            notices.push("keys".into());
            step(
                KEY_PUT,
                vec![Box::new(k.kid.clone()), Box::new(encode(k)?)],
                Check::None,
            )
        }
        Write::DeleteKey(kid) => {
            notices.push("keys".into());
            step(KEY_DELETE, vec![Box::new(kid.clone())], Check::None)
        }
        Write::PutMeta(name, value) => step(
            META_PUT,
            vec![Box::new(name.clone()), Box::new(value.clone())],
            Check::None,
        ),
        Write::PutCheckpoint(seq, jws) => step(
            CHECKPOINT_PUT,
            vec![Box::new(ms(*seq)), Box::new(jws.clone())],
            Check::None,
        ),
        Write::DeleteLease(l) => step(
            LEASE_DELETE,
            vec![
                Box::new(l.id.clone()),
                Box::new(crate::store::encode_lease(l)),
            ],
            Check::Lease(l.id.clone()),
        ),
        Write::DeleteRequest(r) => step(
            REQUEST_DELETE,
            vec![Box::new(r.id.clone()), Box::new(encode(r)?)],
            Check::Request(r.id.clone()),
        ),
        Write::CompactAudit(seq) => step(AUDIT_COMPACT, vec![Box::new(ms(*seq))], Check::None),
        Write::CopyRow(row) => copy_row(row)?,
        Write::CopyAudit(seq, bytes) => step(
            AUDIT_COPY,
            vec![
                Box::new(ms(*seq)),
                Box::new(bytes.clone()),
                Box::new(crate::chain::sha256_hex(bytes)),
            ],
            Check::None,
        ),
        #[cfg(test)]
        Write::Fail => step("SELECT 1 / $1::int", vec![Box::new(0i32)], Check::None),
        // Lease and request changes are `steps_of`'s.
        Write::CreateLease { .. }
        | Write::SwapLease { .. }
        | Write::CreateRequest { .. }
        | Write::SwapRequest { .. } => {
            return Err(StoreError::Internal("not a plain write".into()));
        }
    })
}

/// A row as it is (moving a store): no checks but that it is new.
fn copy_row(row: &crate::store::Row) -> Result<Step, StoreError> {
    use crate::store::Row;
    Ok(match row {
        Row::Lease(l) => step(LEASE_NEW, lease_params(l, None), Check::Lease(l.id.clone())),
        Row::Request(r) => step(
            REQUEST_NEW,
            request_params(r, None)?,
            Check::Request(r.id.clone()),
        ),
        Row::Idempotency(i) => {
            let mut s = claim(i)?;
            s.check = Check::None;
            s
        }
        Row::Meta(name, value) => step(
            META_PUT,
            vec![Box::new(name.clone()), Box::new(value.clone())],
            Check::None,
        ),
    })
}

/// Every statement of `batch` in order, checks first; and its notices.
fn plan(batch: &Batch) -> Result<(Vec<Step>, Vec<String>), StoreError> {
    let mut steps = Vec::new();
    let mut notices = Vec::new();
    if let Some(Fence {
        role,
        holder,
        generation,
    }) = &batch.fence
    {
        steps.push(step(
            FENCE,
            vec![
                Box::new(role.clone()),
                Box::new(holder.clone()),
                Box::new(i64::try_from(*generation).unwrap_or(i64::MAX)),
            ],
            Check::Fence,
        ));
    }
    let mut kids: Vec<String> = batch
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::CreateLease { lease, .. } if lease.state == crate::model::LeaseState::Active => {
                Some(lease.kid.clone())
            }
            Write::SwapLease { old, new } if crate::store::batch::mints(old, new) => {
                Some(new.kid.clone())
            }
            _ => None,
        })
        .collect();
    kids.sort();
    kids.dedup();
    if !kids.is_empty() {
        steps.push(step(KEYS, vec![Box::new(kids.clone())], Check::Keys(kids)));
    }
    for w in &batch.writes {
        steps_of(w, &mut steps, &mut notices)?;
    }
    notices.sort();
    notices.dedup();
    Ok((steps, notices))
}

/// What the rows of one step say: `Some(lost)` when its check failed.
fn verdict(check: &Check, rows: &[tokio_postgres::Row]) -> Result<Option<Lost>, StoreError> {
    Ok(match check {
        Check::None => None,
        Check::Fence => rows.is_empty().then_some(Lost::Fenced),
        Check::Keys(kids) => {
            let mut found = std::collections::BTreeMap::new();
            for r in rows {
                let kid: String = r.try_get(0).map_err(pg_err)?;
                let bytes: Vec<u8> = r.try_get(1).map_err(pg_err)?;
                let rec: KeyRecord = decode("keys", kid.as_bytes(), &bytes)?;
                found.insert(kid, rec);
            }
            kids.iter()
                .find(|k| !key_signs(found.get(*k)))
                .map(|k| Lost::KeyInactive(k.clone()))
        }
        Check::Claim(i) => rows.is_empty().then(|| Lost::Idempotency(i.clone())),
        Check::Lease(id) => rows.is_empty().then(|| Lost::Lease(id.clone())),
        Check::Request(id) => rows.is_empty().then(|| Lost::Request(id.clone())),
    })
}

type RowsFuture<'a> = Pin<
    Box<dyn Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send + 'a>,
>;

/// A batch waiting for the committer, and where its outcome goes.
pub(super) type Queued = (
    Batch,
    tokio::sync::oneshot::Sender<Result<Applied, StoreError>>,
);

/// Most batches in one group transaction: each is a subtransaction, and
/// past 64 of them PostgreSQL's snapshots of this transaction overflow
/// their cache (every other session then pays to look them up).
const GROUP_MAX: usize = 60;

/// The committer's own connection (not the pool's), with the statements
/// it has prepared on it.
pub(super) struct Committing {
    client: tokio_postgres::Client,
    prepared: std::sync::Mutex<std::collections::HashMap<&'static str, Statement>>,
}

impl std::ops::Deref for Committing {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl Committing {
    /// `sql` prepared on this connection (once).
    async fn prepared(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let cached = self.prepared.lock().ok().and_then(|m| m.get(sql).cloned());
        if let Some(s) = cached {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        if let Ok(mut m) = self.prepared.lock() {
            m.insert(sql, s.clone());
        }
        Ok(s)
    }
}

/// Pause before connecting again after the committer's connection failed;
/// doubled after each failure in a row, up to [`RECONNECT_MAX`].
const RECONNECT: std::time::Duration = std::time::Duration::from_millis(200);
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The committer: runs every batch queued so far in one transaction, at
/// `level`, until the queue closes. It drives a connection of its own in
/// the same task (not the pool's, whose driver is a task of its own), on
/// the committer's thread (see `PgStore::connect`), so a statement's answer
/// wakes the committer and nothing else. A failed connection fails the
/// batches in flight and is replaced.
pub(super) async fn committer(target: Target, level: &'static str, mut queue: Queue) {
    let mut pause = RECONNECT;
    loop {
        let connected = connect::timed(async {
            target
                .committing()
                .connect(target.tls.clone())
                .await
                .map_err(pg_err)
        })
        .await;
        let (client, connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                // Nothing can commit meanwhile: say so to whoever waits.
                tracing::warn!(error = %e, "the database committer cannot connect; retrying");
                while let Ok((_, reply)) = queue.try_recv() {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
                if queue.is_closed() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        pause = RECONNECT;
        let c = Committing {
            client,
            prepared: std::sync::Mutex::new(std::collections::HashMap::new()),
        };
        let closed = tokio::select! {
            r = connection => {
                if let Err(e) = r {
                    tracing::warn!(error = %pg_err(e), "the database committer's connection failed; reconnecting");
                }
                false
            }
            closed = serve(&c, level, &mut queue) => closed,
        };
        if closed {
            return;
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Batches on their way to the committer.
type Queue = tokio::sync::mpsc::UnboundedReceiver<Queued>;

/// Run groups on `c` until the queue closes (`true`) or a group fails as a
/// whole (`false`: the connection may be left inside a transaction).
async fn serve(c: &Committing, level: &'static str, queue: &mut Queue) -> bool {
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(q) => group.push(q),
                Err(_) => break,
            }
        }
        // A caller that went away before its batch ran: it is not run (its
        // outcome could reach nobody).
        group.retain(|(_, reply)| !reply.is_closed());
        if group.is_empty() {
            continue;
        }
        let (batches, replies): (Vec<Batch>, Vec<_>) = group.into_iter().unzip();
        match run_group(c, level, &batches).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
                return false;
            }
        }
    }
    true
}

/// One group: every batch under its own savepoint, then the records of
/// those that stayed, then the commit. `Err` when the transaction as a
/// whole failed (no batch of it is there).
///
/// Optimistic: the batches are sent in one pipelined round trip, each
/// after a savepoint of its own (`b<i>`, nested). When batch `j` lost a
/// check or failed, the transaction rolls back to `b<j>` — undoing `j` and
/// everything sent after it — and the batches after `j` are sent again.
/// Losses are rare (a lost race, a retried key), so a group usually costs
/// one round trip for all its batches, plus the last one.
async fn run_group(
    c: &Committing,
    level: &str,
    batches: &[Batch],
) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
    let planned: Vec<Planned> = batches.iter().map(plan).collect();
    let mut outcomes: Vec<Verdict> = Vec::with_capacity(batches.len());
    // The transaction begins in the same round trip as the first batches.
    let mut begin = Some(format!(
        "BEGIN; SET LOCAL synchronous_commit = {level}; SET LOCAL statement_timeout = 0;
         SET LOCAL lock_timeout = '5s'; SET LOCAL idle_in_transaction_session_timeout = '30s'"
    ));
    while outcomes.len() < batches.len() {
        let from = outcomes.len();
        let (stayed, verdict) = send_from(c, begin.take(), &planned, from).await?;
        outcomes.extend((0..stayed).map(|_| Ok(None)));
        let Some((verdict, sent)) = verdict else {
            break;
        };
        // Batch `j` goes, and everything sent after it with it.
        let j = from + stayed;
        if sent {
            c.simple_query(&format!("ROLLBACK TO SAVEPOINT b{j}"))
                .await
                .map_err(pg_err)?;
        }
        outcomes.push(explained(c, &batches[j], verdict).await);
    }
    let mut bodies = Vec::new();
    let mut notices = Vec::new();
    for ((batch, outcome), planned) in batches.iter().zip(&outcomes).zip(&planned) {
        if let (Ok(None), Ok((_, n))) = (outcome, planned) {
            bodies.extend(batch.audit.iter().cloned());
            notices.extend(n.iter().cloned());
        }
    }
    notices.sort();
    notices.dedup();
    let mut records = finish(c, &bodies, &notices).await?.into_iter();
    Ok(batches
        .iter()
        .zip(outcomes)
        .map(|(batch, outcome)| match outcome {
            Ok(None) => Ok(Applied::Done(
                records.by_ref().take(batch.audit.len()).collect(),
            )),
            Ok(Some(lost)) => Ok(Applied::Lost(lost)),
            Err(e) => Err(e),
        })
        .collect())
}

/// What a batch that did not stay tells its caller: for a taken key, the
/// entry that holds it; for a lost swap, the same, after a record stored in
/// an older encoding was brought to today's (so the caller's next try can
/// match).
async fn explained(c: &Committing, batch: &Batch, verdict: Verdict) -> Verdict {
    match verdict {
        Ok(Some(Lost::Idempotency(i))) => existing(c, &i).await.map(|e| Some(Lost::Idempotency(e))),
        Ok(Some(Lost::Lease(id))) => reencode(c, batch, &id)
            .await
            .map(|()| Some(Lost::Lease(id))),
        Ok(Some(Lost::Request(id))) => reencode_request(c, batch, &id)
            .await
            .map(|()| Some(Lost::Request(id))),
        other => other,
    }
}

/// A batch's statements and notices, or why it could not be planned.
type Planned = Result<(Vec<Step>, Vec<String>), StoreError>;
/// A batch's fate: stayed (`None`), lost a check, or failed.
type Verdict = Result<Option<Lost>, StoreError>;

/// Send batches `from..` in one pipelined round trip (after `begin`, if
/// given), each after its own savepoint. How many stayed, in order, before
/// the first that did not; and that one's verdict (`None` when all stayed)
/// with whether it was sent (one that could not be planned was not).
async fn send_from(
    c: &Committing,
    begin: Option<String>,
    planned: &[Planned],
    from: usize,
) -> Result<(usize, Option<(Verdict, bool)>), StoreError> {
    let (sendable, unplanned) = sendable_from(planned, from);
    // Statements prepared (cached per connection) before anything is
    // sent, so that each request goes out whole, in order.
    let mut stmts = Vec::with_capacity(sendable.len());
    for steps in &sendable {
        let mut mine = Vec::with_capacity(steps.len());
        for s in steps.iter() {
            mine.push(c.prepared(s.sql).await.map_err(pg_err)?);
        }
        stmts.push(mine);
    }
    let params: Vec<Vec<Vec<&(dyn ToSql + Sync)>>> = sendable
        .iter()
        .map(|steps| steps.iter().map(|s| refs(&s.params)).collect())
        .collect();
    let names: Vec<String> = (from..from + sendable.len())
        .map(|i| format!("SAVEPOINT b{i}"))
        .collect();
    let mut sent: Vec<RowsFuture<'_>> = Vec::new();
    let begun = begin.is_some();
    if let Some(sql) = &begin {
        sent.push(Box::pin(async move {
            c.simple_query(sql).await.map(|_| Vec::new())
        }));
    }
    for ((name, batch), p) in names.iter().zip(&stmts).zip(&params) {
        sent.push(Box::pin(async move {
            c.simple_query(name).await.map(|_| Vec::new())
        }));
        for (stmt, p) in batch.iter().zip(p) {
            sent.push(Box::pin(c.query(stmt, p)));
        }
    }
    let mut results = futures_util::future::join_all(sent).await.into_iter();
    if begun {
        // Without a transaction nothing below may stand.
        results
            .next()
            .ok_or_else(|| StoreError::Unavailable("BEGIN went unanswered".into()))?
            .map_err(pg_err)?;
    }
    for (k, steps) in sendable.iter().enumerate() {
        if let Some(v) = verdict_of(steps, &mut results)? {
            return Ok((k, Some((v, true))));
        }
    }
    Ok((sendable.len(), unplanned.map(|e| (Err(e), false))))
}

/// The batches from `from` up to the first that could not be planned, and
/// why that one could not.
fn sendable_from(planned: &[Planned], from: usize) -> (Vec<&[Step]>, Option<StoreError>) {
    let mut sendable: Vec<&[Step]> = Vec::new();
    for p in planned.iter().skip(from) {
        match p {
            Ok((steps, _)) => sendable.push(steps),
            Err(e) => return (sendable, Some(e.clone())),
        }
    }
    (sendable, None)
}

/// The verdict on one sent batch from its results (savepoint first).
fn verdict_of(
    steps: &[Step],
    results: &mut impl Iterator<Item = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
) -> Result<Option<Verdict>, StoreError> {
    let unanswered = || StoreError::Unavailable("a pipelined statement went unanswered".into());
    if let Err(e) = results.next().ok_or_else(unanswered)? {
        return Ok(Some(Err(pg_err(e))));
    }
    let mut found = None;
    for s in steps {
        match results.next().ok_or_else(unanswered)? {
            Ok(rows) => {
                if found.is_none() {
                    found = verdict(&s.check, &rows)?.map(|l| Ok(Some(l)));
                }
            }
            Err(e) => {
                found.get_or_insert(Err(pg_err(e)));
            }
        }
    }
    Ok(found)
}

/// The last round trip: the records under the chain lock, the notices,
/// commit. The records as chained, in order.
async fn finish(
    c: &Committing,
    audit: &[Vec<u8>],
    notices: &[String],
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    if audit.is_empty() && notices.is_empty() {
        // Nothing to chain or announce (a group that only settles, or only
        // copies): no chain lock, and a commit that wrote nothing has no
        // WAL to flush.
        c.simple_query("COMMIT").await.map_err(pg_err)?;
        return Ok(Vec::new());
    }
    let audit_stmt = c.prepared(AUDIT).await.map_err(pg_err)?;
    let notify_stmt = c.prepared(NOTIFY).await.map_err(pg_err)?;
    let inner: Vec<Vec<u8>> = audit
        .iter()
        .map(|b| {
            b.strip_prefix(b"{")
                .and_then(|b| b.strip_suffix(b"}"))
                .unwrap_or(b)
                .to_vec()
        })
        .collect();
    let notices = notices.to_vec();
    let chain_params: [&(dyn ToSql + Sync); 1] = [&inner];
    let notify_params: [&(dyn ToSql + Sync); 1] = [&notices];
    let (chained, notified, committed) = tokio::join!(
        c.query(&audit_stmt, &chain_params),
        c.query(&notify_stmt, &notify_params),
        c.simple_query("COMMIT")
    );
    // A COMMIT after a failed statement rolls back without an error: the
    // statements' own results decide.
    let rows = chained.map_err(pg_err)?;
    notified.map_err(pg_err)?;
    committed.map_err(pg_err)?;
    let mut records = Vec::with_capacity(rows.len());
    for r in rows {
        let seq: i64 = r.try_get(0).map_err(pg_err)?;
        let bytes: Vec<u8> = r.try_get(1).map_err(pg_err)?;
        records.push((u64::try_from(seq).unwrap_or(0), bytes));
    }
    Ok(records)
}

/// The entry that holds `i`'s key.
async fn existing(c: &Committing, i: &Idempotency) -> Result<Idempotency, StoreError> {
    let row = c
        .query_opt(
            "SELECT record FROM idempotency WHERE caller = $1 AND key = $2",
            &[&i.caller, &i.key],
        )
        .await
        .map_err(pg_err)?
        .ok_or_else(|| StoreError::Internal("idempotency key taken but not readable".into()))?;
    let bytes: Vec<u8> = row.try_get(0).map_err(pg_err)?;
    decode("idempotency", i.key.as_bytes(), &bytes)
}

/// [`reencode`] for a request: a request stored by an older build lacks
/// fields today's encoding writes (with their defaults), so its bytes never
/// equal what a swap or a retention delete expects until rewritten.
async fn reencode_request(c: &Committing, batch: &Batch, id: &str) -> Result<(), StoreError> {
    let Some(old) = batch.writes.iter().find_map(|w| match w {
        Write::SwapRequest { old, .. } | Write::DeleteRequest(old) if old.id == id => Some(old),
        _ => None,
    }) else {
        return Ok(());
    };
    let Some(row) = c
        .query_opt("SELECT record FROM requests WHERE id = $1", &[&id])
        .await
        .map_err(pg_err)?
    else {
        return Ok(());
    };
    let stored: Vec<u8> = row.try_get(0).map_err(pg_err)?;
    let decoded: crate::model::TokenRequest = decode("requests", id.as_bytes(), &stored)?;
    if decoded == *old {
        let fresh = encode(old)?;
        if fresh != stored {
            c.execute(
                "UPDATE requests SET record = $3 WHERE id = $1 AND record = $2",
                &[&id, &stored, &fresh],
            )
            .await
            .map_err(pg_err)?;
        }
    }
    Ok(())
}

/// A lease swap compares stored bytes. A lease brought over by a copy may
/// be stored in an older encoding of the same record: store it in today's
/// encoding (the same lease, so no record is due), so the caller's next try
/// compares equal.
async fn reencode(c: &Committing, batch: &Batch, id: &str) -> Result<(), StoreError> {
    let Some(old) = batch.writes.iter().find_map(|w| match w {
        Write::SwapLease { old, .. } | Write::DeleteLease(old) if old.id == id => Some(old),
        _ => None,
    }) else {
        return Ok(());
    };
    let Some(row) = c
        .query_opt("SELECT record FROM leases WHERE id = $1", &[&id])
        .await
        .map_err(pg_err)?
    else {
        return Ok(());
    };
    let stored: Vec<u8> = row.try_get(0).map_err(pg_err)?;
    if decode_lease(id.as_bytes(), &stored)? == *old {
        let fresh = crate::store::encode_lease(old);
        if fresh != stored {
            c.execute(
                "UPDATE leases SET record = $3 WHERE id = $1 AND record = $2",
                &[&id, &stored, &fresh],
            )
            .await
            .map_err(pg_err)?;
        }
    }
    Ok(())
}

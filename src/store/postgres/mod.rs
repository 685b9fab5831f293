//! The shared backend: PostgreSQL, for several brokers on one database.
//!
//! Tables mirror the sled trees (see `schema`); records keep the same
//! encodings. Every method is one statement (or one short transaction), so
//! each is atomic on its own, exactly as the sled methods are.
//!
//! # Durability: asynchronous commits and one barrier per batch
//! Pooled connections run with `synchronous_commit = off`: a write commits
//! (and is visible to every broker) at once, without waiting for the WAL
//! flush. [`Store::sync`] — the group commit's barrier — is one transaction
//! at the server's own level (`on`, or `remote_apply` for a synchronous
//! standby; `on` if the server says `off`) that chains the batch's audit
//! records and writes the chain head. PostgreSQL flushes (and replicates)
//! its WAL in order, so once that commit is durable, every commit before it
//! is too — from any connection of any broker. Nothing is acknowledged
//! before the barrier returns, as with sled.
//!
//! # One trail for every broker
//! The engine does not number records here: it queues their bodies
//! ([`Store::queue_audit`]) and the barrier chains them under a row lock on
//! `audit_head`, held for one transaction per batch. Records of all brokers
//! form one hash chain that `audit verify` checks unchanged.
//!
//! # News from other brokers
//! A changed request or key ring is announced with `pg_notify` in the
//! statement that changed it (delivered on commit); each broker `LISTEN`s
//! on one connection and hands payloads to [`Store::changes`]. Engines that
//! lack `LISTEN/NOTIFY` still work: watchers and the key ring also poll.

mod connect;
mod schema;

use std::sync::Mutex;

use deadpool_postgres::{Object, Pool};
use tokio::sync::broadcast;
use tokio_postgres::types::ToSql;

pub use self::connect::PgOptions;
use self::connect::{Bridge, Target};
pub use self::schema::LATEST as SCHEMA_VERSION;
use super::{
    AuditStore, Idempotency, KeyRecord, KeyStore, Lease, LeaseState, LeaseStore, Millis,
    RequestStore, Row, Store, StoreError, Table, TokenRequest, decode, decode_lease, encode,
    encode_lease,
};
use crate::chain::{chained, sha256_hex};

/// Levels the barrier may run at (the server's default is read at start).
const BARRIER_LEVELS: &[&str] = &["on", "remote_write", "remote_apply", "local"];

/// A client error, with the server's own code and message when it sent
/// one (tokio-postgres displays those as just "db error").
pub(super) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => {
            StoreError::Unavailable(format!("database: {} ({})", db.message(), db.code().code()))
        }
        None => StoreError::Unavailable(format!("database: {e}")),
    }
}

/// A pool error (which may wrap a client error).
fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StoreError::Unavailable(format!("database: {other}")),
    }
}

/// Milliseconds as a `bigint` (saturating: times beyond 2^63 ms do not occur).
fn ms(v: Millis) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> Millis {
    Millis::try_from(v).unwrap_or(0)
}

fn count(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

type PgRow = tokio_postgres::Row;

/// Parameters of one statement, owned (they travel to the client's runtime).
type Params = Vec<Box<dyn ToSql + Send + Sync>>;

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

async fn client(pool: &Pool) -> Result<Object, StoreError> {
    pool.get().await.map_err(pool_err)
}

/// The columns a lease is found by, beside its record.
struct LeaseRow {
    active: bool,
    expires_at: i64,
    ended_at: Option<i64>,
    record: Vec<u8>,
}

impl LeaseRow {
    fn of(l: &Lease) -> Self {
        Self {
            active: l.state == LeaseState::Active,
            expires_at: ms(l.expires_at),
            ended_at: l.ended_at().map(ms),
            record: encode_lease(l),
        }
    }
}

/// The columns a request is found by, beside its record.
struct RequestRow {
    live: bool,
    deadline: i64,
    open: bool,
    ended_at: Option<i64>,
    record: Vec<u8>,
}

impl RequestRow {
    fn of(r: &TokenRequest) -> Result<Self, StoreError> {
        Ok(Self {
            live: !r.state.is_terminal(),
            deadline: ms(r.deadline),
            open: r.is_open(),
            ended_at: r.ended_at().map(ms),
            record: encode(r)?,
        })
    }
}

/// PostgreSQL-backed store shared by several brokers.
pub struct PgStore {
    pool: Pool,
    /// `synchronous_commit` of the barrier transaction.
    barrier: &'static str,
    /// Audit bodies waiting for the next barrier to chain them.
    pending_audit: Mutex<Vec<Vec<u8>>>,
    changes: broadcast::Sender<String>,
    // Last: the runtime stops after everything that runs on it is gone.
    bridge: Bridge,
}

impl PgStore {
    /// Connect, apply migrations (or wait for another broker applying
    /// them), refuse a newer schema, and start listening for news.
    pub fn connect(opts: &PgOptions) -> Result<Self, StoreError> {
        let target = Target::parse(opts)?;
        let bridge = Bridge::new()?;
        let t = target.clone();
        let level = bridge.block(async move {
            let (mut client, connection) = t.config.connect(t.tls.clone()).await.map_err(pg_err)?;
            let driver = tokio::spawn(connection);
            schema::migrate(&mut client).await?;
            let row = client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .map_err(pg_err)?;
            let level: String = row.try_get(0).map_err(pg_err)?;
            drop(client);
            drop(driver);
            Ok(level)
        })?;
        let barrier = match BARRIER_LEVELS.iter().find(|l| **l == level) {
            Some(l) => l,
            None => {
                tracing::warn!(
                    server = %level,
                    "the database's synchronous_commit is not durable; portcullis commits each batch with synchronous_commit=on"
                );
                "on"
            }
        };
        let pool = {
            let _entered = bridge.handle().enter();
            connect::pool(&target, opts.pool_size)?
        };
        let (changes, _) = broadcast::channel(1024);
        bridge
            .handle()
            .spawn(connect::listen(target, changes.clone()));
        Ok(Self {
            pool,
            barrier,
            pending_audit: Mutex::new(Vec::new()),
            changes,
            bridge,
        })
    }

    fn run<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.bridge.block(fut)
    }

    /// The rows of `sql` — prepared once per connection, so a call is one
    /// round trip — with `params`.
    fn fetch(&self, sql: &'static str, params: Params) -> Result<Vec<PgRow>, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let c = client(&pool).await?;
            let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
            c.query(&stmt, &refs(&params)).await.map_err(pg_err)
        })
    }

    /// Column `i` of every row.
    fn column<T>(&self, sql: &'static str, params: Params, i: usize) -> Result<Vec<T>, StoreError>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.fetch(sql, params)?
            .iter()
            .map(|r| r.try_get::<_, T>(i).map_err(pg_err))
            .collect()
    }

    /// Rows of one column of `bytea` records.
    fn records(&self, sql: &'static str, params: Params) -> Result<Vec<Vec<u8>>, StoreError> {
        self.column(sql, params, 0)
    }

    /// Rows of one `text` column.
    fn ids(&self, sql: &'static str, params: Params) -> Result<Vec<String>, StoreError> {
        self.column(sql, params, 0)
    }

    /// One `bigint` (a count, a minimum; `None` for SQL NULL).
    fn number(&self, sql: &'static str, params: Params) -> Result<Option<i64>, StoreError> {
        Ok(self
            .column::<Option<i64>>(sql, params, 0)?
            .into_iter()
            .next()
            .flatten())
    }

    /// `(key, bytea)` rows, the key of type `K`.
    fn pairs<K>(&self, sql: &'static str, params: Params) -> Result<Vec<(K, Vec<u8>)>, StoreError>
    where
        K: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.fetch(sql, params)?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, K>(0).map_err(pg_err)?,
                    r.try_get::<_, Vec<u8>>(1).map_err(pg_err)?,
                ))
            })
            .collect()
    }

    /// `(seq, bytes)` rows of the trail or its checkpoints.
    fn sequenced(
        &self,
        sql: &'static str,
        params: Params,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .pairs::<i64>(sql, params)?
            .into_iter()
            .map(|(seq, b)| (from_ms(seq), b))
            .collect())
    }

    /// `(text key, bytea record)` rows.
    fn keyed(
        &self,
        sql: &'static str,
        params: Params,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.pairs(sql, params)
    }

    /// Rows changed by one statement.
    fn execute(&self, sql: &'static str, params: Params) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let c = client(&pool).await?;
            let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
            c.execute(&stmt, &refs(&params)).await.map_err(pg_err)
        })
    }

    /// Insert a new row with `plain`; with `idem`, with `claiming` instead,
    /// which inserts the row only if it also claims the key (its parameters
    /// follow the row's: caller, key, entry). The entry that already held
    /// the key, when it was taken.
    fn create(
        &self,
        plain: &'static str,
        claiming: &'static str,
        mut params: Params,
        idem: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let Some(i) = idem else {
            self.execute(plain, params)?;
            return Ok(None);
        };
        params.extend::<Params>(vec![
            Box::new(i.caller.clone()),
            Box::new(i.key.clone()),
            Box::new(encode(i)?),
        ]);
        if self.execute(claiming, params)? == 1 {
            Ok(None)
        } else {
            self.existing_idem(i).map(Some)
        }
    }

    fn existing_idem(&self, i: &Idempotency) -> Result<Idempotency, StoreError> {
        let rows = self.records(
            "SELECT record FROM idempotency WHERE caller = $1 AND key = $2",
            vec![Box::new(i.caller.clone()), Box::new(i.key.clone())],
        )?;
        let bytes = rows.first().ok_or_else(|| {
            StoreError::Unavailable("idempotency key taken but not readable".into())
        })?;
        decode("idempotency", i.key.as_bytes(), bytes)
    }

    /// Chain the queued audit bodies after the stored head and commit them
    /// with the head, at the barrier's level.
    async fn barrier(
        pool: Pool,
        level: &'static str,
        bodies: Vec<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let c = client(&pool).await?;
        let result = Self::barrier_on(&c, level, &bodies).await;
        if result.is_err() {
            // It may be left inside a transaction: never hand it out again.
            drop(Object::take(c));
        }
        result
    }

    /// The barrier in two round trips: begin, settings and the locked head
    /// (no statement timeout: a cancelled wait for a synchronous standby
    /// would still report the commit as done); then the records with the
    /// new head, and the commit, pipelined.
    async fn barrier_on(c: &Object, level: &str, bodies: &[Vec<u8>]) -> Result<(), StoreError> {
        let head = c
            .simple_query(&format!(
                "BEGIN; SET LOCAL synchronous_commit = {level}; SET LOCAL statement_timeout = 0;
                 SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
            ))
            .await
            .map_err(pg_err)?;
        let Some((mut seq, mut prev)) = head.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                r.get(0).and_then(|v| v.parse::<u64>().ok())?,
                r.get(1)?.to_owned(),
            )),
            _ => None,
        }) else {
            return Err(StoreError::Corrupt {
                tree: "audit_head",
                key: "1".into(),
                detail: "no chain head row".into(),
            });
        };
        let mut seqs = Vec::with_capacity(bodies.len());
        let mut records = Vec::with_capacity(bodies.len());
        for body in bodies {
            seq += 1;
            let bytes = chained(seq, body, &prev);
            prev = sha256_hex(&bytes);
            seqs.push(ms(seq));
            records.push(bytes);
        }
        // Always a write, even with no records: a commit that wrote nothing
        // would not wait for the WAL flush this barrier exists for.
        let stmt = c
            .prepare_cached(
                "WITH a AS (INSERT INTO audit (seq, record)
                            SELECT * FROM unnest($1::bigint[], $2::bytea[]))
                 UPDATE audit_head SET seq = $3, hash = $4 WHERE id = 1",
            )
            .await
            .map_err(pg_err)?;
        let head_seq = ms(seq);
        let params: [&(dyn ToSql + Sync); 4] = [&seqs, &records, &head_seq, &prev];
        let (written, committed) =
            tokio::join!(c.execute(&stmt, &params), c.simple_query("COMMIT"));
        // A COMMIT after a failed statement rolls back without an error: the
        // write's own result decides.
        written.map_err(pg_err)?;
        committed.map_err(pg_err)?;
        Ok(())
    }
}

impl LeaseStore for PgStore {
    fn create_lease(
        &self,
        lease: &Lease,
        idem: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let row = LeaseRow::of(lease);
        let params: Params = vec![
            Box::new(lease.id.clone()),
            Box::new(lease.subject.clone()),
            Box::new(row.active),
            Box::new(row.expires_at),
            Box::new(lease.kid.clone()),
            Box::new(row.ended_at),
            Box::new(row.record),
            Box::new(lease.delegation.as_ref().map(|d| d.parent_id.clone())),
        ];
        self.create(
            "INSERT INTO leases (id, subject, active, expires_at, kid, ended_at, record, parent_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            "WITH claim AS (
                INSERT INTO idempotency (caller, key, record) VALUES ($9, $10, $11)
                ON CONFLICT DO NOTHING RETURNING 1)
             INSERT INTO leases (id, subject, active, expires_at, kid, ended_at, record, parent_id)
             SELECT $1::text, $2::text, $3::boolean, $4::bigint, $5::text, $6::bigint, $7::bytea,
                    $8::text
             WHERE EXISTS (SELECT 1 FROM claim)",
            params,
            idem,
        )
    }

    fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.records(
            "SELECT record FROM leases WHERE id = $1",
            vec![Box::new(id.to_owned())],
        )?
        .first()
        .map(|b| decode_lease(id.as_bytes(), b))
        .transpose()
    }

    fn swap_lease(&self, current: &Lease, new: &Lease) -> Result<bool, StoreError> {
        const SWAP: &str = "UPDATE leases
             SET active = $3, expires_at = $4, kid = $5, ended_at = $6, record = $7
             WHERE id = $1 AND record = $2";
        let row = LeaseRow::of(new);
        let params = |expected: Vec<u8>| -> Params {
            vec![
                Box::new(new.id.clone()),
                Box::new(expected),
                Box::new(row.active),
                Box::new(row.expires_at),
                Box::new(new.kid.clone()),
                Box::new(row.ended_at),
                Box::new(row.record.clone()),
            ]
        };
        if self.execute(SWAP, params(encode_lease(current)))? == 1 {
            return Ok(true);
        }
        // The stored bytes may be an older encoding of the same lease (a
        // JSON lease brought over by import): compare what they mean.
        let stored = self.records(
            "SELECT record FROM leases WHERE id = $1",
            vec![Box::new(current.id.clone())],
        )?;
        match stored.into_iter().next() {
            Some(bytes) if decode_lease(current.id.as_bytes(), &bytes)? == *current => {
                Ok(self.execute(SWAP, params(bytes))? == 1)
            }
            _ => Ok(false),
        }
    }

    fn leases_of(
        &self,
        subject: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.keyed(
            "SELECT id, record FROM leases WHERE subject = $1 AND id > $2 ORDER BY id LIMIT $3",
            vec![
                Box::new(subject.to_owned()),
                Box::new(after.unwrap_or_default().to_owned()),
                Box::new(count(limit)),
            ],
        )?
        .iter()
        .map(|(id, bytes)| decode_lease(id.as_bytes(), bytes))
        .collect()
    }

    fn children(
        &self,
        parent: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.ids(
            "SELECT id FROM leases WHERE parent_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            vec![
                Box::new(parent.to_owned()),
                Box::new(after.unwrap_or_default().to_owned()),
                Box::new(count(limit)),
            ],
        )
    }

    fn leases_due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.ids(
            "SELECT id FROM leases WHERE active AND expires_at <= $1
             ORDER BY expires_at, id LIMIT $2",
            vec![Box::new(ms(now)), Box::new(count(limit))],
        )
    }

    fn next_lease_deadline(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self
            .number("SELECT min(expires_at) FROM leases WHERE active", vec![])?
            .map(from_ms))
    }

    fn active_leases_signed_by(&self, kid: &str) -> Result<Vec<String>, StoreError> {
        self.ids(
            "SELECT id FROM leases WHERE active AND kid = $1 ORDER BY id",
            vec![Box::new(kid.to_owned())],
        )
    }

    fn count_active_leases(&self) -> Result<u64, StoreError> {
        Ok(self
            .number("SELECT count(*) FROM leases WHERE active", vec![])?
            .map_or(0, from_ms))
    }

    fn purge_leases(&self, before: Millis) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM leases WHERE ended_at < $1",
            vec![Box::new(ms(before))],
        )
    }
}

impl RequestStore for PgStore {
    fn create_request(
        &self,
        req: &TokenRequest,
        idem: Option<&Idempotency>,
    ) -> Result<Option<Idempotency>, StoreError> {
        let row = RequestRow::of(req)?;
        let params: Params = vec![
            Box::new(req.id.clone()),
            Box::new(row.live),
            Box::new(row.deadline),
            Box::new(row.open),
            Box::new(row.ended_at),
            Box::new(row.record),
        ];
        self.create(
            "INSERT INTO requests (id, live, deadline, open, ended_at, record)
             VALUES ($1, $2, $3, $4, $5, $6)",
            "WITH claim AS (
                INSERT INTO idempotency (caller, key, record) VALUES ($7, $8, $9)
                ON CONFLICT DO NOTHING RETURNING 1)
             INSERT INTO requests (id, live, deadline, open, ended_at, record)
             SELECT $1::text, $2::boolean, $3::bigint, $4::boolean, $5::bigint, $6::bytea
             WHERE EXISTS (SELECT 1 FROM claim)",
            params,
            idem,
        )
    }

    fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        self.records(
            "SELECT record FROM requests WHERE id = $1",
            vec![Box::new(id.to_owned())],
        )?
        .first()
        .map(|b| decode("requests", id.as_bytes(), b))
        .transpose()
    }

    fn swap_request(&self, current: &TokenRequest, new: &TokenRequest) -> Result<bool, StoreError> {
        let row = RequestRow::of(new)?;
        // The notice reaches every broker's listener when this commits.
        let changed = self.ids(
            "WITH u AS (
                UPDATE requests SET live = $3, deadline = $4, open = $5, ended_at = $6, record = $7
                WHERE id = $1 AND record = $2 RETURNING id)
             SELECT u.id FROM u, pg_notify('portcullis', 'request:' || u.id)",
            vec![
                Box::new(new.id.clone()),
                Box::new(encode(current)?),
                Box::new(row.live),
                Box::new(row.deadline),
                Box::new(row.open),
                Box::new(row.ended_at),
                Box::new(row.record),
            ],
        )?;
        Ok(!changed.is_empty())
    }

    fn open_requests(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        self.keyed(
            "SELECT id, record FROM requests WHERE open AND id > $1 ORDER BY id LIMIT $2",
            vec![
                Box::new(after.unwrap_or_default().to_owned()),
                Box::new(count(limit)),
            ],
        )?
        .iter()
        .map(|(id, bytes)| decode("requests", id.as_bytes(), bytes))
        .collect()
    }

    fn requests_due(&self, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        self.ids(
            "SELECT id FROM requests WHERE live AND deadline <= $1
             ORDER BY deadline, id LIMIT $2",
            vec![Box::new(ms(now)), Box::new(count(limit))],
        )
    }

    fn next_request_deadline(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self
            .number("SELECT min(deadline) FROM requests WHERE live", vec![])?
            .map(from_ms))
    }

    fn count_open_requests(&self) -> Result<u64, StoreError> {
        Ok(self
            .number("SELECT count(*) FROM requests WHERE open", vec![])?
            .map_or(0, from_ms))
    }

    fn purge_requests(&self, before: Millis) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM requests WHERE ended_at < $1",
            vec![Box::new(ms(before))],
        )
    }
}

impl AuditStore for PgStore {
    fn append_audit(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.execute(
            "WITH a AS (INSERT INTO audit (seq, record) VALUES ($1, $2))
             UPDATE audit_head SET seq = $1, hash = $3 WHERE id = 1 AND seq < $1",
            vec![
                Box::new(ms(seq)),
                Box::new(bytes.to_vec()),
                Box::new(sha256_hex(bytes)),
            ],
        )?;
        Ok(())
    }

    fn audit_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.sequenced(
            "SELECT seq, record FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
            vec![Box::new(after.map_or(-1, ms)), Box::new(count(limit))],
        )
    }

    fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .sequenced(
                "SELECT seq, record FROM audit ORDER BY seq DESC LIMIT 1",
                vec![],
            )?
            .pop())
    }

    fn put_checkpoint(&self, seq: u64, jws: &[u8]) -> Result<(), StoreError> {
        self.execute(
            // A checkpoint, once written (and perhaps handed to a witness),
            // is never replaced.
            "INSERT INTO audit_checkpoints (seq, jws) VALUES ($1, $2)
             ON CONFLICT (seq) DO NOTHING",
            vec![Box::new(ms(seq)), Box::new(jws.to_vec())],
        )?;
        Ok(())
    }

    fn compact_audit(&self, seq: u64) -> Result<(), StoreError> {
        self.execute(
            "WITH c AS (DELETE FROM audit_checkpoints WHERE seq < $1)
             DELETE FROM audit WHERE seq <= $1",
            vec![Box::new(ms(seq))],
        )?;
        Ok(())
    }

    fn checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.sequenced(
            "SELECT seq, jws FROM audit_checkpoints ORDER BY seq",
            vec![],
        )
    }

    fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .sequenced(
                "SELECT seq, jws FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
                vec![],
            )?
            .pop())
    }

    fn checkpoints_between(&self, after: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.sequenced(
            "SELECT seq, jws FROM audit_checkpoints WHERE seq > $1 AND seq <= $2 ORDER BY seq",
            vec![Box::new(ms(after)), Box::new(ms(to))],
        )
    }
}

impl KeyStore for PgStore {
    fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.all_keys()
    }

    fn delete_key(&self, kid: &str) -> Result<(), StoreError> {
        self.ids(
            "WITH d AS (DELETE FROM keys WHERE kid = $1 RETURNING kid)
             SELECT d.kid FROM d, pg_notify('portcullis', 'keys')",
            vec![Box::new(kid.to_owned())],
        )?;
        Ok(())
    }

    fn put_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.ids(
            "WITH k AS (
                INSERT INTO keys (kid, record) VALUES ($1, $2)
                ON CONFLICT (kid) DO UPDATE SET record = excluded.record RETURNING kid)
             SELECT k.kid FROM k, pg_notify('portcullis', 'keys')",
            vec![Box::new(key.kid.clone()), Box::new(encode(key)?)],
        )?;
        Ok(())
    }
}

impl PgStore {
    fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.keyed("SELECT kid, record FROM keys ORDER BY kid", vec![])?
            .iter()
            .map(|(kid, bytes)| decode("keys", kid.as_bytes(), bytes))
            .collect()
    }
}

impl super::EphemeralStore for PgStore {
    fn put_ephemeral(
        &self,
        key: &[u8; 32],
        value: &[u8],
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO console_ephemeral (key, value, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            vec![
                Box::new(key.to_vec()),
                Box::new(value.to_vec()),
                Box::new(ms(expires_at)),
            ],
        )?;
        Ok(())
    }

    fn ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records(
                "SELECT value FROM console_ephemeral WHERE key = $1 AND expires_at > $2",
                vec![Box::new(key.to_vec()), Box::new(ms(now))],
            )?
            .pop())
    }

    fn take_ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        // One DELETE: of brokers taking the same key at once, one row
        // comes back to one of them.
        Ok(self
            .records(
                "WITH gone AS (DELETE FROM console_ephemeral WHERE key = $1 RETURNING value, expires_at)
                 SELECT value FROM gone WHERE expires_at > $2",
                vec![Box::new(key.to_vec()), Box::new(ms(now))],
            )?
            .pop())
    }

    fn purge_ephemeral(&self, now: Millis) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM console_ephemeral WHERE expires_at <= $1",
            vec![Box::new(ms(now))],
        )
    }
}

impl Store for PgStore {
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records(
                "SELECT value FROM meta WHERE name = $1",
                vec![Box::new(name.to_owned())],
            )?
            .pop())
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO meta (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            vec![Box::new(name.to_owned()), Box::new(value.to_vec())],
        )?;
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let bodies = self
            .pending_audit
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .map_err(|_| StoreError::Unavailable("audit queue poisoned".into()))?;
        let result = self.run(Self::barrier(
            self.pool.clone(),
            self.barrier,
            bodies.clone(),
        ));
        if result.is_err() {
            // The state these records describe may have been committed (and
            // be made durable by any later barrier, of any broker): keep
            // them, ahead of newer ones, for the next barrier.
            if let Ok(mut p) = self.pending_audit.lock() {
                let newer = std::mem::replace(&mut *p, bodies);
                p.extend(newer);
            }
        }
        result
    }

    fn scan(
        &self,
        table: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        let after = String::from_utf8_lossy(after.unwrap_or_default()).into_owned();
        let (caller, key) = after.split_once('\0').unwrap_or((after.as_str(), ""));
        let (sql, params): (&'static str, Params) = match table {
            Table::Leases => (
                "SELECT id, record FROM leases WHERE id > $1 ORDER BY id LIMIT $2",
                vec![Box::new(after.clone()), Box::new(count(limit))],
            ),
            Table::Requests => (
                "SELECT id, record FROM requests WHERE id > $1 ORDER BY id LIMIT $2",
                vec![Box::new(after.clone()), Box::new(count(limit))],
            ),
            Table::Idempotency => (
                "SELECT caller || chr(0) || key, record FROM idempotency
                 WHERE (caller, key) > ($1, $2) ORDER BY caller, key LIMIT $3",
                vec![
                    Box::new(caller.to_owned()),
                    Box::new(key.to_owned()),
                    Box::new(count(limit)),
                ],
            ),
            Table::Meta => (
                "SELECT name, value FROM meta WHERE name COLLATE \"C\" > $1
                 ORDER BY name COLLATE \"C\" LIMIT $2",
                vec![Box::new(after.clone()), Box::new(count(limit))],
            ),
        };
        let rows = self.keyed(sql, params)?;
        rows.into_iter()
            .map(|(k, v)| {
                let row = match table {
                    Table::Leases => Row::Lease(decode_lease(k.as_bytes(), &v)?),
                    Table::Requests => Row::Request(decode("requests", k.as_bytes(), &v)?),
                    Table::Idempotency => {
                        Row::Idempotency(decode("idempotency", k.as_bytes(), &v)?)
                    }
                    Table::Meta => Row::Meta(k.clone(), v),
                };
                Ok((k.into_bytes(), row))
            })
            .collect()
    }

    fn put_idempotency(&self, entry: &Idempotency) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO idempotency (caller, key, record) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            vec![
                Box::new(entry.caller.clone()),
                Box::new(entry.key.clone()),
                Box::new(encode(entry)?),
            ],
        )?;
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn queue_audit(&self, bodies: Vec<Vec<u8>>) -> Result<(), StoreError> {
        self.pending_audit
            .lock()
            .map(|mut p| p.extend(bodies))
            .map_err(|_| StoreError::Unavailable("audit queue poisoned".into()))
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }

    fn lead(&self, role: &str, holder: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        // Take the role when it is free or expired, keep it while held;
        // the database's clock decides, so brokers' clocks need not agree.
        let held = self.ids(
            "INSERT INTO leadership (role, holder, generation, expires_at)
             VALUES ($1, $2, 1, now() + $3 * interval '1 millisecond')
             ON CONFLICT (role) DO UPDATE SET
                holder = excluded.holder,
                generation = leadership.generation
                    + CASE WHEN leadership.holder = excluded.holder THEN 0 ELSE 1 END,
                expires_at = excluded.expires_at
             WHERE leadership.holder = excluded.holder OR leadership.expires_at < now()
             RETURNING holder",
            vec![
                Box::new(role.to_owned()),
                Box::new(holder.to_owned()),
                Box::new(ttl_ms as f64),
            ],
        )?;
        Ok(!held.is_empty())
    }

    fn resign(&self, role: &str, holder: &str) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM leadership WHERE role = $1 AND holder = $2",
            vec![Box::new(role.to_owned()), Box::new(holder.to_owned())],
        )?;
        Ok(())
    }
}

/// The environment variable naming a PostgreSQL database the tests may
/// create scratch databases from (`.ci/postgres start` prints one).
pub const TEST_DATABASE_ENV: &str = "PORTCULLIS_TEST_DATABASE_URL";

/// A new, empty database next to the one `base_url` names, and its URL:
/// for tests and benchmarks, which each want a database of their own.
pub fn scratch_database(base_url: &str) -> Result<String, StoreError> {
    use std::str::FromStr as _;
    let config = tokio_postgres::Config::from_str(base_url).map_err(pg_err)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    let name = crate::text::new_id("portcullis_", now)
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let bridge = Bridge::new()?;
    let create = format!("CREATE DATABASE {name}");
    bridge.block(async move {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(pg_err)?;
        let driver = tokio::spawn(connection);
        client.batch_execute(&create).await.map_err(pg_err)?;
        drop(client);
        drop(driver);
        Ok(())
    })?;
    let (head, query) = base_url.split_once('?').unwrap_or((base_url, ""));
    let (server, _) = head
        .rsplit_once('/')
        .filter(|(s, _)| s.contains("://") && !s.ends_with('/'))
        .unwrap_or((head, ""));
    Ok(if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    })
}

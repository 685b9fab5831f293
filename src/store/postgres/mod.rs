//! The shared backend: PostgreSQL, for several brokers on one database.
//!
//! Tables mirror the sled trees (see `schema`); records keep the same
//! encodings. Reads are one statement each.
//!
//! # One operation, one batch; several batches per durable transaction
//! [`Store::apply`] queues a batch for this broker's committer, which runs
//! every batch waiting in one transaction (`apply`): each under a
//! savepoint, with its checks (compare-and-swaps, the idempotency claim,
//! the fence, the signing key), so a batch that loses a check is rolled
//! back alone; then the records of all that stayed, numbered and chained
//! under a row lock on `audit_head`; then the commit, at the server's own
//! durable level (`on`, or `remote_apply` for a synchronous standby; `on`
//! if the server says `off`). The records of every broker thus form one
//! hash chain, which `audit verify` checks unchanged. `apply` returns once
//! that commit is durable, so [`Store::sync`] has nothing left to do.
//!
//! # News from other brokers
//! A changed request or key ring is announced with `pg_notify` in the
//! statement that changed it (delivered on commit); each broker `LISTEN`s
//! on one connection and hands payloads to [`Store::changes`]. Engines that
//! lack `LISTEN/NOTIFY` still work: watchers and the key ring also poll.

mod apply;
pub(crate) mod connect;
mod schema;

use deadpool_postgres::{Object, Pool};
use tokio::sync::broadcast;
use tokio_postgres::types::ToSql;

pub use self::connect::PgOptions;
use self::connect::Target;
pub use self::schema::LATEST as SCHEMA_VERSION;
use super::batch::{Applying, Batch};
use super::{
    Due, Millis, Row, Store, StoreError, Table, decode, decode_lease, encode, encode_lease,
};
use crate::model::{KeyRecord, Lease, LeaseState, TokenRequest};

/// Levels group transactions may commit at (the server's default is read
/// at start).
const BARRIER_LEVELS: &[&str] = &["on", "remote_write", "remote_apply", "local"];

/// A client error, with the server's own code and message when it sent
/// one (tokio-postgres displays those as just "db error"), told as what it
/// is: a lost race is contention (retry), a statement the server refuses
/// as malformed or not permitted, or a column that will not read, is the
/// broker's defect or its set-up (internal); the rest is the database
/// being unavailable.
pub(super) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        return if e.to_string().starts_with("error deserializing column") {
            StoreError::Internal(format!("database: a column did not read: {e}"))
        } else {
            StoreError::Unavailable(format!("database: {e}"))
        };
    };
    let (code, what) = (
        db.code().code(),
        format!("database: {} ({})", db.message(), db.code().code()),
    );
    match code {
        // serialization_failure, deadlock_detected, lock_not_available
        "40001" | "40P01" | "55P03" => StoreError::Contended(what),
        // syntax errors and access rule violations (42…), internal errors
        // (XX…): retrying the same statement will not help
        c if c.starts_with("42") || c.starts_with("XX") => StoreError::Internal(what),
        _ => StoreError::Unavailable(what),
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
    /// Batches on their way to the committer (`apply::committer`).
    queue: tokio::sync::mpsc::UnboundedSender<apply::Queued>,
    changes: broadcast::Sender<String>,
    /// The listener for other brokers' news, stopped with the store.
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The committer stops once its queue's sender (above) is gone.
        self.listener.abort();
    }
}

/// Start the committer, the one writer, like sled's writer thread: a thread
/// of its own with its own event loop (a current-thread runtime driving its
/// one connection), so that its turn never waits behind request tasks on a
/// busy runtime nor for a busy worker to poll the I/O driver; the group
/// commit's size and latency depend on that turn (measured:
/// docs/benchmarks.md, "Issue 20, async contract"). Nobody blocks on it:
/// callers await the batch's one-shot reply. It ends when the store's queue
/// closes.
fn spawn_committer(
    target: Target,
    barrier: &'static str,
    queued: tokio::sync::mpsc::UnboundedReceiver<apply::Queued>,
) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("portcullis-pg-committer".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(apply::committer(target, barrier, queued)),
                // The queue's end drops with this thread: every batch is
                // then refused as unavailable.
                Err(e) => tracing::error!(error = %e, "the database committer cannot start"),
            }
        })
        .map(|_| ())
        .map_err(|e| StoreError::Internal(format!("database committer: {e}")))
}

impl PgStore {
    /// Connect, apply migrations (or wait for another broker applying
    /// them), refuse a newer schema, and start listening for news. The
    /// listener runs on the caller's runtime, the committer on a thread of its own.
    pub async fn connect(opts: &PgOptions) -> Result<Self, StoreError> {
        let target = Target::parse(opts)?;
        let level = connect::timed(async {
            let (mut client, connection) = target
                .config
                .connect(target.tls.clone())
                .await
                .map_err(pg_err)?;
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
        })
        .await?;
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
        let pool = connect::pool(&target, opts.pool_size)?;
        let (changes, _) = broadcast::channel(1024);
        let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
        spawn_committer(target.clone(), barrier, queued)?;
        let listener = tokio::spawn(connect::listen(target, changes.clone()));
        Ok(Self {
            pool,
            queue,
            changes,
            listener,
        })
    }

    /// The rows of `sql` — prepared once per connection, so a call is one
    /// round trip — with `params`, within the call timeout.
    async fn fetch(&self, sql: &'static str, params: Params) -> Result<Vec<PgRow>, StoreError> {
        connect::timed(async {
            let c = client(&self.pool).await?;
            let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
            c.query(&stmt, &refs(&params)).await.map_err(pg_err)
        })
        .await
    }

    /// Column `i` of every row.
    async fn column<T>(
        &self,
        sql: &'static str,
        params: Params,
        i: usize,
    ) -> Result<Vec<T>, StoreError>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.fetch(sql, params)
            .await?
            .iter()
            .map(|r| r.try_get::<_, T>(i).map_err(pg_err))
            .collect()
    }

    /// Rows of one column of `bytea` records.
    async fn records(&self, sql: &'static str, params: Params) -> Result<Vec<Vec<u8>>, StoreError> {
        self.column(sql, params, 0).await
    }

    /// Rows of one `text` column.
    async fn ids(&self, sql: &'static str, params: Params) -> Result<Vec<String>, StoreError> {
        self.column(sql, params, 0).await
    }

    /// One `bigint` (a count, a minimum; `None` for SQL NULL).
    async fn number(&self, sql: &'static str, params: Params) -> Result<Option<i64>, StoreError> {
        Ok(self
            .column::<Option<i64>>(sql, params, 0)
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    /// `(key, bytea)` rows, the key of type `K`.
    async fn pairs<K>(
        &self,
        sql: &'static str,
        params: Params,
    ) -> Result<Vec<(K, Vec<u8>)>, StoreError>
    where
        K: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.fetch(sql, params)
            .await?
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
    async fn sequenced(
        &self,
        sql: &'static str,
        params: Params,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .pairs::<i64>(sql, params)
            .await?
            .into_iter()
            .map(|(seq, b)| (from_ms(seq), b))
            .collect())
    }

    /// `(text key, bytea record)` rows.
    async fn keyed(
        &self,
        sql: &'static str,
        params: Params,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.pairs(sql, params).await
    }

    /// Rows changed by one statement.
    async fn execute(&self, sql: &'static str, params: Params) -> Result<u64, StoreError> {
        connect::timed(async {
            let c = client(&self.pool).await?;
            let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
            c.execute(&stmt, &refs(&params)).await.map_err(pg_err)
        })
        .await
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn apply(&self, batch: Batch) -> Applying {
        // Straight to the committer: no thread waits here. (Callers are
        // bounded by their own number: each awaits its outcome.)
        let (reply, outcome) = tokio::sync::oneshot::channel();
        if let Err(tokio::sync::mpsc::error::SendError((_, reply))) =
            self.queue.send((batch, reply))
        {
            // The committer ends only when the store is dropped.
            let _ = reply.send(Err(StoreError::Stopping));
        }
        outcome
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // Every batch commits at the durable level before `apply` returns
        // (see `apply`): there is nothing left to flush.
        Ok(())
    }

    async fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.records(
            "SELECT record FROM leases WHERE id = $1",
            vec![Box::new(id.to_owned())],
        )
        .await?
        .first()
        .map(|b| decode_lease(id.as_bytes(), b))
        .transpose()
    }

    async fn leases_of(
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
        )
        .await?
        .iter()
        .map(|(id, bytes)| decode_lease(id.as_bytes(), bytes))
        .collect()
    }

    async fn children(
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
        .await
    }

    async fn signed_by(
        &self,
        kid: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.ids(
            "SELECT id FROM leases WHERE active AND kid = $1 AND id > $2 ORDER BY id LIMIT $3",
            vec![
                Box::new(kid.to_owned()),
                Box::new(after.unwrap_or_default().to_owned()),
                Box::new(count(limit)),
            ],
        )
        .await
    }

    async fn request(&self, id: &str) -> Result<Option<TokenRequest>, StoreError> {
        self.records(
            "SELECT record FROM requests WHERE id = $1",
            vec![Box::new(id.to_owned())],
        )
        .await?
        .first()
        .map(|b| decode("requests", id.as_bytes(), b))
        .transpose()
    }

    async fn open_requests(
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
        )
        .await?
        .iter()
        .map(|(id, bytes)| decode("requests", id.as_bytes(), bytes))
        .collect()
    }

    async fn open_requests_of(
        &self,
        who: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRequest>, StoreError> {
        self.keyed(
            "SELECT id, record FROM requests
             WHERE open AND (requester = $1 OR made_by = $1) AND id > $2
             ORDER BY id LIMIT $3",
            vec![
                Box::new(who.to_owned()),
                Box::new(after.unwrap_or_default().to_owned()),
                Box::new(count(limit)),
            ],
        )
        .await?
        .iter()
        .map(|(id, bytes)| decode("requests", id.as_bytes(), bytes))
        .collect()
    }

    async fn due(&self, index: Due, now: Millis, limit: usize) -> Result<Vec<String>, StoreError> {
        let sql = match index {
            Due::Leases => {
                "SELECT id FROM leases WHERE active AND expires_at <= $1
                 ORDER BY expires_at, id LIMIT $2"
            }
            Due::Requests => {
                "SELECT id FROM requests WHERE live AND deadline <= $1
                 ORDER BY deadline, id LIMIT $2"
            }
        };
        self.ids(sql, vec![Box::new(ms(now)), Box::new(count(limit))])
            .await
    }

    async fn next_deadline(&self, index: Due) -> Result<Option<Millis>, StoreError> {
        let sql = match index {
            Due::Leases => "SELECT min(expires_at) FROM leases WHERE active",
            Due::Requests => "SELECT min(deadline) FROM requests WHERE live",
        };
        Ok(self.number(sql, vec![]).await?.map(from_ms))
    }

    async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let row = self
            .fetch(
                "SELECT (SELECT count(*) FROM leases WHERE active),
                        (SELECT count(*) FROM requests WHERE open)",
                vec![],
            )
            .await?;
        let n = |i: usize| -> Result<u64, StoreError> {
            row.first().map_or(Ok(0), |r| {
                r.try_get::<_, i64>(i).map(from_ms).map_err(pg_err)
            })
        };
        Ok((n(0)?, n(1)?))
    }

    async fn audit_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.sequenced(
            "SELECT seq, record FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
            vec![Box::new(after.map_or(-1, ms)), Box::new(count(limit))],
        )
        .await
    }

    async fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .sequenced(
                "SELECT seq, record FROM audit ORDER BY seq DESC LIMIT 1",
                vec![],
            )
            .await?
            .pop())
    }

    async fn checkpoints(&self, after: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.sequenced(
            "SELECT seq, jws FROM audit_checkpoints WHERE seq > $1 AND seq <= $2 ORDER BY seq",
            vec![Box::new(ms(after)), Box::new(ms(to))],
        )
        .await
    }

    async fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .sequenced(
                "SELECT seq, jws FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
                vec![],
            )
            .await?
            .pop())
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.keyed("SELECT kid, record FROM keys ORDER BY kid", vec![])
            .await?
            .iter()
            .map(|(kid, bytes)| decode("keys", kid.as_bytes(), bytes))
            .collect()
    }

    async fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records(
                "SELECT value FROM meta WHERE name = $1",
                vec![Box::new(name.to_owned())],
            )
            .await?
            .pop())
    }

    async fn put_ephemeral(
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
        )
        .await?;
        Ok(())
    }

    async fn ephemeral(&self, key: &[u8; 32], now: Millis) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records(
                "SELECT value FROM console_ephemeral WHERE key = $1 AND expires_at > $2",
                vec![Box::new(key.to_vec()), Box::new(ms(now))],
            )
            .await?
            .pop())
    }

    async fn take_ephemeral(
        &self,
        key: &[u8; 32],
        now: Millis,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        // One DELETE: of brokers taking the same key at once, one row
        // comes back to one of them.
        Ok(self
            .records(
                "WITH gone AS (DELETE FROM console_ephemeral WHERE key = $1 RETURNING value, expires_at)
                 SELECT value FROM gone WHERE expires_at > $2",
                vec![Box::new(key.to_vec()), Box::new(ms(now))],
            )
            .await?
            .pop())
    }

    async fn purge_ephemeral(&self, now: Millis) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM console_ephemeral WHERE expires_at <= $1",
            vec![Box::new(ms(now))],
        )
        .await
    }

    async fn scan(
        &self,
        table: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Row)>, StoreError> {
        let (sql, params) = scan_statement(table, after, limit);
        let rows = self.keyed(sql, params).await?;
        rows.into_iter()
            .map(|(k, v)| {
                let row = match table {
                    Table::Leases => Row::Lease(decode_lease(k.as_bytes(), &v)?),
                    Table::Requests => Row::Request(decode("requests", k.as_bytes(), &v)?),
                    Table::Idempotency => {
                        let i: crate::model::Idempotency = decode("idempotency", k.as_bytes(), &v)?;
                        return Ok((super::idem_key(&i.caller, &i.key), Row::Idempotency(i)));
                    }
                    Table::Meta => Row::Meta(k.clone(), v),
                };
                Ok((k.into_bytes(), row))
            })
            .collect()
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }

    async fn lead(&self, role: &str, holder: &str, ttl_ms: u64) -> Result<Option<u64>, StoreError> {
        // Take the role when it is free or expired, keep it while held;
        // the database's clock decides, so brokers' clocks need not agree.
        // Every new term — another holder, or this one after its term ran
        // out — has a higher generation, which fences the batches of every
        // earlier term.
        let held = self
            .column::<i64>(
                "INSERT INTO leadership (role, holder, generation, expires_at)
                 VALUES ($1, $2, 1, now() + $3 * interval '1 millisecond')
                 ON CONFLICT (role) DO UPDATE SET
                    holder = excluded.holder,
                    generation = leadership.generation
                        + CASE WHEN leadership.holder = excluded.holder
                                    AND leadership.expires_at > now() THEN 0 ELSE 1 END,
                    expires_at = excluded.expires_at
                 WHERE leadership.holder = excluded.holder OR leadership.expires_at <= now()
                 RETURNING generation",
                vec![
                    Box::new(role.to_owned()),
                    Box::new(holder.to_owned()),
                    Box::new(ttl_ms as f64),
                ],
                0,
            )
            .await?;
        Ok(held.first().map(|g| u64::try_from(*g).unwrap_or(0)))
    }

    async fn resign(&self, role: &str, holder: &str) -> Result<(), StoreError> {
        // The row stays (its generation only grows); the term ends now.
        self.execute(
            "UPDATE leadership SET expires_at = now() - interval '1 millisecond'
             WHERE role = $1 AND holder = $2",
            vec![Box::new(role.to_owned()), Box::new(holder.to_owned())],
        )
        .await?;
        Ok(())
    }
}

/// The statement and parameters of one [`Store::scan`] page.
fn scan_statement(table: Table, after: Option<&[u8]>, limit: usize) -> (&'static str, Params) {
    let after = String::from_utf8_lossy(after.unwrap_or_default()).into_owned();
    let (caller, key) = after.split_once('\0').unwrap_or((after.as_str(), ""));
    match table {
        Table::Leases => (
            "SELECT id, record FROM leases WHERE id > $1 ORDER BY id LIMIT $2",
            vec![Box::new(after.clone()), Box::new(count(limit))],
        ),
        Table::Requests => (
            "SELECT id, record FROM requests WHERE id > $1 ORDER BY id LIMIT $2",
            vec![Box::new(after.clone()), Box::new(count(limit))],
        ),
        Table::Idempotency => (
            // PostgreSQL text holds no NUL: the cursor key (caller ‖ 0 ‖
            // key) is made from the decoded entry (see `scan`).
            "SELECT caller, record FROM idempotency
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
    }
}

/// The environment variable naming a PostgreSQL database the tests may
/// create scratch databases from (`.ci/postgres start` prints one).
pub const TEST_DATABASE_ENV: &str = "PORTCULLIS_TEST_DATABASE_URL";

/// A new, empty database next to the one `base_url` names, and its URL:
/// for tests and benchmarks, which each want a database of their own.
pub async fn scratch_database(base_url: &str) -> Result<String, StoreError> {
    use std::str::FromStr as _;
    let config = tokio_postgres::Config::from_str(base_url).map_err(pg_err)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    let name =
        crate::text::new_id("portcullis_", now).map_err(|e| StoreError::Internal(e.to_string()))?;
    let create = format!("CREATE DATABASE {name}");
    connect::timed(async move {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(pg_err)?;
        let driver = tokio::spawn(connection);
        client.batch_execute(&create).await.map_err(pg_err)?;
        drop(client);
        drop(driver);
        Ok(())
    })
    .await?;
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

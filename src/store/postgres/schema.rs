//! The PostgreSQL schema, as versioned migrations applied at start.
//!
//! `portcullis_migrations` holds one row per applied version. Each migration
//! runs in one transaction that first inserts its version row: a second
//! broker starting at the same moment blocks on that key until the first
//! commits, then finds the row taken and skips the migration. No advisory
//! lock is needed, which keeps this portable to CockroachDB and YugabyteDB.
//! A database whose highest version is above what this build knows is
//! refused, naming both versions.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::pg_err;
use crate::store::StoreError;

/// Each migration's statements, in order; index + 1 is its version.
/// Migrations are only ever appended: a released one never changes.
const MIGRATIONS: &[&str] = &[
    // 1: one table per record kind. Indexed columns are copies of fields
    // inside `record`, written by the same statement; `record` keeps the
    // encodings of the sled store, so export/import move bytes. Text keys
    // sort bytewise (`COLLATE "C"`), as sled's do, so pages are the same.
    r#"CREATE TABLE leases (
        id text COLLATE "C" PRIMARY KEY,
        subject text COLLATE "C" NOT NULL,
        active boolean NOT NULL,
        expires_at bigint NOT NULL,
        kid text NOT NULL,
        ended_at bigint,
        record bytea NOT NULL);
     CREATE INDEX leases_by_subject ON leases (subject, id);
     CREATE INDEX leases_due ON leases (expires_at, id) WHERE active;
     CREATE INDEX leases_by_kid ON leases (kid) WHERE active;
     CREATE INDEX leases_ended ON leases (ended_at) WHERE ended_at IS NOT NULL;
     CREATE TABLE requests (
        id text COLLATE "C" PRIMARY KEY,
        live boolean NOT NULL,
        deadline bigint NOT NULL,
        open boolean NOT NULL,
        ended_at bigint,
        record bytea NOT NULL);
     CREATE INDEX requests_due ON requests (deadline, id) WHERE live;
     CREATE INDEX requests_open ON requests (id) WHERE open;
     CREATE INDEX requests_ended ON requests (ended_at) WHERE ended_at IS NOT NULL;
     CREATE TABLE idempotency (
        caller text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        record bytea NOT NULL,
        PRIMARY KEY (caller, key));
     CREATE TABLE audit (seq bigint PRIMARY KEY, record bytea NOT NULL);
     CREATE TABLE audit_head (
        id smallint PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL,
        hash text NOT NULL);
     INSERT INTO audit_head VALUES
        (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
     CREATE TABLE audit_checkpoints (seq bigint PRIMARY KEY, jws bytea NOT NULL);
     CREATE TABLE keys (kid text PRIMARY KEY, record bytea NOT NULL);
     CREATE TABLE meta (name text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE leadership (
        role text PRIMARY KEY,
        holder text NOT NULL,
        generation bigint NOT NULL,
        expires_at timestamptz NOT NULL);"#,
    // 2: delegation (issue 12): a lease names the lease it was delegated
    // from; its children are found through this index.
    r#"ALTER TABLE leases ADD COLUMN parent_id text COLLATE "C";
     CREATE INDEX leases_children ON leases (parent_id, id) WHERE parent_id IS NOT NULL;"#,
    // 3: the approver console (issue 13): sessions and one-time links every
    // broker on the database sees, keyed by the SHA-256 of their secret.
    r#"CREATE TABLE console_ephemeral (
        key bytea PRIMARY KEY,
        value bytea NOT NULL,
        expires_at bigint NOT NULL);
     CREATE INDEX console_ephemeral_expiry ON console_ephemeral (expires_at);"#,
    // 4: open requests by the identities they concern (issue 21): quotas
    // and `ListMyRequests` read these, not every open request. Rows of
    // open requests are filled in from their JSON records.
    r#"ALTER TABLE requests ADD COLUMN requester text COLLATE "C";
     ALTER TABLE requests ADD COLUMN made_by text COLLATE "C";
     UPDATE requests SET
        requester = convert_from(record, 'UTF8')::jsonb ->> 'requester',
        made_by = coalesce(
            convert_from(record, 'UTF8')::jsonb -> 'delegation' -> 'actors' ->> 0,
            convert_from(record, 'UTF8')::jsonb ->> 'requester')
        WHERE open;
     CREATE INDEX requests_open_by_requester ON requests (requester, id) WHERE open;
     CREATE INDEX requests_open_by_maker ON requests (made_by, id) WHERE open;"#,
];

/// Highest schema version this build knows.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

/// Bring the database to [`LATEST`], or refuse a newer one.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    // `IF NOT EXISTS` on a second broker is not news worth a log line.
    client
        .batch_execute("SET client_min_messages = warning")
        .await
        .map_err(pg_err)?;
    create_ledger(client).await?;
    let found = applied(client).await?;
    if found > LATEST {
        return Err(StoreError::Schema {
            found,
            expected: LATEST,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i32::try_from(i + 1).map_err(|e| StoreError::Internal(e.to_string()))?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // Blocks while another broker applies the same version; returns no
        // row once it has.
        let claimed = tx
            .query_opt(
                "INSERT INTO portcullis_migrations (version) VALUES ($1)
                 ON CONFLICT (version) DO NOTHING RETURNING version",
                &[&version],
            )
            .await
            .map_err(pg_err)?;
        if claimed.is_some() {
            tx.batch_execute(sql).await.map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            tracing::info!(version, "applied database migration");
        }
    }
    Ok(())
}

/// The migrations table. Two brokers creating it at once can collide in
/// the catalog even with `IF NOT EXISTS`; the loser retries and finds it.
async fn create_ledger(client: &Client) -> Result<(), StoreError> {
    const LEDGER: &str = "CREATE TABLE IF NOT EXISTS portcullis_migrations (
        version integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now())";
    for attempt in 0..3 {
        match client.batch_execute(LEDGER).await {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < 2
                    && matches!(
                        e.code(),
                        Some(
                            &SqlState::UNIQUE_VIOLATION
                                | &SqlState::DUPLICATE_TABLE
                                | &SqlState::DUPLICATE_OBJECT
                        )
                    ) => {}
            Err(e) => return Err(pg_err(e)),
        }
    }
    Ok(())
}

/// Highest applied version (0: none).
pub async fn applied(client: &Client) -> Result<u32, StoreError> {
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM portcullis_migrations",
            &[],
        )
        .await
        .map_err(pg_err)?;
    let v: i32 = row.try_get(0).map_err(pg_err)?;
    u32::try_from(v).map_err(|e| StoreError::Corrupt {
        tree: "portcullis_migrations",
        key: "version".into(),
        detail: e.to_string(),
    })
}

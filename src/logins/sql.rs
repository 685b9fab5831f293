//! The statements run on a target, each built by the target's `format()`.

use deadpool_postgres::Object;
use tokio_postgres::error::SqlState;

use crate::policy::Owned;

/// A statement that failed: refused by the server (it answered with an
/// error) or not answered.
pub(super) enum SqlError {
    Refused(String),
    Unavailable(String),
}

impl From<tokio_postgres::Error> for SqlError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Self::Refused(format!("{} ({})", db.message(), db.code().code())),
            None => Self::Unavailable(e.to_string()),
        }
    }
}

/// What ending a login did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    /// Its sessions that were terminated.
    pub sessions: u64,
    /// What became of the role.
    pub role: RoleFate,
}

/// What became of an ended login's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleFate {
    /// Dropped.
    Dropped,
    /// Kept, `NOLOGIN` and without its group: it owns objects in another
    /// database of the cluster (`DROP OWNED` reaches only this one).
    Kept,
    /// There was no such role (ended before, or never made).
    Gone,
}

/// `sql`, a `format()` call with text parameters, evaluated by the target.
async fn statement(
    c: &Object,
    sql: &str,
    args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<String, SqlError> {
    Ok(c.query_one(sql, args).await?.try_get(0)?)
}

/// Make `role` (in one transaction with its mark).
pub(super) async fn create(
    c: &Object,
    role: &str,
    verifier: &str,
    until: &str,
    group: &str,
    mark: &str,
) -> Result<(), SqlError> {
    let create = statement(
        c,
        "SELECT format('CREATE ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE \
         NOREPLICATION NOBYPASSRLS INHERIT PASSWORD %L VALID UNTIL %L IN ROLE %I', \
         $1::text, $2::text, $3::text, $4::text)",
        &[&role, &verifier, &until, &group],
    )
    .await?;
    let comment = statement(
        c,
        "SELECT format('COMMENT ON ROLE %I IS %L', $1::text, $2::text)",
        &[&role, &mark],
    )
    .await?;
    // One simple query: one implicit transaction, both or neither (and no
    // connection left inside a failed transaction block).
    c.batch_execute(&format!("{create}; {comment}")).await?;
    Ok(())
}

/// `ALTER ROLE … VALID UNTIL`.
pub(super) async fn valid_until(c: &Object, role: &str, until: &str) -> Result<(), SqlError> {
    let alter = statement(
        c,
        "SELECT format('ALTER ROLE %I VALID UNTIL %L', $1::text, $2::text)",
        &[&role, &until],
    )
    .await?;
    c.batch_execute(&alter).await?;
    Ok(())
}

/// End `role`: `NOLOGIN` committed on its own, its sessions terminated,
/// then in one transaction what it owns reassigned to `group` or dropped,
/// and the role dropped. Without a group (a login whose lease was never
/// written, or was purged) only the role is dropped, and kept if it owns
/// anything, unless `owned` says drop.
pub(super) async fn end(
    c: &Object,
    role: &str,
    group: Option<&str>,
    owned: Owned,
) -> Result<Ended, SqlError> {
    let Some(sessions) = disable(c, role).await? else {
        return Ok(Ended {
            sessions: 0,
            role: RoleFate::Gone,
        });
    };
    let role = drop_role(c, role, group, owned).await?;
    Ok(Ended { sessions, role })
}

/// `NOLOGIN`, committed, then every session of `role` terminated: how
/// many (`None`: no such role).
async fn disable(c: &Object, role: &str) -> Result<Option<u64>, SqlError> {
    let nologin = statement(
        c,
        "SELECT format('ALTER ROLE %I NOLOGIN', $1::text)",
        &[&role],
    )
    .await?;
    match c.batch_execute(&nologin).await {
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => return Ok(None),
        r => r?,
    }
    let sessions: i64 = c
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
             FROM pg_stat_activity WHERE usename = $1::text",
            &[&role],
        )
        .await?
        .try_get(0)?;
    Ok(Some(u64::try_from(sessions).unwrap_or(0)))
}

/// Drop `role` with what it owns here (reassigned to `group` or dropped);
/// kept, without its group, when it owns objects in another database.
async fn drop_role(
    c: &Object,
    role: &str,
    group: Option<&str>,
    owned: Owned,
) -> Result<RoleFate, SqlError> {
    let drop =
        match (owned, group) {
            (Owned::Reassign, Some(group)) => {
                statement(
                    c,
                    "SELECT format('GRANT %1$I TO CURRENT_USER; REASSIGN OWNED BY %1$I TO %2$I; \
                 DROP OWNED BY %1$I; DROP ROLE %1$I', $1::text, $2::text)",
                    &[&role, &group],
                )
                .await?
            }
            // No group to give its objects to: the role alone, kept below if
            // it owns anything (nothing is destroyed unless `owned = "drop"`).
            (Owned::Reassign, None) => {
                statement(c, "SELECT format('DROP ROLE %I', $1::text)", &[&role]).await?
            }
            (Owned::Drop, _) => statement(
                c,
                "SELECT format('GRANT %1$I TO CURRENT_USER; DROP OWNED BY %1$I; DROP ROLE %1$I', \
                 $1::text)",
                &[&role],
            )
            .await?,
        };
    match c.batch_execute(&drop).await {
        Ok(()) => Ok(RoleFate::Dropped),
        // Dropped meanwhile (a reconciler and an end racing): as wanted.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(RoleFate::Gone),
        Err(e) if e.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST) => {
            keep(c, role, group).await?;
            Ok(RoleFate::Kept)
        }
        Err(e) => Err(e.into()),
    }
}

/// Keep `role` (it owns objects in another database): without its group,
/// and with its mark changed so that no reconciler ends it again.
async fn keep(c: &Object, role: &str, group: Option<&str>) -> Result<(), SqlError> {
    if let Some(group) = group {
        let strip = statement(
            c,
            "SELECT format('REVOKE %I FROM %I', $2::text, $1::text)",
            &[&role, &group],
        )
        .await?;
        c.batch_execute(&strip).await?;
    }
    let remark = statement(
        c,
        "SELECT format('COMMENT ON ROLE %I IS %L', rolname, \
         'kept, owns objects elsewhere: ' || shobj_description(oid, 'pg_authid')) \
         FROM pg_roles WHERE rolname = $1::text",
        &[&role],
    )
    .await?;
    c.batch_execute(&remark).await?;
    Ok(())
}

/// How many roles have a mark that starts with `prefix` and ends with
/// `suffix`.
pub(super) async fn count_marked(c: &Object, prefix: &str, suffix: &str) -> Result<u64, SqlError> {
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_shdescription \
             WHERE classoid = 'pg_authid'::regclass \
             AND left(description, length($1::text)) = $1::text \
             AND right(description, length($2::text)) = $2::text",
            &[&prefix, &suffix],
        )
        .await?
        .try_get(0)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The roles whose mark starts with `prefix`, and the lease id that
/// follows it.
pub(super) async fn marked(c: &Object, prefix: &str) -> Result<Vec<(String, String)>, SqlError> {
    let rows = c
        .query(
            "SELECT rolname::text, substr(d, length($1::text) + 1) FROM \
             (SELECT rolname, shobj_description(oid, 'pg_authid') AS d FROM pg_roles) r \
             WHERE left(d, length($1::text)) = $1::text ORDER BY rolname",
            &[&prefix],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let rest: String = r.try_get(1)?;
            let lease = rest.split(' ').next().unwrap_or_default().to_owned();
            Ok((r.try_get(0)?, lease))
        })
        .collect()
}

/// The key of the session-level advisory lock that lets one rotation of a
/// target's admin password run at a time, whichever broker runs it
/// (`portcull` in ASCII).
const ROTATION_LOCK: i64 = 0x706f_7274_6375_6c6c;

/// Take the rotation lock on this session: whether it was free. It is let
/// go when the session ends.
pub(super) async fn lock_rotation(c: &tokio_postgres::Client) -> Result<bool, SqlError> {
    Ok(
        c.query_one("SELECT pg_try_advisory_lock($1)", &[&ROTATION_LOCK])
            .await?
            .try_get(0)?,
    )
}

/// Let the rotation lock go (a pooler that keeps server sessions would
/// otherwise keep it past this session's end).
pub(super) async fn unlock_rotation(c: &tokio_postgres::Client) -> Result<bool, SqlError> {
    Ok(
        c.query_one("SELECT pg_advisory_unlock($1)", &[&ROTATION_LOCK])
            .await?
            .try_get(0)?,
    )
}

/// The signed-in role, and whether it is a superuser.
pub(super) async fn session_role(c: &tokio_postgres::Client) -> Result<(String, bool), SqlError> {
    let row = c
        .query_one(
            "SELECT rolname::text, rolsuper FROM pg_roles WHERE rolname = session_user",
            &[],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Change the signed-in role's own password to `verifier` (a
/// SCRAM-SHA-256 verifier: the password itself never reaches the target).
pub(super) async fn set_own_password(
    c: &tokio_postgres::Client,
    verifier: &str,
) -> Result<(), SqlError> {
    let alter: String = c
        .query_one(
            "SELECT format('ALTER ROLE %I PASSWORD %L', session_user, $1::text)",
            &[&verifier],
        )
        .await?
        .try_get(0)?;
    c.batch_execute(&alter).await?;
    Ok(())
}

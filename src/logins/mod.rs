//! Just-in-time database logins (issue 23, docs/design-db-credentials.md):
//! a PostgreSQL role per lease, made before the lease commits, ended after
//! the lease ends, and found again by its mark when anything in between
//! was lost.
//!
//! Every statement is built by the target's own `format()` (`%I` for
//! names, `%L` for literals) from bound parameters and then executed, so
//! the server that parses a statement is the one that quoted it. Names
//! come from the policy's template and the lease id, never from a caller.
//! The password is made here, handed back once, and reaches the target
//! only as a SCRAM-SHA-256 verifier.

mod sql;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use ring::rand::SecureRandom as _;

use crate::metrics::Metrics;
use crate::policy::{Database, Policy};
use crate::store::postgres::PgOptions;
use crate::store::postgres::connect::Target;

pub use sql::{Ended, RoleFate};

/// Longest a caller waits for an admin connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one statement on a target may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong on a target.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The target could not be reached or did not answer in time.
    #[error("database `{0}` is unavailable: {1}")]
    Unavailable(String, String),
    /// The target refused (a missing group role, missing rights).
    #[error("database `{0}` refused: {1}")]
    Refused(String, String),
    /// The policy names no such database.
    #[error("no database `{0}` in the policy")]
    Unknown(String),
    /// Another rotation of the database's admin password is under way
    /// (on this broker or another).
    #[error(
        "another rotation of the admin password of database `{0}` is under way; try again once it is done"
    )]
    Busy(String),
    /// No randomness for the password.
    #[error("no randomness for a password")]
    NoRandomness,
}

/// A login just made: what the caller is given, once.
#[derive(Clone)]
pub struct Issued {
    /// Role name (also the user name to connect as).
    pub role: String,
    /// Its password: a secret, never logged, recorded or stored.
    pub password: String,
    /// Where to connect.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database name.
    pub database: String,
    /// libpq's `sslmode` to connect with (see [`Conn::sslmode`]).
    pub sslmode: &'static str,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("role", &self.role)
            .field("password", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("sslmode", &self.sslmode)
            .finish()
    }
}

/// A new login's password and its SCRAM-SHA-256 verifier (4096 rounds of
/// PBKDF2: made off the async threads, and before any turn is taken).
pub struct Secret {
    password: String,
    verifier: String,
}

impl Secret {
    /// The password (a secret: never log it).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A random password and its verifier.
    pub async fn new() -> Result<Self, LoginError> {
        let password = new_password()?;
        tokio::task::spawn_blocking(move || {
            let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
            Self { password, verifier }
        })
        .await
        .map_err(|_| LoginError::NoRandomness)
    }
}

/// Where the admin passwords `db rotate-root` made are kept (the store,
/// sealed under the KEK: see the engine). The policy's `password_file`
/// is tried after them.
#[async_trait::async_trait]
pub trait SealedPasswords: Send + Sync {
    /// The admin passwords of database `name` to try, in order (a
    /// rotation's pending one first, then the current one).
    async fn passwords(&self, name: &str) -> Vec<String>;
}

/// A rotation of a target's admin password under way: a session holding
/// the target's rotation lock until it is dropped.
pub struct Rotation {
    session: deadpool_postgres::ClientWrapper,
}

/// One target: its settings as the policy gave them, and its pool.
struct Conn {
    db: Database,
    pool: Pool,
    host: String,
    port: u16,
    dbname: String,
    /// What clients are told to connect with: `verify-full` when this
    /// broker reaches the database over TLS (it verifies chain and name),
    /// else what the URL says.
    sslmode: &'static str,
}

/// The targets of the policy's `[[database]]` tables, connected on first
/// use and again when their settings change.
pub struct Logins {
    conns: Mutex<BTreeMap<String, Arc<Conn>>>,
    /// Every database this broker used, as it last used it (never
    /// forgotten: the logins made on one a reload dropped must still end).
    used: Mutex<BTreeMap<String, Database>>,
    /// This deployment's part of the mark ([`crate::keys::Kek::deployment_id`]);
    /// `None`: none could be derived, and no login is made or ended.
    owner: Option<String>,
    metrics: Arc<Metrics>,
    /// Admin passwords a rotation made, tried before the policy's file.
    sealed: Option<Arc<dyn SealedPasswords>>,
}

impl Logins {
    /// Logins marked as `owner`'s; admin passwords from `sealed`, then
    /// from each database's `password_file`.
    pub fn new(
        owner: Option<String>,
        metrics: Arc<Metrics>,
        sealed: Option<Arc<dyn SealedPasswords>>,
    ) -> Self {
        Self {
            conns: Mutex::new(BTreeMap::new()),
            used: Mutex::new(BTreeMap::new()),
            owner,
            metrics,
            sealed,
        }
    }

    /// The start of this deployment's marks.
    fn mark_prefix(&self, db: &Database) -> Result<String, LoginError> {
        match &self.owner {
            Some(o) => Ok(format!("portcullis {o} ")),
            None => Err(LoginError::Refused(
                db.name.clone(),
                "no deployment id to mark logins with".into(),
            )),
        }
    }

    /// Database `name` as `policy` says, or, when a reload dropped it, as
    /// it was when this broker last used it: the logins made there must
    /// still be ended.
    pub fn database(&self, policy: &Policy, name: &str) -> Result<Database, LoginError> {
        if let Some(db) = policy.databases.get(name) {
            return Ok(db.clone());
        }
        self.used
            .lock()
            .ok()
            .and_then(|u| u.get(name).cloned())
            .ok_or_else(|| LoginError::Unknown(name.to_owned()))
    }

    /// Every database of `policy`, and every one this broker used that a
    /// reload dropped since.
    pub fn every_database(&self, policy: &Policy) -> Vec<Database> {
        let mut all: BTreeMap<String, Database> = policy.databases.clone();
        if let Ok(used) = self.used.lock() {
            for (name, db) in used.iter() {
                all.entry(name.clone()).or_insert_with(|| db.clone());
            }
        }
        all.into_values().collect()
    }

    /// The pool of `db`, made (or made again, if its settings changed or
    /// its password was refused) with the first admin password that signs
    /// in.
    async fn conn(&self, db: &Database) -> Result<Arc<Conn>, LoginError> {
        let poisoned = || LoginError::Unavailable(db.name.clone(), "poisoned".into());
        {
            let mut used = self.used.lock().map_err(|_| poisoned())?;
            if used.get(&db.name) != Some(db) {
                used.insert(db.name.clone(), db.clone());
            }
        }
        if let Some(c) = (self.conns.lock().map_err(|_| poisoned())?)
            .get(&db.name)
            .filter(|c| c.db == *db)
        {
            return Ok(c.clone());
        }
        let mut tries = match &self.sealed {
            Some(s) => s.passwords(&db.name).await,
            None => Vec::new(),
        };
        match read_password_file(db) {
            Ok(p) if !tries.contains(&p) => tries.push(p),
            Ok(_) => {}
            Err(e) if tries.is_empty() => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "the admin password file is not read: sealed passwords are tried")
            }
        }
        let c = Arc::new(self.first_that_signs_in(db, tries).await?);
        self.conns
            .lock()
            .map_err(|_| poisoned())?
            .insert(db.name.clone(), c.clone());
        Ok(c)
    }

    /// A pool with the first of `passwords` the target accepts (tried
    /// with one connection each, when there is more than one).
    async fn first_that_signs_in(
        &self,
        db: &Database,
        passwords: Vec<String>,
    ) -> Result<Conn, LoginError> {
        let n = passwords.len();
        for (i, password) in passwords.into_iter().enumerate() {
            let conn = connect(db, &password)?;
            if i + 1 == n {
                return Ok(conn);
            }
            match conn.pool.get().await {
                Ok(_) => return Ok(conn),
                Err(e) if refused_password(&e) => continue,
                Err(e) => {
                    self.failed("connect");
                    return Err(LoginError::Unavailable(db.name.clone(), e.to_string()));
                }
            }
        }
        Err(LoginError::Refused(
            db.name.clone(),
            "no admin password to sign in with".into(),
        ))
    }

    /// Forget the pool of database `name`: the next use makes a new one
    /// (after a rotation, or when its password was refused).
    pub fn forget(&self, name: &str) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(name);
        }
    }

    /// Begin a rotation of `db`'s admin password: a session of its own
    /// (out of the pool: its end lets the lock go, however the rotation
    /// ends) holding the target's rotation lock. Refused for a superuser:
    /// the broker's admin role must be its own, not one people sign in as.
    pub async fn begin_rotation(&self, db: &Database) -> Result<Rotation, LoginError> {
        let (_, pooled) = self.client(db).await?;
        let session = deadpool_postgres::Object::take(pooled);
        let (role, superuser) = self
            .timed(db, "root_checked", sql::session_role(&session))
            .await?;
        if superuser {
            return Err(LoginError::Refused(
                db.name.clone(),
                format!(
                    "the admin role `{role}` is a superuser: give the broker a role of its own (CREATEROLE, pg_signal_backend, the group roles WITH ADMIN OPTION) before rotating its password"
                ),
            ));
        }
        if !self
            .timed(db, "root_locked", sql::lock_rotation(&session))
            .await?
        {
            return Err(LoginError::Busy(db.name.clone()));
        }
        Ok(Rotation { session })
    }

    /// Set the admin role's password on `db` to `secret` (its SCRAM
    /// verifier is what reaches the target) in `rotation`; the pool is
    /// made again at its next use.
    pub async fn set_admin_password(
        &self,
        db: &Database,
        rotation: &Rotation,
        secret: &Secret,
    ) -> Result<(), LoginError> {
        let done = sql::set_own_password(&rotation.session, &secret.verifier);
        let out = self.timed(db, "root_rotated", done).await;
        self.forget(&db.name);
        out
    }

    /// End `rotation`: its lock let go, its session closed (which lets the
    /// lock go too, should the unlock fail).
    pub async fn end_rotation(&self, db: &Database, rotation: Rotation) {
        let unlocked = sql::unlock_rotation(&rotation.session);
        if let Err(e) = self.timed(db, "root_unlocked", unlocked).await {
            tracing::warn!(error = %e, database = %db.name, "could not let the rotation lock go; closing its session does");
        }
    }

    /// Whether the target accepts `password` for the admin role of `db`.
    pub async fn signs_in(&self, db: &Database, password: &str) -> Result<bool, LoginError> {
        let conn = connect(db, password)?;
        match conn.pool.get().await {
            Ok(_) => Ok(true),
            Err(e) if refused_password(&e) => Ok(false),
            Err(e) => Err(LoginError::Unavailable(db.name.clone(), e.to_string())),
        }
    }

    /// Make the login of lease `lease_id` for `who` on `db`, a member of
    /// `group`, valid until `until` (ms since the epoch).
    pub async fn create(
        &self,
        db: &Database,
        (lease_id, who): (&str, &str),
        group: &str,
        until: u64,
        secret: Secret,
    ) -> Result<Issued, LoginError> {
        let mark = format!("{}{lease_id}{}", self.mark_prefix(db)?, holder_tag(who));
        let role = db.role_of(lease_id);
        let Secret { password, verifier } = secret;
        let (conn, client) = self.client(db).await?;
        let until = timestamp(until);
        let made = sql::create(&client, &role, &verifier, &until, group, &mark);
        self.timed(db, "created", made).await?;
        Ok(Issued {
            role,
            password,
            host: conn.host.clone(),
            port: conn.port,
            database: conn.dbname.clone(),
            sslmode: conn.sslmode,
        })
    }

    /// Move `role`'s end of validity to `until`.
    pub async fn extend(&self, db: &Database, role: &str, until: u64) -> Result<(), LoginError> {
        let (_, client) = self.client(db).await?;
        let until = timestamp(until);
        let done = sql::valid_until(&client, role, &until);
        self.timed(db, "extended", done).await
    }

    /// End `role` on `db`: no new sessions (committed on its own), its
    /// sessions ended, then dropped (or kept, see [`Ended`]).
    pub async fn end(
        &self,
        db: &Database,
        role: &str,
        group: Option<&str>,
    ) -> Result<Ended, LoginError> {
        let (_, client) = self.client(db).await?;
        let ended = sql::end(&client, role, group, db.owned);
        self.timed(db, "ended", ended).await
    }

    /// How many roles on `db` this deployment made for `who` that still
    /// exist (whatever their lease: a login counts until it is gone).
    pub async fn held_by(&self, db: &Database, who: &str) -> Result<u64, LoginError> {
        let prefix = self.mark_prefix(db)?;
        let (_, client) = self.client(db).await?;
        let tag = holder_tag(who);
        let counted = sql::count_marked(&client, &prefix, &tag);
        self.timed(db, "counted", counted).await
    }

    /// The roles on `db` that carry this deployment's mark, with the
    /// lease id each was made for.
    pub async fn marked(&self, db: &Database) -> Result<Vec<(String, String)>, LoginError> {
        let prefix = self.mark_prefix(db)?;
        let (_, client) = self.client(db).await?;
        let listed = sql::marked(&client, &prefix);
        self.timed(db, "listed", listed).await
    }

    /// A connection to `db`, and its target. A password the target
    /// refuses (another broker rotated it) makes the pool again, once.
    async fn client(
        &self,
        db: &Database,
    ) -> Result<(Arc<Conn>, deadpool_postgres::Object), LoginError> {
        let mut again = true;
        loop {
            let conn = self.conn(db).await?;
            match conn.pool.get().await {
                Ok(c) => return Ok((conn, c)),
                Err(e) if again && refused_password(&e) => {
                    again = false;
                    self.forget(&db.name);
                }
                Err(e) => {
                    self.failed("connect");
                    return Err(LoginError::Unavailable(db.name.clone(), e.to_string()));
                }
            }
        }
    }

    /// `fut` within [`CALL_TIMEOUT`], counted as `step` when it succeeds
    /// and as a failure of `step` when it does not.
    async fn timed<T>(
        &self,
        db: &Database,
        step: &'static str,
        fut: impl Future<Output = Result<T, sql::SqlError>>,
    ) -> Result<T, LoginError> {
        let out = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(sql::SqlError::Refused(e))) => Err(LoginError::Refused(db.name.clone(), e)),
            Ok(Err(sql::SqlError::Unavailable(e))) => {
                Err(LoginError::Unavailable(db.name.clone(), e))
            }
            Err(_) => Err(LoginError::Unavailable(
                db.name.clone(),
                "the database did not answer in time".into(),
            )),
        };
        match &out {
            Ok(_) => {
                self.metrics
                    .db_logins
                    .get_or_create(&vec![("step", step)])
                    .inc();
            }
            Err(_) => self.failed(step),
        }
        out
    }

    fn failed(&self, step: &'static str) {
        self.metrics
            .db_login_failures
            .get_or_create(&vec![("step", step)])
            .inc();
    }
}

/// Whether the target refused the admin's password.
fn refused_password(e: &deadpool_postgres::PoolError) -> bool {
    matches!(e, deadpool_postgres::PoolError::Backend(e)
        if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD))
}

/// The admin password in `db`'s `password_file`.
fn read_password_file(db: &Database) -> Result<String, LoginError> {
    let password = std::fs::read_to_string(&db.password_file).map_err(|e| {
        LoginError::Refused(
            db.name.clone(),
            format!(
                "the admin password file {}: {e}",
                db.password_file.display()
            ),
        )
    })?;
    Ok(password.trim_end_matches(['\n', '\r']).to_owned())
}

/// The pool of `db` (no connection made yet): verified TLS as for the
/// store, the admin's `password`, ordinary (synchronous) commits: a
/// `NOLOGIN` must not be lost to a crash of the target.
fn connect(db: &Database, password: &str) -> Result<Conn, LoginError> {
    let refused = |e: String| LoginError::Refused(db.name.clone(), e);
    let target = Target::parse(&PgOptions {
        url: db.url.clone(),
        ca_file: db.ca_file.clone(),
        pool_size: db.pool,
    })
    .map_err(|e| refused(e.to_string()))?;
    let mut config = target.config.clone();
    config.password(password);
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().unwrap_or_default().to_owned();
    let sslmode = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => "disable",
        tokio_postgres::config::SslMode::Prefer => "prefer",
        _ => "verify-full",
    };
    let manager = Manager::from_config(
        config,
        target.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(db.pool.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| refused(format!("pool: {e}")))?;
    Ok(Conn {
        db: db.clone(),
        pool,
        host,
        port,
        dbname,
        sslmode,
    })
}

/// The end of a login's mark naming who holds it: a digest, so that no
/// caller text reaches the database (` for ` and 16 hex digits of SHA-256).
fn holder_tag(who: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, who.as_bytes());
    let hex: String = d
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(" for {hex}")
}

/// 32 random bytes, base64url: 256 bits, and safe in a connection string.
fn new_password() -> Result<String, LoginError> {
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| LoginError::NoRandomness)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// `ms` since the epoch as an RFC 3339 UTC time PostgreSQL reads.
fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_random_and_url_safe() {
        let (a, b) = (new_password().unwrap(), new_password().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn expiry_is_an_rfc3339_time_in_utc() {
        assert_eq!(timestamp(1_765_000_000_123), "2025-12-06T05:46:40.123Z");
    }

    #[test]
    fn a_login_shown_in_a_log_hides_its_password() {
        let i = Issued {
            role: "pc_l_1".into(),
            password: "s3cret-value".into(),
            host: "h".into(),
            port: 5432,
            database: "d".into(),
            sslmode: "verify-full",
        };
        let shown = format!("{i:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("pc_l_1"));
    }
}

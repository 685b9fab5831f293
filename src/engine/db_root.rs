//! `db rotate-root` (issue 23, item 5; docs/design-db-credentials.md): the
//! admin password of a `[[database]]` changed on the database and kept in
//! the store, sealed under the KEK, so that it lives nowhere in the clear
//! and no person knows it after the first rotation.
//!
//! A rotation spans two systems, so it is written in the order that a
//! crash anywhere leaves a password that signs in: the new password is
//! sealed in the store as *pending* (durable, with its record), then set on
//! the database, then made *current* (durable, with its record). Until it
//! is current, the pending one is tried first and the current one next
//! (then the previous one, then the policy's `password_file`), so whichever
//! the database took is found; the next rotation settles a pending one
//! before it begins. One rotation of a database runs at a time, whichever
//! broker runs it: each holds the target's own advisory lock throughout.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Engine, EngineError};
use crate::audit::{Action, Entry as AuditEntry};
use crate::identity::Identity;
use crate::keys::KeyRing;
use crate::policy::Database;
use crate::store::batch::Write;
use crate::store::{Millis, Store};
use crate::text::{FieldError, check_reason};

/// A database's admin passwords, each sealed under the KEK (stored as the
/// metadata value [`meta_name`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sealed {
    /// The password in force since the last rotation finished.
    #[serde(default)]
    current: Option<Vec<u8>>,
    /// A rotation's new password, sealed before the database was told:
    /// whether the database took it, only signing in tells.
    #[serde(default)]
    pending: Option<Vec<u8>>,
    /// The one before `current` (a database restored to before the last
    /// rotation still signs in with it).
    #[serde(default)]
    previous: Option<Vec<u8>>,
    /// When the last rotation finished (ms since the epoch).
    #[serde(default)]
    rotated_at: Millis,
}

/// The metadata value of database `name`'s sealed passwords.
fn meta_name(name: &str) -> String {
    format!("db_root/{name}")
}

/// What a sealed password is bound to: a password sealed for one database
/// never opens as another's.
fn aad(name: &str) -> Vec<u8> {
    format!("portcullis database admin password {name}").into_bytes()
}

async fn load(store: &dyn Store, name: &str) -> Result<Sealed, EngineError> {
    match store.meta(&meta_name(name)).await? {
        Some(b) if !b.is_empty() => serde_json::from_slice(&b).map_err(|e| {
            EngineError::Internal(format!(
                "the sealed admin passwords of database `{name}` do not decode: {e}"
            ))
        }),
        _ => Ok(Sealed::default()),
    }
}

/// The refusal of a rotation of a database `policy` does not declare.
fn no_such_database(policy: &crate::policy::Policy) -> FieldError {
    let known: Vec<&str> = policy.databases.keys().map(String::as_str).collect();
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    FieldError::new(
        "database",
        format!("names no `[[database]]` of the policy (it has: {known})"),
    )
}

/// The sealed passwords of the store, as the logins' pools try them.
pub(crate) struct StorePasswords {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) keys: Arc<KeyRing>,
}

impl StorePasswords {
    fn open(&self, name: &str, sealed: &[u8]) -> Option<String> {
        let plain = self.keys.open(&aad(name), sealed);
        if plain.is_none() {
            tracing::error!(database = %name, "a sealed admin password does not open with this KEK");
        }
        String::from_utf8(plain?).ok()
    }
}

#[async_trait::async_trait]
impl crate::logins::SealedPasswords for StorePasswords {
    async fn passwords(&self, name: &str) -> Vec<String> {
        let sealed = match load(self.store.as_ref(), name).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, database = %name, "cannot read the sealed admin passwords");
                return Vec::new();
            }
        };
        [sealed.pending, sealed.current, sealed.previous]
            .into_iter()
            .flatten()
            .filter_map(|s| self.open(name, &s))
            .collect()
    }
}

impl Engine {
    /// Rotate the admin password of database `name` (see the module
    /// docs); when it finished.
    pub async fn rotate_db_root(
        &self,
        who: &Identity,
        name: &str,
        reason: &str,
    ) -> Result<Millis, EngineError> {
        self.require_admin(who, "rotating a database's admin password")?;
        check_reason("reason", reason, false)?;
        let policy = self.policy();
        let Some(db) = policy.databases.get(name).cloned() else {
            return Err(no_such_database(&policy).into());
        };
        let Ok(_alone) = self.root_turn.try_lock() else {
            return Err(crate::logins::LoginError::Busy(name.to_owned()).into());
        };
        // Across brokers: the target's lock, held until `rotation` drops;
        // the store is read under it.
        let rotation = self.logins.begin_rotation(&db).await?;
        let who = who.as_str();
        let (secret, pending) = self.seal_pending(&db, who, reason).await?;
        self.logins
            .set_admin_password(&db, &rotation, &secret)
            .await
            .map_err(|e| {
                EngineError::WrongState(format!(
                    "the new admin password of database `{name}` may not have been set ({e}); it is kept, and tried first: run the rotation again"
                ))
            })?;
        let now = self.clock.now();
        let done = Sealed {
            previous: pending.current,
            current: pending.pending,
            pending: None,
            rotated_at: now,
        };
        let why = format!("database `{name}`: admin password changed and in force; {reason}");
        self.put_sealed(
            name,
            &done,
            AuditEntry::ok(who, Action::DbRootRotated, name, &[], &why),
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, database = %name, "the rotated admin password is set, but could not be recorded as current");
            EngineError::WrongState(format!(
                "the new admin password of database `{name}` is set, and kept as pending (tried first), but could not be recorded as current: run the rotation again"
            ))
        })?;
        self.logins.end_rotation(&db, rotation).await;
        tracing::info!(database = %name, actor = %who, "database admin password rotated");
        Ok(now)
    }

    /// A new admin password for `db`, sealed as pending (durable, with its
    /// record) beside the settled current one; the secret, and what was
    /// written.
    async fn seal_pending(
        &self,
        db: &Database,
        who: &str,
        reason: &str,
    ) -> Result<(crate::logins::Secret, Sealed), EngineError> {
        let name = db.name.as_str();
        let sealed = self.root_settled(db).await?;
        let secret = crate::logins::Secret::new().await?;
        let new = self.keys.seal(&aad(name), secret.password().as_bytes())?;
        let pending = Sealed {
            pending: Some(new),
            ..sealed
        };
        let why = format!("database `{name}`: new admin password sealed; {reason}");
        self.put_sealed(
            name,
            &pending,
            AuditEntry::ok(who, Action::DbRootRotating, name, &[], &why),
        )
        .await?;
        Ok((secret, pending))
    }

    /// `db`'s sealed passwords with any pending one settled: current if
    /// the database takes it (a rotation cut short after the database was
    /// told), else dropped.
    async fn root_settled(&self, db: &Database) -> Result<Sealed, EngineError> {
        let mut sealed = load(self.store().as_ref(), &db.name).await?;
        let Some(pending) = sealed.pending.take() else {
            return Ok(sealed);
        };
        let password = self
            .keys
            .open(&aad(&db.name), &pending)
            .and_then(|p| String::from_utf8(p).ok());
        if let Some(p) = password
            && self.logins.signs_in(db, &p).await?
        {
            sealed.previous = sealed.current.replace(pending);
        }
        Ok(sealed)
    }

    /// Write `sealed` for database `name` with its record, durably.
    async fn put_sealed(
        &self,
        name: &str,
        sealed: &Sealed,
        entry: AuditEntry,
    ) -> Result<(), EngineError> {
        let bytes = serde_json::to_vec(sealed)
            .map_err(|e| EngineError::Internal(format!("encode: {e}")))?;
        let (bytes, entry) = (&bytes, &entry);
        self.commit(|mut op| async move {
            op.write(Write::PutMeta(meta_name(name), bytes.clone()));
            op.record(vec![entry.clone()])?;
            Ok((op, ()))
        })
        .await
    }
}

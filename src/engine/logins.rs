//! The engine's side of database logins (issue 23,
//! docs/design-db-credentials.md): a grant's login is made before its lease
//! commits; the login of every lease that ends is ended on its database,
//! a few at a time, each step recorded; the leader reconciles what a crash
//! or a failure left behind.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::{Engine, EngineError, Op};
use crate::audit::{Action, Entry as AuditEntry};
use crate::logins::{Ended, Issued, RoleFate};
use crate::model::{LeaseLogin, LeaseState};
use crate::policy::{Database, LoginRule, Policy};
use crate::store::Millis;
use crate::text::FieldError;

/// Logins ended at once: a restart with many to end never storms a
/// database.
const AT_ONCE: usize = 4;
/// Waits between the tries to end a login, after which the reconciler
/// takes it over.
const RETRIES: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
/// A marked role whose lease does not exist is left alone this long after
/// the lease id's time: its grant may still be committing.
const ORPHAN_AFTER_MS: Millis = 120_000;
/// How often the leader reconciles the databases.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// Longest a lease id's time may lie behind the commit of its lease when
/// it holds a login: half the reconciler's wait, so that a login is never
/// ended as an orphan while its grant is still being written.
const WRITTEN_WITHIN_MS: Millis = ORPHAN_AFTER_MS / 2;
/// Longest a single revocation waits for its login to be disabled.
pub const REVOKE_WAITS: Duration = Duration::from_secs(10);

/// The login scope among `scopes`, with its database (at most one: a lease
/// holds one login).
pub(crate) fn login_scope<'p>(
    policy: &'p Policy,
    scopes: &[String],
) -> Result<Option<(&'p Database, &'p LoginRule)>, EngineError> {
    let mut found: Option<(&Database, &LoginRule)> = None;
    for s in scopes {
        let Some(rule) = policy.scopes.get(s).and_then(|r| r.login.as_ref()) else {
            continue;
        };
        if found.is_some() {
            return Err(FieldError::new(
                "scopes",
                "at most one login scope per request: a lease holds one database login",
            )
            .into());
        }
        let db = policy.databases.get(&rule.database).ok_or_else(|| {
            EngineError::Internal(format!("no database `{}` in the policy", rule.database))
        })?;
        found = Some((db, rule));
    }
    Ok(found)
}

/// The time in a lease id (`l_` and 12 hex digits of milliseconds).
fn lease_id_time(id: &str) -> Option<Millis> {
    u64::from_str_radix(id.strip_prefix("l_")?.get(..12)?, 16).ok()
}

/// Refuse to write a lease that holds a login (`holds`) made at `made_at`
/// (the lease id's time) when `now` is too late for it (see
/// [`WRITTEN_WITHIN_MS`]).
pub(crate) fn still_in_time(holds: bool, made_at: Millis, now: Millis) -> Result<(), EngineError> {
    if holds && now.saturating_sub(made_at) > WRITTEN_WITHIN_MS {
        return Err(crate::store::StoreError::Unavailable(
            "the grant of a database login took too long to write; nothing was issued".into(),
        )
        .into());
    }
    Ok(())
}

/// One login grant per identity at a time on this broker, from counting
/// its live logins to writing the new lease, so that concurrent grants
/// cannot pass `max_logins_per_identity` together.
#[derive(Default)]
pub(crate) struct Turns(
    std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
);

impl Turns {
    async fn take(&self, who: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let gate = match self.0.lock() {
            Ok(mut m) => {
                // Gates nobody waits on are let go.
                m.retain(|_, g| Arc::strong_count(g) > 1);
                m.entry(who.to_owned()).or_default().clone()
            }
            Err(_) => Arc::default(),
        };
        gate.lock_owned().await
    }
}

/// A login just made for a lease not yet written, and this identity's
/// turn, held until it is. Dropped without being delivered (the lease was
/// not written, the grant failed, or the call was cancelled mid-way), it
/// ends the login at once rather than leave it to the reconciler: nobody
/// was given its password.
pub(crate) struct Made {
    issued: Issued,
    /// The login as its lease records it.
    pub(crate) login: LeaseLogin,
    lease_id: String,
    _turn: tokio::sync::OwnedMutexGuard<()>,
    /// Where to end it, until it is delivered.
    undelivered: Option<(Arc<crate::logins::Logins>, Arc<Policy>)>,
}

impl Made {
    /// The lease that holds it is written: the login is the caller's, and
    /// ends with its lease.
    pub(crate) fn deliver(mut self) -> Box<Issued> {
        self.undelivered = None;
        Box::new(self.issued.clone())
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if let Some((logins, policy)) = self.undelivered.take() {
            abandon(logins, &policy, &self.lease_id, self.login.clone());
        }
    }
}

/// End `login`, made for lease `lease_id` that was never written (the
/// reconciler would, later).
fn abandon(logins: Arc<crate::logins::Logins>, policy: &Policy, lease_id: &str, login: LeaseLogin) {
    let id = lease_id.to_owned();
    let db = match logins.database(policy, &login.database) {
        Ok(db) => db,
        Err(e) => {
            tracing::error!(error = %e, lease = %id, role = %login.role, "cannot end the login of a grant that was not written");
            return;
        }
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(lease = %id, role = %login.role, "no runtime to end the login of a grant that was not written; the reconciler will");
        return;
    };
    rt.spawn(async move {
        match logins.end(&db, &login.role, None).await {
            Ok(_) => {
                tracing::info!(lease = %id, role = %login.role, "the login of a grant that was not written was ended");
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %id, role = %login.role, "could not end the login of a grant that was not written; the reconciler will");
            }
        }
    });
}

impl Engine {
    /// Make the login a grant of lease `lease_id` to `who` holds until
    /// `until`, unless `who` holds as many as the database allows.
    pub(crate) async fn make_login(
        &self,
        who: &str,
        db: &Database,
        rule: &LoginRule,
        lease_id: &str,
        until: Millis,
    ) -> Result<Made, EngineError> {
        let secret = crate::logins::Secret::new().await?;
        let turn = self.login_turns.take(who).await;
        // Counted in the database: every login made for `who` there that
        // still exists, ended or not (a crash-looping caller is held at the
        // cap until its old logins are gone).
        let live = self.logins.held_by(db, who).await?;
        if live >= u64::from(db.max_logins_per_identity) {
            return Err(EngineError::Exhausted(format!(
                "`{who}` holds {live} live logins on database `{}`, as many as it may (max_logins_per_identity); revoke one or wait for one to end",
                db.name
            )));
        }
        let issued = self
            .logins
            .create(db, (lease_id, who), &rule.member_of, until, secret)
            .await?;
        let login = LeaseLogin {
            database: db.name.clone(),
            role: issued.role.clone(),
            group: rule.member_of.clone(),
        };
        Ok(Made {
            issued,
            login,
            lease_id: lease_id.to_owned(),
            _turn: turn,
            undelivered: Some((self.logins.clone(), self.policy())),
        })
    }

    /// A renewal's login (if it holds one) valid until the renewed
    /// lease's end: moved before the lease is written, so that should the
    /// lease not be, the login outlives it until its end, never the other
    /// way round.
    pub(crate) async fn extend_login(
        &self,
        policy: &Policy,
        renewed: &crate::model::Lease,
    ) -> Result<(), EngineError> {
        let Some(login) = &renewed.login else {
            return Ok(());
        };
        let db = self.logins.database(policy, &login.database)?;
        Ok(self
            .logins
            .extend(&db, &login.role, renewed.expires_at)
            .await?)
    }

    /// The record of a login made for `lease_id`, in the grant's own
    /// operation (the password is in no record).
    pub(crate) fn record_login(
        op: &mut Op,
        who: &str,
        lease_id: &str,
        scopes: &[String],
        login: &LeaseLogin,
    ) -> Result<(), EngineError> {
        let what = format!(
            "role `{}` on database `{}`, a member of `{}`",
            login.role, login.database, login.group
        );
        op.record(vec![AuditEntry::ok(
            who,
            Action::DbLoginCreated,
            lease_id,
            scopes,
            &what,
        )])?;
        Ok(())
    }

    /// End the login of every lease that ends, [`AT_ONCE`] at a time, each
    /// retried, each step recorded.
    /// At shutdown (`cancel`) what is queued is left to the reconciler of
    /// the next start.
    pub async fn end_logins(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let rx = self.ended_logins_rx.lock().ok().and_then(|mut r| r.take());
        let Some(mut rx) = rx else { return };
        // A slot per database: one that is down holds up only its own.
        let mut slots: std::collections::HashMap<String, Arc<Semaphore>> = Default::default();
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                next = rx.recv() => next,
            };
            let Some((lease_id, login)) = next else {
                return;
            };
            let slot = slots
                .entry(login.database.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(AT_ONCE)))
                .clone();
            let (me, cancel) = (self.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = me.end_login_retrying(&slot, &lease_id, &login) => {}
                }
            });
        }
    }

    /// Try to end `login`, holding a slot of its database only while a
    /// try runs (not while it waits to try again).
    async fn end_login_retrying(&self, slot: &Semaphore, lease_id: &str, login: &LeaseLogin) {
        for wait in std::iter::once(Duration::ZERO).chain(RETRIES) {
            tokio::time::sleep(wait).await;
            let Ok(_turn) = slot.acquire().await else {
                return;
            };
            match self.end_login(lease_id, login, Some(&login.group)).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %lease_id, role = %login.role, "could not end a database login; retrying");
                }
            }
        }
        tracing::error!(lease = %lease_id, role = %login.role, "could not end a database login; the reconciler will retry");
    }

    /// End `login` (of lease `lease_id`) on its database and record each
    /// step; tell any revocation waiting for it.
    async fn end_login(
        &self,
        lease_id: &str,
        login: &LeaseLogin,
        group: Option<&str>,
    ) -> Result<(), EngineError> {
        let db = self.logins.database(&self.policy(), &login.database)?;
        self.end_login_on(&db, lease_id, login, group).await
    }

    async fn end_login_on(
        &self,
        db: &Database,
        lease_id: &str,
        login: &LeaseLogin,
        group: Option<&str>,
    ) -> Result<(), EngineError> {
        let ended = self.logins.end(db, &login.role, group).await?;
        let _ = self.login_ended.send(lease_id.to_owned());
        self.record_end(lease_id, login, &ended).await
    }

    async fn record_end(
        &self,
        lease_id: &str,
        login: &LeaseLogin,
        ended: &Ended,
    ) -> Result<(), EngineError> {
        let on = format!("role `{}` on database `{}`", login.role, login.database);
        let fate = match ended.role {
            RoleFate::Dropped => format!("{on}: dropped"),
            RoleFate::Kept => format!(
                "{on}: kept without its group and unable to sign in: it owns objects in another database"
            ),
            RoleFate::Gone => format!("{on}: already gone"),
        };
        let by = super::SYSTEM_ACTOR;
        let entries = vec![
            AuditEntry::ok(
                by,
                Action::DbLoginDisabled,
                lease_id,
                &[],
                &format!("{on}: NOLOGIN; {} sessions ended", ended.sessions),
            ),
            AuditEntry::ok(by, Action::DbLoginDropped, lease_id, &[], &fate),
        ];
        self.record(entries).await
    }

    /// Wait until the logins of leases `ids` are ended, or `within`
    /// passes; whether they all were. Subscribe (`login_ends`) before the
    /// revocation commits.
    pub(crate) async fn logins_disabled(
        mut ends: tokio::sync::broadcast::Receiver<String>,
        mut ids: Vec<String>,
        within: Duration,
    ) -> bool {
        let wait = async {
            while !ids.is_empty() {
                match ends.recv().await {
                    Ok(id) => ids.retain(|i| *i != id),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                }
            }
            true
        };
        tokio::time::timeout(within, wait).await.unwrap_or(false)
    }

    /// After a revocation that ended leases `ids` holding logins was
    /// written: wait until those logins are ended (`ends`: subscribed
    /// before the write), or [`REVOKE_WAITS`] passes (the ends go on,
    /// retried, and the reconciler follows them).
    pub(crate) async fn wait_logins_end(
        ids: Vec<String>,
        ends: tokio::sync::broadcast::Receiver<String>,
    ) {
        if ids.is_empty() {
            return;
        }
        let n = ids.len();
        if !Self::logins_disabled(ends, ids, REVOKE_WAITS).await {
            tracing::warn!(
                logins = n,
                "the revoked leases' database logins were not all ended in time; ending them goes on"
            );
        }
    }

    /// Subscribe to the ends of logins (see [`Engine::logins_disabled`]).
    pub(crate) fn login_ends(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.login_ended.subscribe()
    }

    /// The leader's pass over every database (and every one a policy
    /// since dropped, while this broker runs): end each marked role whose
    /// lease is not active (a crash before the lease was written, a failed
    /// end, an end not yet run). A database or a role that fails is logged
    /// and passed over until the next pass. Returns how many it ended.
    pub async fn reconcile_logins(&self) -> u64 {
        let mut n = 0;
        for db in self.logins.every_database(&self.policy()) {
            let marked = match self.logins.marked(&db).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, database = %db.name, "cannot list the logins to reconcile; next pass");
                    continue;
                }
            };
            for (role, lease_id) in marked {
                match self.reconcile_one(&db, role, &lease_id).await {
                    Ok(true) => n += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, database = %db.name, lease = %lease_id, "cannot reconcile a login; next pass");
                    }
                }
            }
        }
        n
    }

    /// End marked `role` unless its lease is active (or may still be being
    /// written); whether it was ended.
    async fn reconcile_one(
        &self,
        db: &Database,
        role: String,
        lease_id: &str,
    ) -> Result<bool, EngineError> {
        // Only a role this deployment would have named so for this lease.
        let Some(made_at) = lease_id_time(lease_id) else {
            return Ok(false);
        };
        if crate::text::require_id("lease_id", lease_id).is_err() || role != db.role_of(lease_id) {
            return Ok(false);
        }
        let group = match self.store().lease(lease_id).await? {
            Some(l) if l.state == LeaseState::Active => return Ok(false),
            Some(l) => l.login.as_ref().map(|g| g.group.clone()),
            None if self.clock.now() < made_at.saturating_add(ORPHAN_AFTER_MS) => {
                return Ok(false);
            }
            None => None,
        };
        let login = LeaseLogin {
            database: db.name.clone(),
            role,
            group: group.clone().unwrap_or_default(),
        };
        self.end_login_on(db, lease_id, &login, group.as_deref())
            .await?;
        self.metrics
            .db_logins
            .get_or_create(&vec![("step", "reconciled")])
            .inc();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_id_says_when_it_was_made() {
        assert_eq!(
            lease_id_time("l_0193a0b1c2d3aabbccddeeff00112233aabb"),
            Some(0x0193_a0b1_c2d3)
        );
        assert_eq!(lease_id_time("r_0193a0b1c2d3"), None);
        assert_eq!(lease_id_time("l_short"), None);
    }
}

//! The engine's error: what went wrong with a call, in terms a caller can act
//! on. `api::status` maps each variant to one gRPC code; only a store that
//! could not persist becomes `UNAVAILABLE`.

use crate::audit::AuditError;
use crate::keys::KeyError;
use crate::policy::Refusal;
use crate::store::StoreError;
use crate::text::{FieldError, NoRandomness};
use crate::token::TokenError;

/// Why an engine call failed. Nothing was changed unless a variant says so.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A field of the request is malformed or out of bounds.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// Policy refuses a scope.
    #[error("refused by policy: {0}")]
    Refused(#[from] Refusal),
    /// The caller may not act on this object (not owner, not admin, not an
    /// approver of it).
    #[error("{0}")]
    NotAllowed(String),
    /// No such object visible to the caller.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// Kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The object is in the wrong state for this operation.
    #[error("{0}")]
    WrongState(String),
    /// An idempotency key was reused with other parameters.
    #[error("`client_request_id`: already used with different parameters")]
    IdempotencyConflict,
    /// The action was already taken by this caller (e.g. a second approval).
    #[error("{0}")]
    Duplicate(String),
    /// The store could not read or persist; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The decision trail could not be appended to.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A token could not be signed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The key ring failed (generation, sealing, a corrupt record).
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The caller holds as much as one identity may (open requests, watch
    /// streams); the message names the limit.
    #[error("{0}")]
    Exhausted(String),
    /// Stored data cannot be read back (e.g. an audit record that does not
    /// decode); nothing was changed.
    #[error("{0}")]
    DataLoss(String),
    /// The broker itself failed (no randomness, a background task died);
    /// nothing was acknowledged.
    #[error("{0}")]
    Internal(String),
    /// Leader-only work by a broker whose term has ended (another broker
    /// leads now); nothing was changed.
    #[error("this broker no longer leads; nothing was changed")]
    Fenced,
    /// A platform token was refused (issue 24): the check is for the log
    /// and the trail; the caller is told only that it is not signed in.
    #[error("platform token refused: {}", .0.check.name())]
    SignIn(crate::federation::Refusal),
    /// A database login could not be made, moved or ended.
    #[error(transparent)]
    Login(#[from] crate::logins::LoginError),
}

impl From<NoRandomness> for EngineError {
    fn from(e: NoRandomness) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<tokio::task::JoinError> for EngineError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Internal(format!("background task failed: {e}"))
    }
}

impl EngineError {
    /// `what` `id` is not visible to the caller (the id is shortened so a
    /// huge input is not echoed back).
    pub(crate) fn not_found(what: &'static str, id: &str) -> Self {
        Self::NotFound {
            what,
            id: id.chars().take(80).collect(),
        }
    }

    /// Which kind of failure: the one classification every answer to a
    /// caller is made from (gRPC codes in `api/status.rs`, HTTP statuses in
    /// the console).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::Refused(_) | Self::NotAllowed(_) => ErrorKind::Denied,
            Self::SignIn(_) => ErrorKind::Unauthenticated,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::WrongState(_) => ErrorKind::WrongState,
            Self::IdempotencyConflict | Self::Duplicate(_) => ErrorKind::Conflict,
            Self::DataLoss(_) => ErrorKind::DataLoss,
            Self::Exhausted(_) => ErrorKind::Exhausted,
            // Only a store that could not persist (or a broker that is
            // stopping) is unavailable: retry later; lost races are
            // contended: retry now; a store asked for the impossible is the
            // wrong state; a corrupt record, a schema mismatch or the
            // broker's own failure is internal.
            _ if self.is_unavailable() => ErrorKind::Unavailable,
            _ if matches!(self.store_error(), Some(StoreError::Contended(_))) => {
                ErrorKind::Contended
            }
            _ if matches!(self.store_error(), Some(StoreError::Refused(_))) => {
                ErrorKind::WrongState
            }
            Self::Fenced => ErrorKind::Unavailable,
            Self::Login(crate::logins::LoginError::Unavailable(..)) => ErrorKind::Unavailable,
            Self::Login(crate::logins::LoginError::NoRandomness) => ErrorKind::Internal,
            Self::Login(_) => ErrorKind::WrongState,
            Self::Store(_)
            | Self::Audit(_)
            | Self::Token(_)
            | Self::Keys(_)
            | Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// What the caller is told: the message when it is about the call, a
    /// fixed line when the broker failed (the detail stays in the log).
    pub fn public_message(&self) -> String {
        match self.kind() {
            ErrorKind::Unavailable if matches!(self.store_error(), Some(StoreError::Stopping)) => {
                StoreError::Stopping.to_string()
            }
            ErrorKind::Unavailable => match self {
                Self::Login(crate::logins::LoginError::Unavailable(db, _)) => {
                    format!("database `{db}` is unavailable; nothing was issued")
                }
                _ => {
                    "the broker could not persist the change; nothing was issued or changed".into()
                }
            },
            ErrorKind::Contended => {
                "other changes to the same records won every try; nothing was changed: retry".into()
            }
            ErrorKind::Internal => "internal error; nothing was issued or changed".into(),
            ErrorKind::Unauthenticated => "not signed in".into(),
            _ => self.to_string(),
        }
    }

    /// Did the store fail to persist, or is the broker stopping (as
    /// opposed to the broker failing)?
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.store_error(),
            Some(StoreError::Unavailable(_) | StoreError::Stopping)
        )
    }

    /// The store's error underneath, wherever it was wrapped.
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            Self::Store(e) | Self::Audit(AuditError::Store(e)) | Self::Keys(KeyError::Store(e)) => {
                Some(e)
            }
            _ => None,
        }
    }
}

/// See [`EngineError::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A field of the call is wrong.
    Invalid,
    /// Policy or ownership says no.
    Denied,
    /// No such thing (or not visible to the caller).
    NotFound,
    /// Not in a state that allows it.
    WrongState,
    /// A retry key reused differently, or done already.
    Conflict,
    /// A stored record no longer decodes.
    DataLoss,
    /// A quota is used up.
    Exhausted,
    /// Other writers won every try: nothing was changed; retry now.
    Contended,
    /// The store could not persist: nothing was changed; retry later.
    Unavailable,
    /// The broker failed.
    Internal,
    /// The caller could not be authenticated.
    Unauthenticated,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a store that could not persist says so; lost races, a store
    /// asked for the impossible and the store's own defects each say what
    /// they are (issue 21, finding 8).
    #[test]
    fn each_store_failure_is_told_as_what_it_is() {
        let cases = [
            (
                StoreError::Unavailable("disk".into()),
                ErrorKind::Unavailable,
                "could not persist",
            ),
            (
                StoreError::Stopping,
                ErrorKind::Unavailable,
                "shutting down",
            ),
            (
                StoreError::Contended("races".into()),
                ErrorKind::Contended,
                "retry",
            ),
            (
                StoreError::Refused("not empty".into()),
                ErrorKind::WrongState,
                "not empty",
            ),
            (
                StoreError::Internal("encode".into()),
                ErrorKind::Internal,
                "internal error",
            ),
            (
                StoreError::Corrupt {
                    tree: "leases",
                    key: "k".into(),
                    detail: "x".into(),
                },
                ErrorKind::Internal,
                "internal error",
            ),
        ];
        for (store, kind, says) in cases {
            for e in [
                EngineError::Store(store.clone()),
                EngineError::Audit(AuditError::Store(store.clone())),
                EngineError::Keys(KeyError::Store(store.clone())),
            ] {
                assert_eq!(e.kind(), kind, "{e:?}");
                let told = e.public_message();
                assert!(told.contains(says), "{e:?} told as {told:?}");
                if kind != ErrorKind::Unavailable {
                    assert!(
                        !told.contains("could not persist"),
                        "{e:?} told as {told:?}"
                    );
                }
            }
        }
    }
}

//! The one place a gRPC `Status` is made: the table from domain errors to
//! codes, and the few statuses the transport itself answers with.

use tonic::{Code, Status};

use crate::engine::EngineError;
use crate::text::FieldError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::Invalid(_) => Code::InvalidArgument,
            EngineError::Refused(_) | EngineError::NotAllowed(_) => Code::PermissionDenied,
            EngineError::NotFound { .. } => Code::NotFound,
            EngineError::WrongState(_) => Code::FailedPrecondition,
            EngineError::IdempotencyConflict | EngineError::Duplicate(_) => Code::AlreadyExists,
            EngineError::DataLoss(_) => Code::DataLoss,
            EngineError::Exhausted(_) => Code::ResourceExhausted,
            // Only a store that could not persist is UNAVAILABLE (retry
            // later); a corrupt record, a schema mismatch or the broker's own
            // failure is INTERNAL.
            _ if e.is_unavailable() => Code::Unavailable,
            EngineError::Store(_)
            | EngineError::Audit(_)
            | EngineError::Token(_)
            | EngineError::Keys(_)
            | EngineError::Internal(_) => Code::Internal,
        };
        match code {
            Code::Internal | Code::Unavailable => {
                tracing::error!(error = %e, "request failed");
                // Detail stays in the log; the caller learns nothing was done.
                let msg = if code == Code::Unavailable {
                    "the broker could not persist the change; nothing was issued or changed"
                } else {
                    "internal error; nothing was issued or changed"
                };
                Status::new(code, msg)
            }
            _ => Status::new(code, e.to_string()),
        }
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        EngineError::from(e).into()
    }
}

/// A call without a usable client identity (generic on the wire).
pub fn unauthenticated() -> Status {
    Status::unauthenticated("a client certificate with one spiffe:// URI SAN is required")
}

/// A stream ended because the broker is stopping.
pub fn shutting_down(what: &str) -> Status {
    Status::unavailable(format!("broker is shutting down; {what} again to resume"))
}

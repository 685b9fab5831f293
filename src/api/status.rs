//! The one table from domain errors to gRPC status codes.

use tonic::{Code, Status};

use crate::grant::GrantError;
use crate::store::StoreError;

impl From<GrantError> for Status {
    fn from(e: GrantError) -> Self {
        let code = match &e {
            GrantError::Invalid { .. } => Code::InvalidArgument,
            GrantError::Refused(_) | GrantError::NotAllowed(_) => Code::PermissionDenied,
            GrantError::NotFound { .. } => Code::NotFound,
            GrantError::WrongState(_) => Code::FailedPrecondition,
            GrantError::IdempotencyConflict | GrantError::Duplicate(_) => Code::AlreadyExists,
            GrantError::NotSupported(_) => Code::Unimplemented,
            GrantError::Store(StoreError::Corrupt { .. } | StoreError::Schema { .. }) => {
                Code::Internal
            }
            GrantError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            GrantError::Token(_) | GrantError::Keys(_) => Code::Internal,
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

//! The one place a gRPC `Status` is made: the table from domain errors to
//! codes, and the few statuses the transport itself answers with.

use tonic::{Code, Status};

use crate::console::LinkError;
use crate::console::session::SecretError;
use crate::engine::{EngineError, ErrorKind};
use crate::text::FieldError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let code = match e.kind() {
            ErrorKind::Invalid => Code::InvalidArgument,
            ErrorKind::Denied => Code::PermissionDenied,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::WrongState => Code::FailedPrecondition,
            ErrorKind::Conflict => Code::AlreadyExists,
            ErrorKind::DataLoss => Code::DataLoss,
            ErrorKind::Exhausted => Code::ResourceExhausted,
            ErrorKind::Contended => Code::Aborted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
        };
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::error!(error = %e, "request failed");
        }
        Status::new(code, e.public_message())
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        EngineError::from(e).into()
    }
}

impl From<LinkError> for Status {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::NotAReviewer(_) => Status::permission_denied(e.to_string()),
            LinkError::BadRequestId(_) => Status::invalid_argument(e.to_string()),
            LinkError::TooFast(_) => Status::resource_exhausted(e.to_string()),
            LinkError::Secret(SecretError::Store(s)) => EngineError::Store(s).into(),
            LinkError::Secret(other) => EngineError::Internal(other.to_string()).into(),
        }
    }
}

/// `CreateConsoleLink` on a broker that serves no console.
pub fn no_console() -> Status {
    Status::failed_precondition("this broker serves no approver console (start it with --console)")
}

/// A call without a usable client identity (generic on the wire).
pub fn unauthenticated() -> Status {
    Status::unauthenticated("a client certificate with one spiffe:// URI SAN is required")
}

/// A stream ended because the broker is stopping.
pub fn shutting_down(what: &str) -> Status {
    Status::unavailable(format!("broker is shutting down; {what} again to resume"))
}

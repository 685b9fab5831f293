//! Process exit codes, and the one mapping from gRPC statuses and client
//! failures to them.
//!
//! 0 success, 1 failure, 2 denied by policy or a person, 3 pending, expired
//! or timed out waiting, 64 usage error (bad flags or a field the broker
//! refused).

use tonic::{Code, Status};

use crate::client::{CLOSED_HINT, ClientError, Fault, TLS_HINT, fault, render_sources};

/// Success.
pub const OK: i32 = 0;
/// Failure (connection, server error).
pub const FAILURE: i32 = 1;
/// Denied by policy or by a person.
pub const DENIED: i32 = 2;
/// Pending, expired or timed out waiting.
pub const PENDING: i32 = 3;
/// Usage error: bad flags, or the broker refused a field.
pub const USAGE: i32 = 64;

/// A command failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// Message for stderr.
    pub message: String,
}

/// A usage error (exit 64).
pub fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        code: USAGE,
        message: msg.into(),
    }
}

/// A plain failure (exit 1).
pub fn failure(msg: impl Into<String>) -> Failure {
    Failure {
        code: FAILURE,
        message: msg.into(),
    }
}

/// The exit code a gRPC status means.
pub fn code_of(c: Code) -> i32 {
    match c {
        Code::PermissionDenied => DENIED,
        Code::InvalidArgument | Code::AlreadyExists => USAGE,
        _ => FAILURE,
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        let head = format!("{:?}: {}", s.code(), s.message());

        let message = match fault(&s) {
            Fault::Tls => format!("{} ({TLS_HINT})", render_sources(&head, &s)),
            Fault::Closed => format!("{} ({CLOSED_HINT})", render_sources(&head, &s)),
            Fault::Refused => {
                "the broker stopped answering (connection refused; is `portcullis serve` running?)"
                    .to_owned()
            }
            Fault::Other => render_sources(&head, &s),
        };
        Self {
            code: code_of(s.code()),
            message,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = if matches!(e, ClientError::Usage(_)) {
            USAGE
        } else {
            FAILURE
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_documented_codes() {
        assert_eq!(Failure::from(Status::permission_denied("no")).code, DENIED);
        assert_eq!(Failure::from(Status::invalid_argument("ttl")).code, USAGE);
        assert_eq!(Failure::from(Status::already_exists("twice")).code, USAGE);
        assert_eq!(Failure::from(Status::not_found("gone")).code, FAILURE);
        assert_eq!(
            Failure::from(Status::permission_denied("scope `x`")).message,
            "PermissionDenied: scope `x`"
        );
    }
}

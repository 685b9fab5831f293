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

/// A status code in words for people (the gRPC name is for programs).
fn said(c: Code) -> &'static str {
    match c {
        Code::InvalidArgument => "invalid",
        Code::PermissionDenied => "denied",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "not possible now",
        Code::ResourceExhausted => "limit reached",
        Code::Aborted => "conflict, try again",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "timed out",
        Code::Unauthenticated => "not authenticated",
        Code::Cancelled => "cancelled",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not supported by this broker",
        _ => "broker error",
    }
}

/// The command-line flag for a request field the broker names, where the
/// two differ.
const FLAGS: [(&str, &str); 5] = [
    ("justification", "--reason"),
    ("subject_token", "--token"),
    ("for_identity", "--for"),
    ("cnf_x5t_s256", "--presented-cert"),
    ("request_id", "the request id"),
];

/// The broker's message, with the flag that sets each field it names.
fn with_flags(message: &str) -> String {
    let named: Vec<String> = FLAGS
        .iter()
        .filter(|(field, flag)| message.contains(&format!("`{field}`")) && !message.contains(flag))
        .map(|(field, flag)| format!("`{field}` is {flag}"))
        .collect();
    if named.is_empty() {
        message.to_owned()
    } else {
        format!("{message} ({})", named.join("; "))
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        let head = format!("{}: {}", said(s.code()), with_flags(s.message()));

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
        // Issue 27, item 8: in words, and with the flag a field is set by.
        assert_eq!(
            Failure::from(Status::permission_denied("scope `x`")).message,
            "denied: scope `x`"
        );
        assert_eq!(
            Failure::from(Status::invalid_argument("`justification` is required")).message,
            "invalid: `justification` is required (`justification` is --reason)"
        );
    }
}

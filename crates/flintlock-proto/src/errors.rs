//! How a Flintlock host reports failure, and what a client should do about it.
//!
//! A real flintlockd answers almost every failure with code UNKNOWN; "not found" is only
//! visible in the message text. Every decision keyed on a gRPC status is made here, once.

use tonic::{Code, Status};

/// What a failed Flintlock call means to its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The VM does not exist (code NOT_FOUND, or UNKNOWN with "not found" in the message).
    NotFound,
    /// The request was refused as malformed: retrying the same request cannot help.
    Invalid,
    /// The token or certificate was refused.
    Unauthenticated,
    /// The host could not be reached or was overloaded: retry with back-off.
    Transient,
    /// Anything else the host reported.
    Other,
}

impl Failure {
    /// Classifies a status from any Flintlock host.
    pub fn of(status: &Status) -> Self {
        match status.code() {
            Code::NotFound => Failure::NotFound,
            Code::Unknown if is_not_found_message(status.message()) => Failure::NotFound,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => Failure::Invalid,
            Code::Unauthenticated | Code::PermissionDenied => Failure::Unauthenticated,
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted => Failure::Transient,
            _ => Failure::Other,
        }
    }

    /// Whether the same call may succeed if retried later.
    pub fn is_retryable(self) -> bool {
        matches!(self, Failure::Transient)
    }
}

/// Whether a flintlockd error message says "not found".
///
/// Upstream wraps errors as `... microvm <ns>/<name> not found` or `... not found: <uid>`.
fn is_not_found_message(message: &str) -> bool {
    message.to_ascii_lowercase().contains("not found")
}

/// A closed set of metric labels for gRPC codes (never free text).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_is_recognised_the_way_flintlockd_reports_it() {
        let upstream = Status::unknown("getting microvm spec: microvm 01HXYZ not found");
        assert_eq!(Failure::of(&upstream), Failure::NotFound);
        assert_eq!(Failure::of(&Status::not_found("vm")), Failure::NotFound);
        assert_eq!(Failure::of(&Status::unknown("disk full")), Failure::Other);
    }

    #[test]
    fn only_transport_trouble_is_retried() {
        assert!(Failure::of(&Status::unavailable("connection refused")).is_retryable());
        assert!(Failure::of(&Status::deadline_exceeded("slow")).is_retryable());
        assert!(!Failure::of(&Status::invalid_argument("memory")).is_retryable());
        assert!(!Failure::of(&Status::unauthenticated("token")).is_retryable());
        // UNKNOWN is flintlockd's code for nearly everything, including a failed create that
        // may have left a VM behind: retrying it blindly could make a second VM.
        assert!(!Failure::of(&Status::unknown("saving spec")).is_retryable());
    }
}

//! How the process ends: the one place the library's errors meet the
//! contract's exit codes (0 done, 1 failure, 2 bad input, 3 not applied).
//! The command line and the tools (the demo prints them) both use it.

use transfer_worker::error::Error;

/// How the process ends, per the contract's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Done = 0,
    /// Anything else: the database or SQS unreachable, a task that died.
    Failure = 1,
    /// Bad input or usage, including an id that does not exist.
    BadInput = 2,
    /// A valid request that did not apply; nothing was written.
    NotApplied = 3,
}

/// The process's exit code for an error: the one place the library's errors
/// meet the contract's codes.
pub fn exit_code(err: &Error) -> ExitCode {
    match err {
        Error::Invalid(_) | Error::NotFound { .. } => ExitCode::BadInput,
        Error::Refused(_) => ExitCode::NotApplied,
        Error::Database(_)
        | Error::DatabaseAt { .. }
        | Error::Migrate(_)
        | Error::Sqs(_)
        | Error::Unavailable(_)
        | Error::SchemaMismatch(_)
        | Error::Inconsistent(_)
        | Error::Failed(_) => ExitCode::Failure,
    }
}

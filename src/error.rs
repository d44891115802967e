//! The library's one error type.
//!
//! Every failure a caller can act on has its own variant: bad input, a valid
//! request that did not apply (naming the current state, with nothing
//! written), and everything else. The command line maps them to exit codes
//! (2, 3, 1; see `src/cli/mod.rs`). Constraint violations are
//! turned into these domain errors where the query runs (see [`crate::db`]).

use std::fmt;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong: a malformed value, an out-of-range amount,
    /// an unknown account or transfer. Exit code 2.
    #[error("{0}")]
    Invalid(String),

    /// The named thing does not exist. Exit code 2.
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: i64 },

    /// A valid request that did not apply: a guarded update matched no row, an
    /// idempotency key reused with other parameters, an id already taken.
    /// Nothing was written. Exit code 3.
    #[error("{0}")]
    NotApplied(String),

    /// PostgreSQL failed in a way that is not the request's fault.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// SQS failed in a way that is not the event's fault (an outage).
    #[error("SQS error: {0}")]
    Sqs(String),

    /// A service we need cannot be reached (the message names it and why).
    /// Exit code 1.
    #[error("{0}")]
    Unavailable(String),

    /// The database's schema is not the one this binary expects (never
    /// migrated, or migrated by an older version). Exit code 1.
    #[error("{0}")]
    SchemaMismatch(String),

    /// A write did not change the rows it must have (e.g. a guarded update
    /// under our own row lock matched fewer rows than claimed). The
    /// transaction is rolled back rather than committed half-applied.
    #[error("inconsistent write, rolled back: {0}")]
    Inconsistent(String),

    /// Anything else that went wrong (a task that panicked, a deadline that
    /// passed). Exit code 1.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn invalid(msg: impl fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }

    pub fn not_applied(msg: impl fmt::Display) -> Self {
        Error::NotApplied(msg.to_string())
    }
}

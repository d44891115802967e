//! The library's one error type.
//!
//! Every failure a caller can act on has its own variant: bad input, a valid
//! request that did not apply (naming the current state, with nothing
//! written), and everything else. The command line maps them to exit codes
//! (2, 3, 1; see `src/cli/mod.rs`). Constraint violations are
//! turned into these domain errors where the query runs (see [`crate::db`]).

use std::fmt;

use crate::account::AccountId;
use crate::outbox::EventState;
use crate::transfer::{Amount, RefundStatus, TransferId, TransferStatus};

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

    /// A valid request that did not apply (see [`Refusal`]). Nothing was
    /// written. Exit code 3.
    #[error(transparent)]
    Refused(#[from] Refusal),

    /// PostgreSQL failed in a way that is not the request's fault.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// The same, saying what was being done (which step, which transfer).
    #[error("database error while {at}: {source}")]
    DatabaseAt { at: String, source: sqlx::Error },

    /// Applying the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// SQS failed in a way that is not the event's fault (an outage), with
    /// its code and request id.
    #[error("SQS error: {0}")]
    Sqs(crate::outbox::delivery::SqsFailure),

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

    /// The database error inside, if this is one.
    pub fn sql(&self) -> Option<&sqlx::Error> {
        match self {
            Error::Database(e) | Error::DatabaseAt { source: e, .. } => Some(e),
            _ => None,
        }
    }

    /// Says what was being done when the database failed.
    pub fn at(self, what: impl fmt::Display) -> Self {
        match self {
            Error::Database(source) => Error::DatabaseAt { at: what.to_string(), source },
            other => other,
        }
    }
}

/// Why a valid request did not apply. Each names the state it found;
/// nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A cancel of a transfer that is no longer PENDING.
    #[error("transfer {transfer} is {status}; only a PENDING transfer can be cancelled; nothing written")]
    NotCancellable { transfer: TransferId, status: TransferStatus },
    /// A refund of a transfer that did not succeed (yet, or at all).
    #[error("transfer {transfer} is {status}; only a SUCCEEDED transfer can be refunded; nothing written")]
    NotRefundable { transfer: TransferId, status: TransferStatus },
    /// A second refund of one transfer.
    #[error("transfer {transfer} already has a refund (refund_status {refund_status}); nothing written")]
    AlreadyRefunded { transfer: TransferId, refund_status: RefundStatus },
    /// An idempotency key already used for a transfer with other parameters.
    #[error("{}idempotency key {key:?} was already used for a transfer with other parameters; nothing enqueued", at(*.line))]
    KeyReused { key: String, line: Option<usize> },
    /// An idempotency key of a transfer since pruned (its record is kept for
    /// the keys' window), with other parameters.
    #[error(
        "{}idempotency key {key:?} was used for transfer {transfer} (since pruned) with other parameters; nothing enqueued",
        at(*.line)
    )]
    KeyRetired { key: String, transfer: TransferId, line: Option<usize> },
    /// The same key twice in one bulk file, with other parameters.
    #[error(
        "line {line}: idempotency key {key:?} is used on line {first_line} with other parameters; nothing enqueued"
    )]
    KeyRepeatedInFile { key: String, line: usize, first_line: usize },
    /// An enqueue that would take the source's transfers accepted today above its daily limit.
    #[error(
        "{}daily limit of account {account} exceeded: {accepted} already accepted today (UTC) + {amount} > {limit}; nothing enqueued",
        at(*.line)
    )]
    DailyLimit { account: AccountId, accepted: i64, amount: Amount, limit: i64, line: Option<usize> },
    /// A request made with a guard another request holds right now.
    #[error("guard {guard:?} is held by another request in progress; nothing written")]
    GuardHeld { guard: String },
    /// An account id already taken.
    #[error("account {account} already exists")]
    AccountExists { account: AccountId },
    /// A requeue of an event that is not dead.
    #[error("event {event} is {state}; only dead events can be requeued; nothing written")]
    NotDead { event: String, state: EventState },
}

/// "line N: " for a bulk file's line, nothing for a single request.
fn at(line: Option<usize>) -> String {
    line.map(|n| format!("line {n}: ")).unwrap_or_default()
}

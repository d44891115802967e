//! The concurrency tools the worker is built on, as library features a
//! producer can use in its own code, each with a runnable example in
//! `examples/` and measured side by side by `transfer-worker lab`:
//!
//! - [`advisory`]: advisory locks on 64-bit keys, from `(i32, i32)` pairs or
//!   from strings hashed in a namespace (the same hash in Rust and in SQL:
//!   `transfer_worker_lock_key(namespace, key)`); transaction-scoped, waiting
//!   or trying, and a session-scoped [`advisory::SessionLock`] whose release
//!   cannot be forgotten. The product's duplicate-request guard
//!   ([`advisory::Guard`]), its daily-limit serialization and its single
//!   pruner are built on them.
//! - [`isolation`]: a closure run in a SERIALIZABLE or REPEATABLE READ
//!   transaction from the pool the caller already has, retried on
//!   serialization failures and deadlocks with backoff, bounded.
//! - [`optimistic`]: `UPDATE ... WHERE version = $read` retried with backoff
//!   while the version keeps changing, bounded.
//!
//! Which to use (the README's "Concurrency lab" shows a real run): a guarded
//! `UPDATE ... WHERE <state>` with rows affected for a state transition; a
//! row lock (`FOR UPDATE`) to read and then write one row; an advisory
//! try-lock to refuse a second concurrent request for the same thing; a
//! version column when contention is rare and a transaction must not hold
//! locks across a slow step; SERIALIZABLE for multi-row invariants no single
//! lock covers.

pub mod advisory;
pub mod isolation;
pub mod optimistic;

use std::time::Duration;

use crate::error::Error;
use crate::retry::RetryPolicy;

/// How often, and how patiently, a conflicting attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retries {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The delay before each retry (exponential, with jitter).
    pub policy: RetryPolicy,
}

impl Default for Retries {
    /// 10 attempts, 5 ms doubling to at most 500 ms.
    fn default() -> Self {
        Retries {
            max_attempts: 10,
            policy: RetryPolicy { initial: Duration::from_millis(5), max: Duration::from_millis(500), multiplier: 2.0 },
        }
    }
}

/// What a retried operation produced, and after how many attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    pub value: T,
    /// 1 when the first attempt went through.
    pub attempts: u32,
}

/// Why a retried operation did not go through.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// Every attempt met a serialization failure (40001) or a deadlock
    /// (40P01); `last` is the last one.
    #[error("gave up after {attempts} attempts, each a serialization failure or deadlock; the last: {last}")]
    Exhausted { attempts: u32, last: Error },
    /// The row's version changed under every attempt.
    #[error("gave up after {attempts} attempts: the row's version changed under each")]
    VersionConflict { attempts: u32 },
    /// An error no retry would fix (returned at once).
    #[error(transparent)]
    Failed(#[from] Error),
}

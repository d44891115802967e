//! Stricter isolation from the pool the caller already has.
//!
//! [`run_in`] begins a transaction at the level asked for (`BEGIN ISOLATION
//! LEVEL ...`: the level is the transaction's, so the connection goes back
//! to the pool at the server's default level, with no second pool), runs the
//! closure on it and commits. A serialization failure (40001) or a deadlock
//! (40P01), from any statement or from the commit itself, rolls back and
//! runs the closure again after a backoff with jitter, up to
//! `max_attempts` in all; then [`RetryError::Exhausted`] carries the last
//! error and the number of attempts. Any other error is returned at once.
//!
//! The closure must be safe to run again: it sees a fresh snapshot each time
//! and must not act outside the database (send no message) before the
//! commit.
//!
//! # Example
//!
//! ```rust,ignore
//! let done = run_in(&pool, Isolation::Serializable, &Retries::default(), |conn| {
//!     Box::pin(async move {
//!         let on_call: i64 = sqlx::query_scalar("SELECT count(*) FROM doctors WHERE on_call").fetch_one(&mut *conn).await?;
//!         if on_call < 2 { return Ok(false); }
//!         sqlx::query("UPDATE doctors SET on_call = false WHERE name = 'alice'").execute(&mut *conn).await?;
//!         Ok(true)
//!     })
//! })
//! .await?;
//! println!("{} after {} attempts", done.value, done.attempts);
//! ```
//!
//! (`examples/serializable.rs` runs it.)

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};

use super::{Committed, Retries, RetryError};
use crate::db;
use crate::error::{Error, Result};

/// The isolation levels above PostgreSQL's default (READ COMMITTED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    RepeatableRead,
    Serializable,
}

impl Isolation {
    fn begin(self) -> &'static str {
        match self {
            Isolation::RepeatableRead => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            Isolation::Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        }
    }
}

/// Whether an error is one a retry of the whole transaction resolves.
pub fn is_retryable(err: &Error) -> bool {
    err.sql().and_then(db::sqlstate).is_some_and(|code| code == "40001" || code == "40P01")
}

/// Runs `work` in a transaction at `level`, retried as the module docs say.
pub async fn run_in<T, F>(
    pool: &PgPool,
    level: Isolation,
    retries: &Retries,
    mut work: F,
) -> Result<Committed<T>, RetryError>
where
    F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T>>,
{
    let max = retries.max_attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = async {
            let mut tx = pool.begin_with(level.begin()).await?;
            let value = work(&mut tx).await?;
            tx.commit().await?;
            Ok::<T, Error>(value)
        }
        .await;
        match outcome {
            Ok(value) => return Ok(Committed { value, attempts: attempt }),
            Err(e) if is_retryable(&e) && attempt < max => {
                tokio::time::sleep(retries.policy.delay_for_attempt(attempt)).await;
            }
            Err(e) if is_retryable(&e) => return Err(RetryError::Exhausted { attempts: attempt, last: e }),
            Err(e) => return Err(RetryError::Failed(e)),
        }
    }
}

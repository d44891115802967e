//! Optimistic concurrency: read a row with its version, write it back only
//! if the version is still the one read, and try again if not.
//!
//! ```sql
//! UPDATE t SET ..., version = version + 1 WHERE id = $1 AND version = $2
//! ```
//!
//! Zero rows updated means another writer got there first: [`retry`] reads
//! again (the closure's next call) after a backoff with jitter, up to
//! `max_attempts` in all, then gives up with [`RetryError::VersionConflict`].
//! No lock is held between the read and the write, so a slow step between
//! them (a call to another service) blocks nobody; the price is a retry per
//! conflict, which is cheap when conflicts are rare and wasteful when they
//! are not (see `transfer-worker lab`).
//!
//! # Example
//!
//! ```rust,ignore
//! let done = retry(&Retries::default(), || async {
//!     let (value, version): (i64, i64) =
//!         sqlx::query_as("SELECT value, version FROM counter WHERE id = 1").fetch_one(&pool).await?;
//!     let rows = sqlx::query("UPDATE counter SET value = $1, version = version + 1 WHERE id = 1 AND version = $2")
//!         .bind(value + 1).bind(version).execute(&pool).await?.rows_affected();
//!     Ok(Attempt::from_rows_affected(rows))
//! })
//! .await?;
//! ```
//!
//! (`examples/optimistic.rs` runs it.)

use std::future::Future;

use super::{Committed, Retries, RetryError};
use crate::error::Result;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt<T> {
    /// The versioned write applied.
    Done(T),
    /// The version changed since it was read: read again.
    Conflict,
}

impl Attempt<()> {
    /// From the rows a versioned `UPDATE ... WHERE version = $read` affected.
    pub fn from_rows_affected(rows: u64) -> Attempt<()> {
        if rows == 0 {
            Attempt::Conflict
        } else {
            Attempt::Done(())
        }
    }
}

/// Runs `attempt` (read, then versioned write) until it is not a conflict,
/// as the module docs say.
pub async fn retry<T, F, Fut>(retries: &Retries, mut attempt: F) -> Result<Committed<T>, RetryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Attempt<T>>>,
{
    let max = retries.max_attempts.max(1);
    for n in 1..=max {
        match attempt().await? {
            Attempt::Done(value) => return Ok(Committed { value, attempts: n }),
            Attempt::Conflict if n < max => tokio::time::sleep(retries.policy.delay_for_attempt(n)).await,
            Attempt::Conflict => {}
        }
    }
    Err(RetryError::VersionConflict { attempts: max })
}

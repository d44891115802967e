//! Periodic upkeep of the `run` process: folds the counting triggers'
//! deltas into the state totals (see the `state_counts` migration), so that
//! `status` and `/metrics` stay cheap. Any replica may do it; concurrent
//! ones skip (an advisory lock inside `compact_state_counts()`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::retry::RetryPolicy;
use crate::service::{self, Pass};

/// How often the upkeep runs.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One round of upkeep; returns how many delta rows were folded.
pub async fn run_once(pool: &PgPool) -> Result<i64> {
    crate::status::compact_counts(pool).await
}

/// Runs the upkeep every [`INTERVAL`] until `shutdown`.
pub async fn run(pool: PgPool, shutdown: CancellationToken, retry: RetryPolicy) {
    let never = Arc::new(Notify::new());
    service::run_loop(shutdown, never, INTERVAL, retry, move || {
        let pool = pool.clone();
        Box::pin(async move {
            match run_once(&pool).await {
                Ok(_) => Pass::Idle,
                Err(e) => {
                    tracing::warn!(error = %e, "upkeep failed; will retry");
                    Pass::Unavailable
                }
            }
        })
    })
    .await
}

//! Periodic upkeep of the `run` process:
//! - every second, folds the counting triggers' deltas into the state totals
//!   (see the `state_counts` migration), so that `status` and `/metrics`
//!   stay cheap;
//! - every `prune_interval`, prunes what retention says (see
//!   [`crate::retention`]): published events older than 7 days by default.
//!
//! Any replica may do either; concurrent ones skip (an advisory lock inside
//! `compact_state_counts()`, and one around each prune run).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::retention::{self, Cursors, PruneConfig};
use crate::retry::RetryPolicy;
use crate::service::{self, Pass};

/// How often the counters are folded.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What the upkeep does besides folding counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceConfig {
    pub prune: PruneConfig,
    /// How often to prune (default 60 s).
    pub prune_interval: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            prune: PruneConfig {
                published_older_than: Some(Duration::from_secs(7 * 86_400)),
                transfers_older_than: None,
                keys_older_than: Some(retention::DEFAULT_KEYS_OLDER_THAN),
            },
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// One round of folding; returns how many delta rows were folded.
pub async fn run_once(pool: &PgPool) -> Result<i64> {
    crate::status::compact_counts(pool).await
}

struct State {
    last_prune: Option<Instant>,
    cursors: Cursors,
}

/// Runs the upkeep until `shutdown`.
pub async fn run(pool: PgPool, config: MaintenanceConfig, shutdown: CancellationToken, retry: RetryPolicy) {
    let never = Arc::new(Notify::new());
    let state = Arc::new(tokio::sync::Mutex::new(State { last_prune: None, cursors: Cursors::default() }));
    service::run_loop(shutdown, never, INTERVAL, retry, move || {
        let (pool, state) = (pool.clone(), state.clone());
        Box::pin(async move {
            if let Err(e) = run_once(&pool).await {
                tracing::warn!(error = %e, "folding the state counters failed; will retry");
                return Pass::Unavailable;
            }
            let mut state = state.lock().await;
            let p = &config.prune;
            let wants_prune =
                p.published_older_than.is_some() || p.transfers_older_than.is_some() || p.keys_older_than.is_some();
            if wants_prune && state.last_prune.is_none_or(|t| t.elapsed() >= config.prune_interval) {
                state.last_prune = Some(Instant::now());
                match retention::prune_exclusively(&pool, config.prune, &mut state.cursors).await {
                    Ok(Some(p)) if p.published_events + p.transfers + p.retired_keys > 0 => {
                        tracing::info!(
                            published_events = p.published_events,
                            transfers = p.transfers,
                            retired_keys = p.retired_keys,
                            "pruned"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning failed; will retry at the next interval"),
                }
            }
            Pass::Idle
        })
    })
    .await
}

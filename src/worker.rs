//! The `run` process: apply tasks, relay tasks and the wake-up listener, and
//! their orderly shutdown.
//!
//! Shutdown order matters for "nothing half-done": first the apply tasks stop
//! claiming and finish (commit or roll back) the batch they hold; then the
//! relay finishes its pass and drains what those last batches wrote, within
//! the shutdown bound; whatever is left stays pending in the outbox and goes
//! out on the next start. Nothing is lost at any point, since every step is a
//! committed transaction.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Result;
use crate::outbox::relay::{Relay, RelayConfig};
use crate::outbox::sqs::Publisher;
use crate::retry::RetryPolicy;
use crate::service::{self, Pass};
use crate::transfer::apply::{Applier, ApplyConfig};
use crate::wake::Wakers;

/// Everything `run` can be tuned with (see `transfer-worker run --help`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Apply tasks in this process (default 4).
    pub workers: usize,
    /// Relay tasks in this process (default 1; each keeps several SQS calls in flight).
    pub relays: usize,
    pub apply: ApplyConfig,
    pub relay: RelayConfig,
    /// Longest idle sleep of an apply task; NOTIFY wakes it sooner.
    pub poll_interval: Duration,
    /// Backoff while the database is unavailable.
    pub db_retry: RetryPolicy,
    /// How long shutdown waits for in-flight work before giving up on it.
    pub shutdown_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            workers: 4,
            relays: 1,
            apply: ApplyConfig::default(),
            relay: RelayConfig::default(),
            poll_interval: Duration::from_millis(500),
            db_retry: RetryPolicy::default(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Runs until `shutdown` is cancelled, then stops in order (see module docs).
pub async fn run(pool: PgPool, publisher: Publisher, config: WorkerConfig, shutdown: CancellationToken) -> Result<()> {
    let wakers = Wakers::default();
    let background = TaskTracker::new();
    background.spawn(wakers.clone().listen(pool.clone(), shutdown.clone()));

    let appliers = TaskTracker::new();
    for task in 0..config.workers.max(1) {
        let applier = Arc::new(Applier::new(pool.clone(), config.apply.clone()));
        let (shutdown, wake, batch_size) = (shutdown.clone(), wakers.work.clone(), config.apply.batch_size);
        appliers.spawn(service::run_loop(shutdown, wake, config.poll_interval, config.db_retry, move || {
            let applier = applier.clone();
            Box::pin(async move {
                match applier.run_once().await {
                    Ok(c) if c.claimed as i64 >= batch_size => Pass::Busy,
                    Ok(_) => Pass::Idle,
                    Err(e) => {
                        tracing::warn!(task, error = %e, "apply pass failed; will retry");
                        Pass::Unavailable
                    }
                }
            })
        }));
    }
    appliers.close();

    // The relay stops only after the apply tasks, so it can drain their last events.
    let relay_stop = CancellationToken::new();
    let relay = Arc::new(Relay::new(pool.clone(), publisher, config.relay.clone(), wakers.outbox.clone()));
    let relays = TaskTracker::new();
    for _ in 0..config.relays.max(1) {
        let (relay, stop) = (relay.clone(), relay_stop.clone());
        relays.spawn(relay.run(stop));
    }
    relays.close();
    tracing::info!(workers = config.workers, relays = config.relays, "worker running");

    shutdown.cancelled().await;
    let deadline = Instant::now() + config.shutdown_timeout;
    if tokio::time::timeout_at(deadline, appliers.wait()).await.is_err() {
        tracing::warn!(
            tasks = appliers.len(),
            "apply tasks still running at the shutdown deadline; their transactions roll back"
        );
    }
    relay_stop.cancel();
    if tokio::time::timeout_at(deadline, relays.wait()).await.is_err() {
        tracing::warn!(tasks = relays.len(), "relay still sending at the shutdown deadline; its events stay pending");
    } else {
        drain(&relay, deadline).await;
    }
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), background.wait()).await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Publishes what is pending until nothing is, SQS is unavailable, or the deadline.
async fn drain(relay: &Relay, deadline: Instant) {
    loop {
        match tokio::time::timeout_at(deadline, relay.run_once()).await {
            Ok(Ok(c)) if c.claimed > 0 && c.unavailable == 0 => continue,
            Ok(Ok(_)) => return,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "final relay pass failed; events stay pending");
                return;
            }
            Err(_) => {
                tracing::warn!("final relay pass cut short by the shutdown deadline; events stay pending");
                return;
            }
        }
    }
}

//! How long the benchmark's transactions waited on locks: a sampler that
//! looks at `pg_stat_activity` every few milliseconds and counts the backends
//! of the scratch database that are waiting on a lock. (PostgreSQL keeps no
//! per-statement lock-wait totals; sampling gives the same figure within a
//! sample period per wait.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

/// How often the sampler looks.
const PERIOD: Duration = Duration::from_millis(5);

pub struct LockWaits {
    stop: Arc<AtomicBool>,
    waited_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LockWaits {
    pub fn start(pool: PgPool) -> LockWaits {
        let stop = Arc::new(AtomicBool::new(false));
        let waited_ms = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), waited_ms.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                )
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                w.fetch_add(waiting as u64 * PERIOD.as_millis() as u64, Ordering::Relaxed);
            }
        });
        LockWaits { stop, waited_ms, task }
    }

    /// Stops sampling; the total lock wait, in ms, summed over backends.
    pub async fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.waited_ms.load(Ordering::Relaxed) as f64
    }
}

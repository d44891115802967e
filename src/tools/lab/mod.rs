//! `lab`: the concurrency experiment, on a scratch database next to the
//! user's own, with the library's own tools ([`transfer_worker::concurrency`]).
//! Three scenarios, each run once per strategy (and `repeat` times over):
//!
//! - [`counter`]: W workers each add 1 to one counter M times (default
//!   2 x 25: the experiment in which the naive read-modify-write famously ends
//!   near 27 instead of 50);
//! - [`refund`]: W concurrent refund requests for one succeeded payment;
//!   exactly one refund (and one event) is right;
//! - [`purchase`]: W concurrent purchases from one user, each with a fresh
//!   idempotency key (the double click), through the product's own enqueue,
//!   with and without a duplicate-request guard.
//!
//! Every worker has its own connection and all start together (a barrier),
//! so the races are real. Queries are runtime-checked: the lab's tables live
//! only in the scratch database, not in the schema the macros check against.

pub mod counter;
pub mod purchase;
pub mod refund;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Barrier;

use transfer_worker::concurrency::Retries;
use transfer_worker::error::{Error, Result};
use transfer_worker::retry::RetryPolicy;

/// The scenarios `lab --scenario` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Counter,
    Refund,
    Purchase,
}

impl Scenario {
    /// Workers when `--workers` is not given.
    pub fn default_workers(self) -> usize {
        match self {
            Scenario::Counter => 2,
            Scenario::Refund => 8,
            Scenario::Purchase => 4,
        }
    }

    /// Whether the scenario needs the product's schema (it calls the library).
    pub fn needs_schema(self) -> bool {
        self == Scenario::Purchase
    }
}

/// The retries of the strategies that retry (optimistic, serializable):
/// short delays, since the contention is one row, and patient enough that a
/// counter increment is never given up.
pub const LAB_RETRIES: Retries = Retries {
    max_attempts: 10_000,
    policy: RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(50), multiplier: 2.0 },
};

/// What one worker's requests came to.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerTally {
    /// Requests refused (rows affected 0, a guard or try-lock held, a state
    /// already moved on): the right answer to a duplicate.
    pub refused: u64,
    /// Retries after a conflict (a version changed, a serialization failure).
    pub retries: u64,
}

impl std::ops::AddAssign for WorkerTally {
    fn add_assign(&mut self, o: Self) {
        self.refused += o.refused;
        self.retries += o.retries;
    }
}

/// One run of one strategy.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub expected: i64,
    /// What was written: the counter's value, refunds, purchases.
    pub actual: i64,
    pub tally: WorkerTally,
    pub elapsed: Duration,
    /// Requests made (for the rate).
    pub requests: u64,
}

impl Run {
    pub fn lost(&self) -> i64 {
        (self.expected - self.actual).max(0)
    }

    pub fn duplicates(&self) -> i64 {
        (self.actual - self.expected).max(0)
    }
}

/// Starts `workers` tasks together (a barrier) and sums what they report.
pub async fn race<F, Fut>(workers: usize, work: F) -> Result<(WorkerTally, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<WorkerTally>> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(workers));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (barrier, fut) = (barrier.clone(), work(w));
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let tally = fut.await?;
                Ok::<_, Error>((tally, started.elapsed()))
            })
        })
        .collect();
    let (mut total, mut longest) = (WorkerTally::default(), Duration::ZERO);
    for t in tasks {
        let (tally, took) = t.await.map_err(|e| Error::Failed(format!("lab task failed: {e}")))??;
        total += tally;
        longest = longest.max(took);
    }
    Ok((total, longest))
}

/// A strategy's results over `repeat` runs.
#[derive(Debug, Clone)]
pub struct StrategyResult {
    pub name: &'static str,
    pub runs: Vec<Run>,
}

impl StrategyResult {
    fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v[v.len() / 2]
    }

    /// The contract's JSON: `actual`, `lost` and `duplicates` are numbers for
    /// one run and arrays of every run's value with `--repeat`; the other
    /// figures are the median run's.
    pub fn to_json(&self, repeat: usize) -> serde_json::Value {
        let each = |f: &dyn Fn(&Run) -> i64| {
            let v: Vec<i64> = self.runs.iter().map(f).collect();
            if repeat > 1 {
                serde_json::json!(v)
            } else {
                serde_json::json!(v[0])
            }
        };
        let elapsed_ms = Self::median(self.runs.iter().map(|r| r.elapsed.as_secs_f64() * 1e3).collect());
        let ops_per_s =
            Self::median(self.runs.iter().map(|r| r.requests as f64 / r.elapsed.as_secs_f64().max(1e-9)).collect());
        serde_json::json!({
            "name": self.name,
            "expected": self.runs[0].expected,
            "actual": each(&|r| r.actual),
            "lost": each(&|r| r.lost()),
            "duplicates": each(&|r| r.duplicates()),
            "refused": Self::median(self.runs.iter().map(|r| r.tally.refused).collect()),
            "retries": Self::median(self.runs.iter().map(|r| r.tally.retries).collect()),
            "elapsed_ms": elapsed_ms,
            "ops_per_s": ops_per_s,
        })
    }

    /// min / median / max of a figure over the runs, for the table.
    pub fn spread(&self, f: impl Fn(&Run) -> i64) -> (i64, i64, i64) {
        let mut v: Vec<i64> = self.runs.iter().map(f).collect();
        v.sort_unstable();
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }
}

/// Runs `scenario` with every strategy, `repeat` times, on `pool` (a scratch
/// database; migrated when the scenario needs the schema).
pub async fn run(
    pool: &PgPool,
    scenario: Scenario,
    workers: usize,
    increments: usize,
    repeat: usize,
) -> Result<Vec<StrategyResult>> {
    match scenario {
        Scenario::Counter => counter::run(pool, workers, increments, repeat).await,
        Scenario::Refund => refund::run(pool, workers, repeat).await,
        Scenario::Purchase => purchase::run(pool, workers, repeat).await,
    }
}

//! `lab`: the concurrency-strategy experiment behind the worker's design.
//!
//! `workers` tasks each add 1 to one shared counter `increments` times, once
//! per strategy, each task on its own connection. Every strategy but `naive`
//! must end with exactly `workers * increments`; `naive` shows what a
//! read-modify-write without any of them loses.
//!
//! | strategy | how an increment is done |
//! |---|---|
//! | `naive` | SELECT value; UPDATE SET value = read + 1 (lost updates) |
//! | `atomic` | UPDATE SET value = value + 1 (the database does the read-modify-write) |
//! | `for_update` | pessimistic: SELECT ... FOR UPDATE, then UPDATE, in one transaction |
//! | `optimistic` | SELECT value, version; UPDATE ... WHERE version = read; 0 rows: retry with backoff |
//! | `advisory` | pg_advisory_xact_lock on a hashed string key (per-user serialization), then read and write |
//! | `serializable` | SERIALIZABLE transaction; serialization failure (40001): retry with backoff |

//!
//! Its queries are runtime-checked: `lab_counters` lives only in the scratch
//! database `lab` creates, not in the schema the query macros check against.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use transfer_worker::db;
use transfer_worker::error::Result;
use transfer_worker::retry::RetryPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Naive,
    Atomic,
    ForUpdate,
    Optimistic,
    Advisory,
    Serializable,
}

impl Strategy {
    pub const ALL: [Strategy; 6] = [
        Strategy::Naive,
        Strategy::Atomic,
        Strategy::ForUpdate,
        Strategy::Optimistic,
        Strategy::Advisory,
        Strategy::Serializable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Atomic => "atomic",
            Strategy::ForUpdate => "for_update",
            Strategy::Optimistic => "optimistic",
            Strategy::Advisory => "advisory",
            Strategy::Serializable => "serializable",
        }
    }
}

/// One strategy's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StrategyResult {
    pub name: &'static str,
    pub expected: i64,
    pub actual: i64,
    pub lost: i64,
    pub retries: u64,
    pub elapsed_ms: f64,
    pub ops_per_s: f64,
}

/// The retry policy of `optimistic` and `serializable`: short, since the
/// contention is one row.
pub const LAB_RETRY: RetryPolicy =
    RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(50), multiplier: 2.0 };

/// Runs every strategy on `pool` (a scratch database: it creates its table).
pub async fn run(pool: &PgPool, workers: usize, increments: usize) -> Result<Vec<StrategyResult>> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS lab_counters (
             id TEXT PRIMARY KEY, value BIGINT NOT NULL DEFAULT 0, version BIGINT NOT NULL DEFAULT 0)",
    )
    .execute(pool)
    .await?;
    let mut results = Vec::new();
    for strategy in Strategy::ALL {
        results.push(run_strategy(pool, strategy, workers, increments).await?);
    }
    Ok(results)
}

async fn run_strategy(pool: &PgPool, strategy: Strategy, workers: usize, increments: usize) -> Result<StrategyResult> {
    let key = strategy.name();
    sqlx::query("INSERT INTO lab_counters (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET value = 0, version = 0")
        .bind(key)
        .execute(pool)
        .await?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut retries = 0;
                for _ in 0..increments {
                    retries += increment(&pool, strategy, key).await?;
                }
                Ok::<u64, transfer_worker::Error>(retries)
            })
        })
        .collect();
    let mut retries = 0;
    for t in tasks {
        retries += t.await.map_err(|e| transfer_worker::Error::Failed(format!("lab task failed: {e}")))??;
    }
    let elapsed = started.elapsed();
    let actual: i64 =
        sqlx::query_scalar("SELECT value FROM lab_counters WHERE id = $1").bind(key).fetch_one(pool).await?;
    let expected = (workers * increments) as i64;
    Ok(StrategyResult {
        name: key,
        expected,
        actual,
        lost: expected - actual,
        retries,
        elapsed_ms: elapsed.as_secs_f64() * 1e3,
        ops_per_s: expected as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// One increment; returns how many retries it took.
async fn increment(pool: &PgPool, strategy: Strategy, key: &str) -> Result<u64> {
    match strategy {
        Strategy::Naive => {
            read_then_write(&mut *pool.acquire().await?, key, false).await?;
            Ok(0)
        }
        Strategy::Atomic => {
            sqlx::query("UPDATE lab_counters SET value = value + 1 WHERE id = $1").bind(key).execute(pool).await?;
            Ok(0)
        }
        Strategy::ForUpdate => {
            let mut tx = pool.begin().await?;
            read_then_write(&mut tx, key, true).await?;
            tx.commit().await?;
            Ok(0)
        }
        Strategy::Optimistic => {
            let mut backoff = LAB_RETRY.backoff();
            let mut retries = 0;
            loop {
                let (v, version): (i64, i64) = sqlx::query_as("SELECT value, version FROM lab_counters WHERE id = $1")
                    .bind(key)
                    .fetch_one(pool)
                    .await?;
                let updated = sqlx::query(
                    "UPDATE lab_counters SET value = $2, version = version + 1 WHERE id = $1 AND version = $3",
                )
                .bind(key)
                .bind(v + 1)
                .bind(version)
                .execute(pool)
                .await?
                .rows_affected();
                if updated == 1 {
                    return Ok(retries);
                }
                retries += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        Strategy::Advisory => {
            let mut tx = pool.begin().await?;
            // The same hashed-string-key lock the enqueue path uses per account.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('transfer-worker:lab:' || $1, 0))::text")
                .bind(key)
                .execute(&mut *tx)
                .await?;
            read_then_write(&mut tx, key, false).await?;
            tx.commit().await?;
            Ok(0)
        }
        Strategy::Serializable => {
            let mut backoff = LAB_RETRY.backoff();
            let mut retries = 0;
            loop {
                match serializable_increment(pool, key).await {
                    Ok(()) => return Ok(retries),
                    Err(e) if db::sqlstate(&e).as_deref() == Some("40001") => {
                        retries += 1;
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// The read-modify-write every strategy but `atomic` and `optimistic` makes:
/// read the value (locking the row if `for_update`), write it plus one.
async fn read_then_write(conn: &mut PgConnection, key: &str, for_update: bool) -> sqlx::Result<()> {
    let read = if for_update {
        "SELECT value FROM lab_counters WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT value FROM lab_counters WHERE id = $1"
    };
    let v: i64 = sqlx::query_scalar(read).bind(key).fetch_one(&mut *conn).await?;
    sqlx::query("UPDATE lab_counters SET value = $2 WHERE id = $1").bind(key).bind(v + 1).execute(&mut *conn).await?;
    Ok(())
}

async fn serializable_increment(pool: &PgPool, key: &str) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(&mut *tx).await?;
    read_then_write(&mut tx, key, false).await?;
    tx.commit().await
}

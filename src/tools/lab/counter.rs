//! `lab --scenario counter`: W workers each add 1 to one counter M times.
//!
//! | strategy | how an increment is done |
//! |---|---|
//! | `naive` | SELECT value; UPDATE SET value = read + 1 (lost updates) |
//! | `atomic` | UPDATE SET value = value + 1 (the database does the read-modify-write) |
//! | `for_update` | pessimistic: SELECT ... FOR UPDATE, then UPDATE, in one transaction |
//! | `optimistic` | SELECT value, version; UPDATE ... WHERE version = read ([`optimistic::retry`]) |
//! | `advisory` | [`advisory::xact_lock`] on a hashed string key, then read and write |
//! | `serializable` | read and write in [`isolation::run_in`] SERIALIZABLE, retried on 40001 |

use std::time::Instant;

use sqlx::{PgConnection, PgPool};

use super::{race, Run, StrategyResult, WorkerTally, LAB_RETRIES};
use transfer_worker::concurrency::advisory::{self, LockKey};
use transfer_worker::concurrency::isolation::{self, Isolation};
use transfer_worker::concurrency::optimistic::{self, Attempt};
use transfer_worker::concurrency::RetryError;
use transfer_worker::error::{Error, Result};

pub const STRATEGIES: [&str; 6] = ["naive", "atomic", "for_update", "optimistic", "advisory", "serializable"];

pub async fn run(pool: &PgPool, workers: usize, increments: usize, repeat: usize) -> Result<Vec<StrategyResult>> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS lab_counters (
             id TEXT PRIMARY KEY, value BIGINT NOT NULL DEFAULT 0, version BIGINT NOT NULL DEFAULT 0)",
    )
    .execute(pool)
    .await?;
    let mut results = Vec::new();
    for name in STRATEGIES {
        let mut runs = Vec::with_capacity(repeat);
        for _ in 0..repeat {
            runs.push(run_once(pool, name, workers, increments).await?);
        }
        results.push(StrategyResult { name, runs });
    }
    Ok(results)
}

async fn run_once(pool: &PgPool, name: &'static str, workers: usize, increments: usize) -> Result<Run> {
    sqlx::query("INSERT INTO lab_counters (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET value = 0, version = 0")
        .bind(name)
        .execute(pool)
        .await?;
    let started = Instant::now();
    let (tally, _) = race(workers, |_| {
        let pool = pool.clone();
        async move {
            let mut tally = WorkerTally::default();
            for _ in 0..increments {
                tally.retries += increment(&pool, name).await?;
            }
            Ok(tally)
        }
    })
    .await?;
    let elapsed = started.elapsed();
    let actual: i64 =
        sqlx::query_scalar("SELECT value FROM lab_counters WHERE id = $1").bind(name).fetch_one(pool).await?;
    let expected = (workers * increments) as i64;
    Ok(Run { expected, actual, tally, elapsed, requests: expected as u64 })
}

/// One increment with strategy `name`; returns how many retries it took.
async fn increment(pool: &PgPool, name: &'static str) -> Result<u64> {
    match name {
        "naive" => {
            read_then_write(&mut *pool.acquire().await?, name, false).await?;
            Ok(0)
        }
        "atomic" => {
            sqlx::query("UPDATE lab_counters SET value = value + 1 WHERE id = $1").bind(name).execute(pool).await?;
            Ok(0)
        }
        "for_update" => {
            let mut tx = pool.begin().await?;
            read_then_write(&mut tx, name, true).await?;
            tx.commit().await?;
            Ok(0)
        }
        "optimistic" => {
            let done = optimistic::retry(&LAB_RETRIES, || async {
                let (v, version): (i64, i64) = sqlx::query_as("SELECT value, version FROM lab_counters WHERE id = $1")
                    .bind(name)
                    .fetch_one(pool)
                    .await?;
                let rows = sqlx::query(
                    "UPDATE lab_counters SET value = $2, version = version + 1 WHERE id = $1 AND version = $3",
                )
                .bind(name)
                .bind(v + 1)
                .bind(version)
                .execute(pool)
                .await?
                .rows_affected();
                Ok(Attempt::from_rows_affected(rows))
            })
            .await
            .map_err(retry_error)?;
            Ok(u64::from(done.attempts - 1))
        }
        "advisory" => {
            let mut tx = pool.begin().await?;
            advisory::xact_lock(&mut tx, LockKey::hashed("lab", name)).await?;
            read_then_write(&mut tx, name, false).await?;
            tx.commit().await?;
            Ok(0)
        }
        "serializable" => {
            let done = isolation::run_in(pool, Isolation::Serializable, &LAB_RETRIES, |conn| {
                Box::pin(async move { Ok(read_then_write(conn, name, false).await?) })
            })
            .await
            .map_err(retry_error)?;
            Ok(u64::from(done.attempts - 1))
        }
        other => Err(Error::invalid(format!("unknown strategy {other}"))),
    }
}

pub(super) fn retry_error(e: RetryError) -> Error {
    match e {
        RetryError::Failed(e) => e,
        other => Error::Failed(other.to_string()),
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

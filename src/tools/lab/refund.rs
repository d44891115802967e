//! `lab --scenario refund`: W concurrent refund requests for one SUCCEEDED
//! payment. Exactly one refund, and one event, is right; every other request
//! must be refused. Each request that reads before it writes spends
//! [`PROCESSING`] between the two (a real request's checks), as the
//! write-ups' double-refund bug does.
//!
//! | strategy | how a request decides |
//! |---|---|
//! | `naive` | SELECT refund_status; if NONE, UPDATE (no guard) and write the event |
//! | `guarded` | one `UPDATE ... WHERE refund_status = 'NONE'` that writes the event from the rows it updated (the product's way) |
//! | `for_update` | SELECT ... FOR UPDATE, then decide and write, in one transaction |
//! | `optimistic` | read status and version; `UPDATE ... WHERE version = read` writes the event ([`optimistic::retry`]) |
//! | `advisory` | [`advisory::try_xact_lock`] on the payment: the others are refused at once |
//! | `serializable` | read, decide and write in [`isolation::run_in`] SERIALIZABLE, retried on 40001 |

use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};

use super::counter::retry_error;
use super::{race, Run, StrategyResult, WorkerTally, LAB_RETRIES};
use transfer_worker::concurrency::advisory::{self, LockKey};
use transfer_worker::concurrency::isolation::{self, Isolation};
use transfer_worker::concurrency::optimistic::{self, Attempt};
use transfer_worker::error::{Error, Result};

pub const STRATEGIES: [&str; 6] = ["naive", "guarded", "for_update", "optimistic", "advisory", "serializable"];

/// Between a request's read and its write.
pub const PROCESSING: Duration = Duration::from_millis(5);

pub async fn run(pool: &PgPool, workers: usize, repeat: usize) -> Result<Vec<StrategyResult>> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS lab_payments (
             id BIGINT PRIMARY KEY, status TEXT NOT NULL, refund_status TEXT NOT NULL, version BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS lab_refund_events (payment_id BIGINT NOT NULL, written_at TIMESTAMPTZ DEFAULT now())",
    )
    .execute(pool)
    .await?;
    let mut results = Vec::new();
    for (i, name) in STRATEGIES.into_iter().enumerate() {
        let mut runs = Vec::with_capacity(repeat);
        for _ in 0..repeat {
            runs.push(run_once(pool, i as i64 + 1, name, workers).await?);
        }
        results.push(StrategyResult { name, runs });
    }
    Ok(results)
}

async fn run_once(pool: &PgPool, payment: i64, name: &'static str, workers: usize) -> Result<Run> {
    sqlx::query(
        "INSERT INTO lab_payments VALUES ($1, 'SUCCEEDED', 'NONE', 0)
         ON CONFLICT (id) DO UPDATE SET status = 'SUCCEEDED', refund_status = 'NONE', version = 0",
    )
    .bind(payment)
    .execute(pool)
    .await?;
    sqlx::query("DELETE FROM lab_refund_events WHERE payment_id = $1").bind(payment).execute(pool).await?;
    let started = Instant::now();
    let (tally, _) = race(workers, |_| {
        let pool = pool.clone();
        async move {
            let (refunded, retries) = request(&pool, payment, name).await?;
            Ok(WorkerTally { refused: u64::from(!refunded), retries })
        }
    })
    .await?;
    let elapsed = started.elapsed();
    let actual: i64 = sqlx::query_scalar("SELECT count(*) FROM lab_refund_events WHERE payment_id = $1")
        .bind(payment)
        .fetch_one(pool)
        .await?;
    Ok(Run { expected: 1, actual, tally, elapsed, requests: workers as u64 })
}

/// One refund request; (whether it wrote a refund, retries).
async fn request(pool: &PgPool, payment: i64, name: &'static str) -> Result<(bool, u64)> {
    match name {
        "naive" => {
            let mut conn = pool.acquire().await?;
            if read_status(&mut conn, payment, false).await? != "NONE" {
                return Ok((false, 0));
            }
            tokio::time::sleep(PROCESSING).await;
            sqlx::query("UPDATE lab_payments SET refund_status = 'REQUESTED' WHERE id = $1")
                .bind(payment)
                .execute(&mut *conn)
                .await?;
            write_event(&mut conn, payment).await?;
            Ok((true, 0))
        }
        "guarded" => {
            let rows = sqlx::query(
                "WITH r AS (UPDATE lab_payments SET refund_status = 'REQUESTED'
                             WHERE id = $1 AND status = 'SUCCEEDED' AND refund_status = 'NONE' RETURNING id)
                 INSERT INTO lab_refund_events (payment_id) SELECT id FROM r",
            )
            .bind(payment)
            .execute(pool)
            .await?
            .rows_affected();
            Ok((rows == 1, 0))
        }
        "for_update" => {
            let mut tx = pool.begin().await?;
            let refunded = decide_and_write(&mut tx, payment, true).await?;
            tx.commit().await?;
            Ok((refunded, 0))
        }
        "optimistic" => {
            let done = optimistic::retry(&LAB_RETRIES, || async {
                let (status, version): (String, i64) =
                    sqlx::query_as("SELECT refund_status, version FROM lab_payments WHERE id = $1")
                        .bind(payment)
                        .fetch_one(pool)
                        .await?;
                if status != "NONE" {
                    return Ok(Attempt::Done(false));
                }
                tokio::time::sleep(PROCESSING).await;
                let rows = sqlx::query(
                    "WITH r AS (UPDATE lab_payments SET refund_status = 'REQUESTED', version = version + 1
                                 WHERE id = $1 AND version = $2 RETURNING id)
                     INSERT INTO lab_refund_events (payment_id) SELECT id FROM r",
                )
                .bind(payment)
                .bind(version)
                .execute(pool)
                .await?
                .rows_affected();
                Ok(if rows == 1 { Attempt::Done(true) } else { Attempt::Conflict })
            })
            .await
            .map_err(retry_error)?;
            Ok((done.value, u64::from(done.attempts - 1)))
        }
        "advisory" => {
            let mut tx = pool.begin().await?;
            if !advisory::try_xact_lock(&mut tx, LockKey::hashed("lab-refund", &payment.to_string())).await? {
                tx.rollback().await?;
                return Ok((false, 0));
            }
            let refunded = decide_and_write(&mut tx, payment, false).await?;
            tx.commit().await?;
            Ok((refunded, 0))
        }
        "serializable" => {
            let done = isolation::run_in(pool, Isolation::Serializable, &LAB_RETRIES, |conn| {
                Box::pin(async move { decide_and_write(conn, payment, false).await })
            })
            .await
            .map_err(retry_error)?;
            Ok((done.value, u64::from(done.attempts - 1)))
        }
        other => Err(Error::invalid(format!("unknown strategy {other}"))),
    }
}

async fn read_status(conn: &mut PgConnection, payment: i64, for_update: bool) -> sqlx::Result<String> {
    let sql = if for_update {
        "SELECT refund_status FROM lab_payments WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT refund_status FROM lab_payments WHERE id = $1"
    };
    sqlx::query_scalar(sql).bind(payment).fetch_one(conn).await
}

/// Read, think, write (unguarded), in the caller's transaction.
async fn decide_and_write(conn: &mut PgConnection, payment: i64, for_update: bool) -> Result<bool> {
    if read_status(conn, payment, for_update).await? != "NONE" {
        return Ok(false);
    }
    tokio::time::sleep(PROCESSING).await;
    sqlx::query("UPDATE lab_payments SET refund_status = 'REQUESTED' WHERE id = $1")
        .bind(payment)
        .execute(&mut *conn)
        .await?;
    write_event(conn, payment).await?;
    Ok(true)
}

async fn write_event(conn: &mut PgConnection, payment: i64) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO lab_refund_events (payment_id) VALUES ($1)").bind(payment).execute(conn).await?;
    Ok(())
}

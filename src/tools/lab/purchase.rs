//! `lab --scenario purchase`: W concurrent purchases by one user, each with a
//! fresh idempotency key (two clicks, two requests: idempotency keys cannot
//! tell them apart), through the product's own enqueue inside a request
//! transaction that spends [`REQUEST`] after it (the rest of a request's work).
//! One purchase is right.
//!
//! | strategy | the request |
//! |---|---|
//! | `naive` | enqueue with a fresh key |
//! | `guarded` | the same with the duplicate-request guard `user-1:purchase` ([`Guard`]): while one request holds it, the others are refused at once |

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::{race, Run, StrategyResult, WorkerTally};
use transfer_worker::account::AccountId;
use transfer_worker::concurrency::advisory::Guard;
use transfer_worker::error::{Error, Refusal, Result};
use transfer_worker::transfer::enqueue::{enqueue, NewTransfer};
use transfer_worker::transfer::Amount;

pub const STRATEGIES: [&str; 2] = ["naive", "guarded"];

/// What a request does after its enqueue, inside its transaction.
pub const REQUEST: Duration = Duration::from_millis(20);

pub async fn run(pool: &PgPool, workers: usize, repeat: usize) -> Result<Vec<StrategyResult>> {
    sqlx::query("INSERT INTO accounts (id, balance) VALUES (1, 1000000000), (2, 0) ON CONFLICT DO NOTHING")
        .execute(pool)
        .await?;
    let mut results = Vec::new();
    for name in STRATEGIES {
        let mut runs = Vec::with_capacity(repeat);
        for _ in 0..repeat {
            runs.push(run_once(pool, name, workers).await?);
        }
        results.push(StrategyResult { name, runs });
    }
    Ok(results)
}

async fn run_once(pool: &PgPool, name: &'static str, workers: usize) -> Result<Run> {
    sqlx::query("DELETE FROM transfers").execute(pool).await?;
    let guard = (name == "guarded").then(|| Guard::new("user-1:purchase").expect("a valid guard"));
    let started = Instant::now();
    let (tally, _) = race(workers, |_| {
        let (pool, guard) = (pool.clone(), guard.clone());
        async move {
            let amount = Amount::new(100).map_err(Error::invalid)?;
            let purchase = NewTransfer::new(AccountId(1), AccountId(2), amount, None)?.with_guard(guard);
            let mut tx = pool.begin().await?;
            match enqueue(&mut *tx, &purchase).await {
                Ok(_) => {
                    tokio::time::sleep(REQUEST).await;
                    tx.commit().await?;
                    Ok(WorkerTally::default())
                }
                Err(Error::Refused(Refusal::GuardHeld { .. })) => Ok(WorkerTally { refused: 1, retries: 0 }),
                Err(e) => Err(e),
            }
        }
    })
    .await?;
    let elapsed = started.elapsed();
    let actual: i64 = sqlx::query_scalar("SELECT count(*) FROM transfers").fetch_one(pool).await?;
    Ok(Run { expected: 1, actual, tally, elapsed, requests: workers as u64 })
}

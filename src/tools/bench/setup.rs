//! The data a benchmark run starts from, on its scratch database: accounts,
//! history (`--preload`), the transfers the timed part applies, and the
//! enqueue mode's busy account.

use std::time::Instant;

use sqlx::PgPool;

use super::{BenchConfig, Dist, EnqueueLatency, HOT_BALANCE, OPENING_BALANCE};
use crate::tools::fixtures;
use transfer_worker::error::{Error, Result};

/// Opens accounts `1..=accounts`; with `--hot`, account 1 holds enough for
/// every transfer.
pub async fn open_accounts(pool: &PgPool, config: &BenchConfig) -> Result<()> {
    fixtures::open_accounts(pool, config.accounts as i64, OPENING_BALANCE).await?;
    if config.hot {
        sqlx::query("UPDATE accounts SET balance = $1 WHERE id = 1").bind(HOT_BALANCE).execute(pool).await?;
    }
    Ok(())
}

/// `n` finished transfers (no money moved: they stand for history) with one
/// published event each, set-based (a million rows load in seconds), then
/// VACUUM ANALYZE so the timed part starts from a settled table.
pub async fn preload(pool: &PgPool, n: usize, accounts: i64) -> Result<()> {
    for start in (0..n).step_by(250_000) {
        let end = (start + 250_000).min(n);
        sqlx::query(
            "WITH t AS (
                 INSERT INTO transfers (idempotency_key, from_account, to_account, amount, status, applied_at)
                 SELECT 'preload-' || g, 1 + g % $3, 1 + (g + 1) % $3, 1 + g % 1000, 'SUCCEEDED', now()
                   FROM generate_series($1::bigint, $2::bigint - 1) g
              RETURNING transfers AS row
             )
             INSERT INTO outbox (transfer_id, event_type, data, state, published_at)
             SELECT (t.row).id, 'transfer.succeeded', transfer_event_data(t.row, 'transfer.succeeded'), 'published', now()
               FROM t",
        )
        .bind(start as i64)
        .bind(end as i64)
        .bind(accounts)
        .execute(pool)
        .await?;
    }
    sqlx::query("VACUUM ANALYZE transfers").execute(pool).await?;
    sqlx::query("VACUUM ANALYZE outbox").execute(pool).await?;
    // Pay the preload's checkpoint now, not during the timed part (where its
    // full-page writes would be charged to the worker). Needs superuser; a
    // server that refuses just checkpoints later.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        tracing::warn!(error = %e, "bench: CHECKPOINT after the preload refused; the timed part may pay for it");
    }
    Ok(())
}

/// Enqueue latency (the library call, its daily-limit check included) from a
/// limited account with no transfer today, and from one with 100,000.
pub async fn enqueue_latency(pool: &PgPool) -> Result<EnqueueLatency> {
    use transfer_worker::account::AccountId;
    use transfer_worker::transfer::enqueue::{enqueue, NewTransfer};
    use transfer_worker::transfer::Amount;
    const BUSY: usize = 100_000;
    const CALLS: usize = 300;
    sqlx::query("UPDATE accounts SET daily_limit = 1000000000000, balance = 1000000000000 WHERE id IN (1, 2)")
        .execute(pool)
        .await?;
    // Account 2's day so far, as the worker would have left it: its transfers
    // and their running total.
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount, status, applied_at)
         SELECT 'busy-' || g, 2, 3, 1, 'SUCCEEDED', now() FROM generate_series(1, $1::bigint) g",
    )
    .bind(BUSY as i64)
    .execute(pool)
    .await?;
    sqlx::query("UPDATE accounts SET spent_day = (now() AT TIME ZONE 'UTC')::date, spent_today = $1 WHERE id = 2")
        .bind(BUSY as i64)
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE transfers").execute(pool).await?;
    let time = |from: i64| {
        let pool = pool.clone();
        async move {
            let mut samples = Vec::with_capacity(CALLS);
            for _ in 0..CALLS {
                let t = NewTransfer::new(AccountId(from), AccountId(3), Amount::new(1).map_err(Error::invalid)?, None)?;
                let started = Instant::now();
                enqueue(&pool, &t).await?;
                samples.push(started.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, Error>(Dist::of(samples))
        }
    };
    let fresh_account = time(1).await?;
    let busy_account = time(2).await?;
    // Leave nothing pending for the invariants.
    sqlx::query("UPDATE transfers SET status = 'CANCELLED', applied_at = now() WHERE status = 'PENDING'")
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO outbox (transfer_id, event_type, data, state, published_at)
         SELECT id, 'transfer.' || lower(status), '{}', 'published', now() FROM transfers",
    )
    .execute(pool)
    .await?;
    Ok(EnqueueLatency { fresh_account, busy_account, busy_transfers_today: BUSY })
}

/// The transfers the timed part applies, by plain SQL as any producer may:
/// random pairs of accounts, or (`--hot`) each to or from account 1.
pub async fn seed(pool: &PgPool, config: &BenchConfig) -> Result<()> {
    if config.hot {
        sqlx::query(
            "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
             SELECT 'hot-' || g, CASE WHEN g % 2 = 0 THEN 1 ELSE 2 + g % ($2 - 1) END,
                    CASE WHEN g % 2 = 0 THEN 2 + g % ($2 - 1) ELSE 1 END, 1 + g % 1000
               FROM generate_series(1, $1::bigint) g",
        )
        .bind(config.transfers as i64)
        .bind(config.accounts as i64)
        .execute(pool)
        .await?;
        return Ok(());
    }
    fixtures::insert_random_transfers(pool, config.accounts as i64, config.transfers, 1_000, 42).await
}

//! What a benchmark run checks before it reports anything: money conserved,
//! no negative balance, one event per transfer, everything applied (and
//! published, where the mode publishes); and how much is still unfinished,
//! read from the maintained counters rather than counted.

use sqlx::PgPool;

use super::{BenchConfig, Mode, HOT_BALANCE, OPENING_BALANCE};
use transfer_worker::error::Result;

/// Transfers still PENDING and events not yet published, from the
/// trigger-kept state counters: O(1), where a `count(*)` over the outbox
/// would read every row (a million with `--preload`) each time the bench
/// looks, and charge that CPU to the worker it measures.
pub async fn unfinished(pool: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT COALESCE(sum(n) FILTER (WHERE kind = 'transfer' AND state = 'PENDING'), 0)::int8,
                COALESCE(sum(n) FILTER (WHERE kind = 'event' AND state <> 'published'), 0)::int8
           FROM current_state_counts",
    )
    .fetch_one(pool)
    .await?)
}

pub async fn invariants_hold(pool: &PgPool, config: &BenchConfig, all_published: bool) -> Result<bool> {
    // Plain aggregates: linear scans, whatever the row counts.
    let (total, accounts, negative, pending): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(balance) FROM accounts)::bigint, (SELECT count(*) FROM accounts),
                (SELECT count(*) FROM accounts WHERE balance < 0),
                (SELECT count(*) FROM transfers WHERE status = 'PENDING')",
    )
    .fetch_one(pool)
    .await?;
    let (transfers, events, with_events, unpublished): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM transfers), (SELECT count(*) FROM outbox WHERE event_seq IS NULL),
                (SELECT count(DISTINCT transfer_id) FROM outbox),
                (SELECT count(*) FROM outbox WHERE state <> 'published')",
    )
    .fetch_one(pool)
    .await?;
    let opening = if config.mode == Mode::Enqueue {
        // enqueue mode raised two balances to measure from limited accounts.
        total
    } else {
        (config.accounts as i64 - 1) * OPENING_BALANCE + if config.hot { HOT_BALANCE } else { OPENING_BALANCE }
    };
    // With pruning on, published events are gone from the outbox: that every
    // transfer's event arrived is then checked on the consumer's side.
    // (One row per event and destination: `events` counts the events.)
    let events_ok = config.prune_after.is_some() || (events == transfers && with_events == transfers);
    let ok = total == opening
        && accounts == config.accounts as i64
        && negative == 0
        && pending == 0
        && events_ok
        && (!all_published || unpublished == 0);
    Ok(ok)
}

//! Retention: `prune` deletes published events older than an age, and (only
//! when asked) finished transfers older than an age whose events are all gone.
//!
//! Transfers are the ledger: nothing prunes them unless told to. Events are
//! only a delivery buffer once published; the worker prunes those older than
//! `--prune-published-older-than` (default 7 days) every
//! `--prune-interval-ms`, one replica at a time (a session advisory lock).
//!
//! A pruned transfer's idempotency key is not forgotten: the same statement
//! that deletes the transfer records its key, id, parameters and final
//! states in `retired_keys`, so that a late retry gets the original answer
//! (CLI, library) or a unique violation (plain SQL) instead of a second
//! payment. Those records go after their own window (`keys_older_than`,
//! counted from the transfer's creation, never shorter than the transfers').
//!
//! Deletes go in small batches walked in id order, each its own short
//! statement: no long lock, nothing a concurrent writer waits for, and the
//! space is reused by the next inserts once vacuum has passed. Every delete
//! carries its guard (published and old enough; finished, old enough, no
//! refund under way, no event left), checked on the row as it is deleted.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::concurrency::advisory::{LockKey, SessionLock};
use crate::error::Result;

/// Rows looked at per statement.
pub const BATCH: i64 = 1_000;

/// What to prune.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneConfig {
    /// Published events whose publication is older than this.
    pub published_older_than: Option<Duration>,
    /// Finished transfers, applied longer ago than this, whose events are all gone.
    pub transfers_older_than: Option<Duration>,
    /// Records of pruned transfers' idempotency keys, for transfers created
    /// longer ago than this (None: kept). See [`PruneConfig::check`].
    pub keys_older_than: Option<Duration>,
}

/// How long the keys of pruned transfers are remembered by default (the
/// worker's `--prune-keys-older-than`): far longer than any client retries.
pub const DEFAULT_KEYS_OLDER_THAN: Duration = Duration::from_secs(90 * 86_400);

impl PruneConfig {
    /// Refuses a key window shorter than the transfers' (it would let a
    /// retry that comes after its transfer was pruned create a second one).
    pub fn check(&self) -> std::result::Result<(), String> {
        match (self.transfers_older_than, self.keys_older_than) {
            (Some(t), Some(k)) if k < t => Err(format!(
                "the idempotency keys of pruned transfers must be kept at least as long as the transfers \
                 ({}s < {}s): a late retry would pay twice",
                k.as_secs(),
                t.as_secs()
            )),
            _ => Ok(()),
        }
    }
}

/// What `prune` deleted (printed as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Pruned {
    pub published_events: u64,
    /// Transfers deleted (their keys are kept in `retired_keys`).
    pub transfers: u64,
    /// Records of pruned transfers' keys whose window ended.
    pub retired_keys: u64,
}

/// Where the next walk of each table may start: every row below it was
/// looked at and deleted. Kept by the worker between runs so that a run does
/// not walk again over what earlier runs cleared.
///
/// A row can commit after a walk passed its id (its id was taken by a
/// transaction that was still open), so at least every [`FULL_WALK_EVERY`]
/// a run walks from the start again.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursors {
    pub events: i64,
    pub transfers: i64,
    /// When the last walk from the start began (None: never).
    pub last_full_walk: Option<std::time::Instant>,
}

/// How often a prune walks from the start, for rows that committed after an
/// earlier walk passed their ids.
pub const FULL_WALK_EVERY: Duration = Duration::from_secs(3_600);

/// Parses an age: a whole number and a unit, `s`, `m`, `h` or `d` (`30s`,
/// `15m`, `12h`, `7d`).
pub fn parse_age(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let bad = || format!("an age is a whole number and a unit (s, m, h, d), like 30s, 15m, 12h or 7d; got {text:?}");
    let unit = t.chars().last().ok_or_else(bad)?;
    let n: u64 = t[..t.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).filter(|s| *s <= 100 * 365 * 86_400).map(Duration::from_secs).ok_or_else(bad)
}

/// Prunes what `config` asks for, starting the walks at `cursors` (zero for
/// a full walk) and moving them on.
pub async fn prune(pool: &PgPool, config: PruneConfig, cursors: &mut Cursors) -> Result<Pruned> {
    if cursors.last_full_walk.is_none_or(|t| t.elapsed() >= FULL_WALK_EVERY) {
        *cursors = Cursors { last_full_walk: Some(std::time::Instant::now()), ..Cursors::default() };
    }
    let mut pruned = Pruned::default();
    if let Some(age) = config.published_older_than {
        pruned.published_events = prune_events(pool, age, &mut cursors.events).await?;
    }
    if let Some(age) = config.transfers_older_than {
        pruned.transfers = prune_transfers(pool, age, &mut cursors.transfers).await?;
    }
    if let Some(age) = config.keys_older_than {
        pruned.retired_keys = prune_retired_keys(pool, age).await?;
    }
    Ok(pruned)
}

/// Forgets the keys of pruned transfers created longer ago than `age`, in
/// statements of [`BATCH`] rows.
async fn prune_retired_keys(pool: &PgPool, age: Duration) -> Result<u64> {
    let mut deleted = 0;
    loop {
        let n = sqlx::query!(
            "DELETE FROM retired_keys WHERE idempotency_key IN (
                 SELECT idempotency_key FROM retired_keys
                  WHERE created_at < now() - $1 * interval '1 second' LIMIT $2)",
            seconds(age),
            BATCH
        )
        .execute(pool)
        .await?
        .rows_affected();
        deleted += n;
        if n < BATCH as u64 {
            return Ok(deleted);
        }
    }
}

fn seconds(age: Duration) -> f64 {
    age.as_secs_f64()
}

/// What one batch of a walk did.
struct Batch {
    /// The highest id looked at; None when the walk reached the end.
    last: Option<i64>,
    seen: i64,
    deleted: i64,
    /// Nothing further can be old enough: stop.
    done: bool,
}

/// Walks a table in id order from `cursor`, one batch statement at a time,
/// until a batch says it is done or the table ends. The cursor moves past a
/// batch only while everything before it is gone, so the next walk starts
/// where rows may still be left.
async fn walk<F, Fut>(cursor: &mut i64, mut batch: F) -> Result<u64>
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<Batch>>,
{
    let (mut deleted, mut from, mut all_gone_so_far) = (0, *cursor, true);
    loop {
        let b = batch(from).await?;
        deleted += b.deleted as u64;
        let Some(last) = b.last else { break };
        all_gone_so_far &= b.deleted == b.seen;
        if all_gone_so_far {
            *cursor = last;
        }
        if b.done {
            break;
        }
        from = last;
    }
    Ok(deleted)
}

/// Deletes published events older than `age`. Stops at the first batch whose
/// events were all written after the cutoff (nothing further can be old
/// enough).
async fn prune_events(pool: &PgPool, age: Duration, cursor: &mut i64) -> Result<u64> {
    walk(cursor, |from| async move {
        let r = sqlx::query!(
            r#"WITH batch AS (
                   SELECT id, occurred_at FROM outbox WHERE id > $1 ORDER BY id LIMIT $2
               ), gone AS (
                   DELETE FROM outbox o USING batch b
                    WHERE o.id = b.id AND o.state = 'published'
                      AND o.published_at < now() - $3 * interval '1 second'
                RETURNING o.id
               )
               SELECT (SELECT max(id) FROM batch) AS "last",
                      (SELECT count(*) FROM batch) AS "seen!",
                      (SELECT count(*) FROM gone) AS "deleted!",
                      (SELECT bool_and(occurred_at >= now() - $3 * interval '1 second') FROM batch) AS "all_young""#,
            from,
            BATCH,
            seconds(age)
        )
        .fetch_one(pool)
        .await?;
        Ok(Batch { last: r.last, seen: r.seen, deleted: r.deleted, done: r.all_young.unwrap_or(true) })
    })
    .await
}

/// Deletes finished transfers applied (and refunded, if they were) longer
/// ago than `age` that have no event left, and keeps each one's key in
/// `retired_keys` (same statement). Transfers are walked to the end: ids
/// follow creation, not completion.
async fn prune_transfers(pool: &PgPool, age: Duration, cursor: &mut i64) -> Result<u64> {
    walk(cursor, |from| async move {
        let r = sqlx::query!(
            r#"WITH batch AS (
                   SELECT id FROM transfers WHERE id > $1 ORDER BY id LIMIT $2
               ), gone AS (
                   DELETE FROM transfers t USING batch b
                    WHERE t.id = b.id
                      AND t.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
                      AND t.refund_status <> 'REQUESTED'
                      AND COALESCE(t.refund_applied_at, t.applied_at) < now() - $3 * interval '1 second'
                      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.transfer_id = t.id)
                RETURNING t.id, t.idempotency_key, t.from_account, t.to_account, t.amount, t.status,
                          t.refund_status, t.created_at
               ), retired AS (
                   INSERT INTO retired_keys (idempotency_key, transfer_id, from_account, to_account, amount,
                                             status, refund_status, created_at)
                   SELECT idempotency_key, id, from_account, to_account, amount, status, refund_status, created_at
                     FROM gone
                   ON CONFLICT (idempotency_key) DO NOTHING
               )
               SELECT (SELECT max(id) FROM batch) AS "last",
                      (SELECT count(*) FROM batch) AS "seen!",
                      (SELECT count(*) FROM gone) AS "deleted!""#,
            from,
            BATCH,
            seconds(age)
        )
        .fetch_one(pool)
        .await?;
        Ok(Batch { last: r.last, seen: r.seen, deleted: r.deleted, done: false })
    })
    .await
}

/// Runs [`prune`] unless another replica is pruning right now (a session
/// advisory lock on the key `("transfer-worker", "prune")`, held on one
/// connection for the whole run). `None`: skipped.
pub async fn prune_exclusively(pool: &PgPool, config: PruneConfig, cursors: &mut Cursors) -> Result<Option<Pruned>> {
    let Some(lock) = SessionLock::try_acquire(pool, prune_lock_key()).await? else {
        return Ok(None);
    };
    let result = prune(pool, config, cursors).await;
    // Released, or, if that cannot be confirmed, its connection closed.
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "releasing the prune lock failed; its connection was closed instead");
    }
    result.map(Some)
}

/// The key one pruning replica holds (`transfer_worker_lock_key('transfer-worker', 'prune')`).
pub fn prune_lock_key() -> LockKey {
    LockKey::hashed("transfer-worker", "prune")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_a_number_and_a_unit() {
        assert_eq!(parse_age("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_age("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for bad in ["", "7", "d", "7w", "-1d", "1.5h", "7 days", "99999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }
}

//! Daily limits, in one place: what an account with a `daily_limit` may still
//! send on a UTC day. A transfer counts on the UTC day the worker applies it
//! (when the money leaves). Every account, limited or not, keeps what it sent
//! by transfer on the current UTC day on its own row (`spent_day`,
//! `spent_today`), updated by the worker in the statement that moves its
//! balance, under its row lock; so a limit set at any time of day, by the
//! CLI or by SQL, counts the whole day, and nothing needs pruning. Both
//! checks are O(1) in the day's traffic:
//! - at enqueue (CLI, library), under a transaction-scoped advisory lock on
//!   the hashed key `("daily-limit", <account>)` that serializes
//!   enqueues from one limited account: accepted = what it sent today + every
//!   transfer still PENDING from it (a partial index of pending transfers by
//!   source), so an accepted transfer still fits when it is applied, today or
//!   later, unless the limit is lowered meanwhile;
//! - at apply (a transfer enqueued by plain SQL is checked only here): what
//!   it sent today, read under the row lock, plus the transfer
//!   (`apply::decide`).

use std::collections::HashMap;

use sqlx::PgConnection;

use crate::concurrency::advisory::{hash_key, xact_lock_all};
use crate::error::Result;

/// The daily limits of those of `accounts` that have one.
pub(crate) async fn limits_of(conn: &mut PgConnection, accounts: &[i64]) -> Result<HashMap<i64, i64>> {
    Ok(sqlx::query!(
        r#"SELECT id, daily_limit AS "daily_limit!" FROM accounts WHERE id = ANY($1) AND daily_limit IS NOT NULL"#,
        accounts
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| (r.id, r.daily_limit))
    .collect())
}

/// Serializes enqueues from these limited accounts until the caller's
/// transaction ends: a transaction-scoped advisory lock per account, on the
/// library's hashed key `("daily-limit", <account>)`. Unlike a row lock on
/// the account, it never blocks a worker moving that account's money. Taken
/// in ascending account order, so two bulk enqueues cannot deadlock.
pub(crate) async fn serialize_enqueues(conn: &mut PgConnection, limited: &[i64]) -> Result<()> {
    let mut accounts = limited.to_vec();
    accounts.sort_unstable();
    accounts.dedup();
    let keys: Vec<i64> = accounts.iter().map(|a| hash_key(DAILY_LIMIT_NAMESPACE, &a.to_string())).collect();
    xact_lock_all(conn, &keys).await?;
    Ok(())
}

/// The namespace of the daily-limit locks' keys
/// (`transfer_worker_lock_key('daily-limit', '<account>')` in SQL).
pub const DAILY_LIMIT_NAMESPACE: &str = "daily-limit";

/// What each account has had accepted today: what it sent by transfer
/// since midnight UTC (kept on its row by the worker) plus every transfer
/// still PENDING from it, of any day: those count on the day they are
/// applied, which is today or later. One statement, so a transfer the worker
/// moves from PENDING to SUCCEEDED meanwhile is counted exactly once. Capped
/// in numeric: SQL producers are not checked at enqueue, and their transfers
/// may add up past 2^63, which is simply "over any limit".
pub(crate) async fn accepted_today(conn: &mut PgConnection, limited: &[i64]) -> Result<HashMap<i64, i64>> {
    Ok(sqlx::query!(
        r#"SELECT a.id AS "account!",
                  LEAST(CASE WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date THEN a.spent_today ELSE 0 END::numeric
                        + COALESCE((SELECT sum(t.amount) FROM transfers t
                                     WHERE t.from_account = a.id AND t.status = 'PENDING'), 0),
                        9223372036854775807)::bigint AS "used!"
             FROM accounts a WHERE a.id = ANY($1)"#,
        limited
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| (r.account, r.used))
    .collect())
}

//! Daily limits, in one place: what an account with a `daily_limit` may still
//! send on a UTC day. Both checks are O(1) in the day's traffic:
//! - at enqueue (CLI, library), under a transaction-scoped advisory lock on
//!   the hashed key `transfer-worker:daily-limit:<account>` that serializes
//!   enqueues from one limited account: accepted today = what SUCCEEDED (the
//!   running total below) + what is still PENDING (a partial index of pending
//!   transfers by source);
//! - at apply (a transfer enqueued by plain SQL is checked only here): what
//!   SUCCEEDED that day, from the running total `daily_spent`, which the
//!   worker keeps under the account's row lock. Accounts without a limit keep
//!   no total.

use std::collections::HashMap;

use sqlx::PgConnection;

use crate::error::Result;
use crate::transfer::apply::LockedAccount;
use crate::transfer::store::Claimed;

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
/// transaction ends. Unlike a row lock on the account, the advisory lock
/// never blocks a worker moving that account's money. Taken in ascending
/// account order (the subquery's ORDER BY), so two bulk enqueues cannot
/// deadlock on each other.
pub(crate) async fn serialize_enqueues(conn: &mut PgConnection, limited: &[i64]) -> Result<()> {
    sqlx::query!(
        "SELECT count(pg_advisory_xact_lock(hashtextextended('transfer-worker:daily-limit:' || id, 0)))
           FROM (SELECT id FROM unnest($1::bigint[]) AS id ORDER BY id) ordered",
        limited
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// What each account has had accepted today (PENDING or SUCCEEDED). Capped
/// in numeric: SQL producers are not checked at enqueue, and their transfers
/// may add up past 2^63, which is simply "over any limit".
pub(crate) async fn accepted_today(conn: &mut PgConnection, limited: &[i64]) -> Result<HashMap<i64, i64>> {
    Ok(sqlx::query!(
        r#"SELECT a.id AS "account!",
                  LEAST(COALESCE((SELECT s.spent FROM daily_spent s
                                   WHERE s.account_id = a.id AND s.day = (now() AT TIME ZONE 'UTC')::date), 0)::numeric
                        + COALESCE((SELECT sum(t.amount) FROM transfers t
                                     WHERE t.from_account = a.id AND t.status = 'PENDING'
                                       AND t.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'), 0),
                        9223372036854775807)::bigint AS "used!"
             FROM unnest($1::bigint[]) AS a(id)"#,
        limited
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| (r.account, r.used))
    .collect())
}

/// For source accounts with a daily limit: what already SUCCEEDED from them on
/// the UTC days the claimed transfers were accepted on, from the running
/// totals (O(1) per account and day, whatever the day's traffic).
pub(crate) async fn spent_today(
    conn: &mut PgConnection,
    claimed: &[Claimed],
    accounts: &[LockedAccount],
) -> Result<HashMap<(i64, String), i64>> {
    let limited: Vec<i64> = accounts.iter().filter(|a| a.daily_limit.is_some()).map(|a| a.id).collect();
    let relevant: Vec<&Claimed> = claimed.iter().filter(|t| limited.contains(&t.debit_account)).collect();
    if relevant.is_empty() {
        return Ok(HashMap::new());
    }
    let from: Vec<i64> = relevant.iter().map(|t| t.debit_account).collect();
    let days: Vec<String> = relevant.iter().map(|t| t.day.clone()).collect();
    let rows = sqlx::query!(
        r#"SELECT s.account_id, k.day AS "day!", s.spent
             FROM (SELECT DISTINCT * FROM unnest($1::bigint[], $2::text[]) AS k(account, day)) k
             JOIN daily_spent s ON s.account_id = k.account AND s.day = k.day::date"#,
        &from,
        &days
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| ((r.account_id, r.day), r.spent)).collect())
}

/// Adds what succeeded to the running daily totals of limited accounts. The
/// caller holds those accounts' row locks, which serializes every writer of
/// an account's total; the sum saturates instead of overflowing.
pub(crate) async fn add_spent(conn: &mut PgConnection, increments: &[((i64, String), i64)]) -> Result<()> {
    if increments.is_empty() {
        return Ok(());
    }
    let accounts: Vec<i64> = increments.iter().map(|((a, _), _)| *a).collect();
    let days: Vec<String> = increments.iter().map(|((_, d), _)| d.clone()).collect();
    let amounts: Vec<i64> = increments.iter().map(|(_, n)| *n).collect();
    sqlx::query!(
        "INSERT INTO daily_spent AS s (account_id, day, spent)
         SELECT account, day::date, amount FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS i(account, day, amount)
         ON CONFLICT (account_id, day) DO UPDATE
            SET spent = LEAST(s.spent::numeric + EXCLUDED.spent, 9223372036854775807)::bigint",
        &accounts,
        &days,
        &amounts
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

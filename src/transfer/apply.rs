//! Applying pending transfers: the worker's claim and the money movement.
//!
//! One pass ([`Applier::run_once`]) is one transaction over a batch:
//!
//! 1. **claim** up to `batch_size` PENDING transfers whose retry time has come,
//!    in id order, `FOR UPDATE SKIP LOCKED`: concurrent workers (tasks or
//!    processes) take disjoint batches and never wait on each other's rows;
//! 2. **lock the accounts** involved in one statement, in ascending id order.
//!    Every writer of balances locks accounts this way, so two batches that
//!    share accounts queue up instead of deadlocking;
//! 3. **decide** in memory, in transfer id order, which transfers succeed and
//!    which fail (insufficient funds, daily limit), tracking running balances;
//! 4. **write** set-based: one `UPDATE accounts ... FROM unnest(...)` for all
//!    balance changes, and one statement that moves the transfers out of
//!    PENDING (guarded by `status = 'PENDING'`) and inserts exactly one outbox
//!    event per row it actually updated. Both row counts are checked;
//! 5. commit. A crash anywhere before this rolls everything back, and the
//!    transfers are claimed again: nothing is applied twice or lost.
//!
//! If the batch fails for a reason that is not transient (an overflow, a
//! constraint), no transfer of it is applied; each is then retried alone, so
//! one bad transfer cannot block or roll back the others. The one that still
//! fails has its attempt counted and is retried later with backoff; after
//! `max_attempts` it FAILS with reason `processing_error` and the error kept
//! in `last_error`. Transient failures (connection lost, deadlock,
//! serialization) count nothing: the pass is simply retried.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};

use crate::db;
use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::transfer::reason;

/// Tuning of the transfer applier.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// Transfers claimed per transaction (default 100).
    pub batch_size: i64,
    /// Unexpected errors before a transfer FAILS with `processing_error` (default 5).
    pub max_attempts: i32,
    /// Delay before a transfer that hit an unexpected error is tried again.
    pub retry: RetryPolicy,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_size: 100,
            max_attempts: 5,
            retry: RetryPolicy::default(),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyCounts {
    pub claimed: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Hit an unexpected error; attempt counted, retried later.
    pub errored: usize,
}

impl std::ops::AddAssign for ApplyCounts {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.errored += o.errored;
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct Claimed {
    id: i64,
    from_account: i64,
    to_account: i64,
    amount: i64,
    /// The UTC day the transfer was accepted on, for daily limits.
    day: String,
}

#[derive(Debug, sqlx::FromRow)]
struct LockedAccount {
    id: i64,
    balance: i64,
    daily_limit: Option<i64>,
}

const CLAIM_COLUMNS: &str = "id, from_account, to_account, amount,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day";

pub struct Applier {
    pool: PgPool,
    config: ApplyConfig,
}

impl Applier {
    pub fn new(pool: PgPool, config: ApplyConfig) -> Self {
        Applier { pool, config }
    }

    /// Claims and applies one batch. Returns what it did; an `Err` is a
    /// transient database failure, and nothing of the batch was applied.
    pub async fn run_once(&self) -> Result<ApplyCounts> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: a row another worker holds is simply not ours this time.
        let claimed: Vec<Claimed> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CLAIM_COLUMNS} FROM transfers
              WHERE status = 'PENDING' AND next_attempt_at <= now()
              ORDER BY id
              LIMIT $1
                FOR UPDATE SKIP LOCKED"
        )))
        .bind(self.config.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if claimed.is_empty() {
            tx.commit().await?;
            return Ok(ApplyCounts::default());
        }
        match apply_claimed(&mut tx, &claimed).await {
            Ok(counts) => {
                tx.commit().await?;
                Ok(counts)
            }
            Err(e) if is_transient(&e) => Err(e),
            Err(e) => {
                tx.rollback().await?;
                tracing::warn!(error = %e, transfers = claimed.len(), "batch failed; applying its transfers one by one");
                let mut counts = ApplyCounts::default();
                for t in &claimed {
                    counts += self.apply_alone(t.id).await?;
                }
                Ok(counts)
            }
        }
    }

    /// The per-transfer path: the transfer in its own transaction; if it fails
    /// for a non-transient reason, record the attempt (and fail it for good
    /// after `max_attempts`) in another.
    async fn apply_alone(&self, id: i64) -> Result<ApplyCounts> {
        let mut tx = self.pool.begin().await?;
        let claimed: Vec<Claimed> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CLAIM_COLUMNS} FROM transfers
              WHERE id = $1 AND status = 'PENDING'
                FOR UPDATE SKIP LOCKED"
        )))
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let Some(t) = claimed.first() else {
            return Ok(ApplyCounts::default()); // another worker has it, or it is done
        };
        match apply_claimed(&mut tx, &claimed).await {
            Ok(counts) => {
                tx.commit().await?;
                Ok(counts)
            }
            Err(e) if is_transient(&e) => Err(e),
            Err(e) => {
                tx.rollback().await?;
                self.record_error(t, &e).await
            }
        }
    }

    async fn record_error(&self, t: &Claimed, err: &Error) -> Result<ApplyCounts> {
        let mut tx = self.pool.begin().await?;
        // The row lock (a plain FOR UPDATE via UPDATE) makes the count exact
        // even if another worker hit the same error at the same time.
        let attempt: Option<i32> = sqlx::query_scalar(
            "UPDATE transfers SET attempts = attempts + 1, last_error = $2
              WHERE id = $1 AND status = 'PENDING'
          RETURNING attempts",
        )
        .bind(t.id)
        .bind(err.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(attempt) = attempt else {
            tx.commit().await?;
            return Ok(ApplyCounts::default());
        };
        let mut counts = ApplyCounts {
            claimed: 1,
            ..Default::default()
        };
        if attempt >= self.config.max_attempts {
            tracing::error!(transfer_id = t.id, attempt, error = %err, "transfer failed for good after repeated errors");
            counts.failed = finish(
                &mut tx,
                &[(t.id, Outcome::Failed(reason::PROCESSING_ERROR))],
            )
            .await?;
        } else {
            let delay = self.config.retry.delay_for_attempt(attempt as u32);
            tracing::warn!(transfer_id = t.id, attempt, retry_in = ?delay, error = %err, "transfer errored; will retry");
            sqlx::query("UPDATE transfers SET next_attempt_at = now() + $2 * interval '1 millisecond' WHERE id = $1")
                .bind(t.id)
                .bind(delay.as_millis() as i64)
                .execute(&mut *tx)
                .await?;
            counts.errored = 1;
        }
        tx.commit().await?;
        Ok(counts)
    }
}

fn is_transient(e: &Error) -> bool {
    matches!(e, Error::Database(db_err) if db::is_transient(db_err))
}

/// How a claimed transfer leaves PENDING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed(&'static str),
}

/// Steps 2 to 4 for transfers claimed (locked) by the caller's transaction.
async fn apply_claimed(conn: &mut PgConnection, claimed: &[Claimed]) -> Result<ApplyCounts> {
    let mut account_ids: Vec<i64> = claimed
        .iter()
        .flat_map(|t| [t.from_account, t.to_account])
        .collect();
    account_ids.sort_unstable();
    account_ids.dedup();
    // Ascending id order, in one statement: the deadlock-free lock order.
    let accounts: Vec<LockedAccount> = sqlx::query_as(
        "SELECT id, balance, daily_limit FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&account_ids)
    .fetch_all(&mut *conn)
    .await?;

    let spent = spent_today(conn, claimed, &accounts).await?;
    let plan = decide(claimed, &accounts, spent)?;

    if !plan.deltas.is_empty() {
        let (ids, deltas): (Vec<i64>, Vec<i64>) = plan.deltas.iter().copied().unzip();
        let updated = sqlx::query(
            "UPDATE accounts a SET balance = a.balance + d.delta
               FROM unnest($1::bigint[], $2::bigint[]) AS d(id, delta)
              WHERE a.id = d.id",
        )
        .bind(&ids)
        .bind(&deltas)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if updated as usize != ids.len() {
            return Err(Error::Database(sqlx::Error::Protocol(format!(
                "expected to update {} accounts, updated {updated}",
                ids.len()
            ))));
        }
    }

    let applied = finish(conn, &plan.outcomes).await?;
    if applied != claimed.len() {
        // Cannot happen while we hold the row locks; if it does, roll back
        // rather than move money without its state change.
        return Err(Error::Database(sqlx::Error::Protocol(format!(
            "guarded update applied {applied} of {} claimed transfers",
            claimed.len()
        ))));
    }
    let succeeded = plan
        .outcomes
        .iter()
        .filter(|(_, o)| *o == Outcome::Succeeded)
        .count();
    Ok(ApplyCounts {
        claimed: claimed.len(),
        succeeded,
        failed: claimed.len() - succeeded,
        errored: 0,
    })
}

/// Moves transfers out of PENDING and writes one outbox event per row that
/// actually changed, in one statement. The guard `t.status = 'PENDING'` makes
/// a transfer that is no longer pending produce neither a change nor an event.
/// Returns how many transfers it moved.
async fn finish(conn: &mut PgConnection, outcomes: &[(i64, Outcome)]) -> Result<usize> {
    let ids: Vec<i64> = outcomes.iter().map(|(id, _)| *id).collect();
    let statuses: Vec<&str> = outcomes
        .iter()
        .map(|(_, o)| match o {
            Outcome::Succeeded => "SUCCEEDED",
            Outcome::Failed(_) => "FAILED",
        })
        .collect();
    let reasons: Vec<Option<&str>> = outcomes
        .iter()
        .map(|(_, o)| match o {
            Outcome::Succeeded => None,
            Outcome::Failed(r) => Some(*r),
        })
        .collect();
    let inserted = sqlx::query(
        "WITH applied AS (
             UPDATE transfers t
                SET status = o.status, failure_reason = o.reason, applied_at = now()
               FROM unnest($1::bigint[], $2::text[], $3::text[]) AS o(id, status, reason)
              WHERE t.id = o.id AND t.status = 'PENDING'
          RETURNING t AS row
         )
         INSERT INTO outbox (transfer_id, event_type, data)
         SELECT (a.row).id, e.event_type, transfer_event_data(a.row, e.event_type)
           FROM applied a
          CROSS JOIN LATERAL (SELECT 'transfer.' || lower((a.row).status) AS event_type) e
          ORDER BY (a.row).id",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&reasons)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(inserted as usize)
}

/// For source accounts with a daily limit: what already SUCCEEDED from them on
/// the UTC days the claimed transfers were accepted on.
async fn spent_today(
    conn: &mut PgConnection,
    claimed: &[Claimed],
    accounts: &[LockedAccount],
) -> Result<HashMap<(i64, String), i64>> {
    let limited: Vec<i64> = accounts
        .iter()
        .filter(|a| a.daily_limit.is_some())
        .map(|a| a.id)
        .collect();
    let relevant: Vec<&Claimed> = claimed
        .iter()
        .filter(|t| limited.contains(&t.from_account))
        .collect();
    if relevant.is_empty() {
        return Ok(HashMap::new());
    }
    let from: Vec<i64> = relevant.iter().map(|t| t.from_account).collect();
    let days: Vec<String> = relevant.iter().map(|t| t.day.clone()).collect();
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT t.from_account, k.day, COALESCE(sum(t.amount), 0)::bigint
           FROM (SELECT DISTINCT * FROM unnest($1::bigint[], $2::text[]) AS k(account, day)) k
           JOIN transfers t
             ON t.from_account = k.account
            AND t.status = 'SUCCEEDED'
            AND t.created_at >= k.day::date AT TIME ZONE 'UTC'
            AND t.created_at < (k.day::date + 1) AT TIME ZONE 'UTC'
          GROUP BY 1, 2",
    )
    .bind(&from)
    .bind(&days)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(a, d, s)| ((a, d), s)).collect())
}

struct Plan {
    outcomes: Vec<(i64, Outcome)>,
    /// Net balance change per account, for accounts that change.
    deltas: Vec<(i64, i64)>,
}

/// Step 3: decides each transfer in id order against running balances. Pure,
/// so the rules are unit-tested without a database.
fn decide(
    claimed: &[Claimed],
    accounts: &[LockedAccount],
    mut spent: HashMap<(i64, String), i64>,
) -> Result<Plan> {
    let mut balance: HashMap<i64, i64> = accounts.iter().map(|a| (a.id, a.balance)).collect();
    let limits: HashMap<i64, Option<i64>> =
        accounts.iter().map(|a| (a.id, a.daily_limit)).collect();
    let mut delta: HashMap<i64, i64> = HashMap::new();
    let mut outcomes = Vec::with_capacity(claimed.len());
    for t in claimed {
        let from = *balance.get(&t.from_account).ok_or(Error::NotFound {
            what: "account",
            id: t.from_account,
        })?;
        let to = *balance.get(&t.to_account).ok_or(Error::NotFound {
            what: "account",
            id: t.to_account,
        })?;
        let spent_key = (t.from_account, t.day.clone());
        let already = spent.get(&spent_key).copied().unwrap_or(0);
        let outcome = if from < t.amount {
            Outcome::Failed(reason::INSUFFICIENT_FUNDS)
        } else if limits[&t.from_account]
            .is_some_and(|limit| already.saturating_add(t.amount) > limit)
        {
            Outcome::Failed(reason::DAILY_LIMIT_EXCEEDED)
        } else {
            let credited = to.checked_add(t.amount).ok_or_else(|| {
                Error::invalid(format!(
                    "balance of account {} would overflow",
                    t.to_account
                ))
            })?;
            balance.insert(t.from_account, from - t.amount);
            balance.insert(t.to_account, credited);
            *delta.entry(t.from_account).or_default() -= t.amount;
            *delta.entry(t.to_account).or_default() += t.amount;
            *spent.entry(spent_key).or_default() += t.amount;
            Outcome::Succeeded
        };
        outcomes.push((t.id, outcome));
    }
    let mut deltas: Vec<(i64, i64)> = delta.into_iter().filter(|(_, d)| *d != 0).collect();
    deltas.sort_unstable();
    Ok(Plan { outcomes, deltas })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: i64, from: i64, to: i64, amount: i64) -> Claimed {
        Claimed {
            id,
            from_account: from,
            to_account: to,
            amount,
            day: "2026-11-22".into(),
        }
    }

    fn acct(id: i64, balance: i64, daily_limit: Option<i64>) -> LockedAccount {
        LockedAccount {
            id,
            balance,
            daily_limit,
        }
    }

    #[test]
    fn later_transfers_see_the_balances_left_by_earlier_ones() {
        let claimed = [t(1, 1, 2, 60), t(2, 1, 2, 60), t(3, 2, 1, 100)];
        let plan = decide(
            &claimed,
            &[acct(1, 100, None), acct(2, 50, None)],
            HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            plan.outcomes,
            vec![
                (1, Outcome::Succeeded),
                (2, Outcome::Failed(reason::INSUFFICIENT_FUNDS)),
                (3, Outcome::Succeeded)
            ]
        );
        // 1 -> 2: 60, 2 -> 1: 100; net +40 / -40.
        assert_eq!(plan.deltas, vec![(1, 40), (2, -40)]);
    }

    #[test]
    fn daily_limit_counts_what_already_succeeded_that_day() {
        let claimed = [t(1, 1, 2, 30), t(2, 1, 2, 30)];
        let spent = HashMap::from([((1, "2026-11-22".to_string()), 50)]);
        let plan = decide(
            &claimed,
            &[acct(1, 1000, Some(100)), acct(2, 0, None)],
            spent,
        )
        .unwrap();
        assert_eq!(
            plan.outcomes,
            vec![
                (1, Outcome::Succeeded),
                (2, Outcome::Failed(reason::DAILY_LIMIT_EXCEEDED))
            ]
        );
    }

    #[test]
    fn an_overflowing_credit_is_an_error_not_a_wrap() {
        let claimed = [t(1, 1, 2, 10)];
        assert!(decide(
            &claimed,
            &[acct(1, 10, None), acct(2, i64::MAX - 5, None)],
            HashMap::new()
        )
        .is_err());
    }
}

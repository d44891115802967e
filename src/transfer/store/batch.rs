//! A batch's transaction in two messages: `BEGIN` and the claim (with the
//! accounts' row locks when the batch takes them without waiting), then the
//! write and `COMMIT`.
//!
//! Each is one simple-query message of several statements, which PostgreSQL
//! runs in order and answers at once: two round trips where bound
//! statements take five (BEGIN, claim, lock, write, COMMIT), each a thread
//! park and wake-up of the worker. At the rates most teams run, every
//! transfer is a batch of its own, and those round trips were most of the
//! worker's CPU per transfer. The price: the values go into the text
//! (rendered by [`crate::db::literal`], integers and the worker's own words
//! only), the statements are planned at each use, and sqlx checks them not
//! at compile time but in the suite, which runs both steps' statements on
//! every test that applies anything.
//!
//! The two steps (a PENDING transfer, a REQUESTED refund) differ only in
//! their [`Columns`]; each guard is still a literal in the text, where the
//! partial indexes need it.
//!
//! The caller owns the transaction these open and close (it is not sqlx's:
//! see [`crate::db::KeptConn::transaction_opened`]). An error in the write
//! skips its COMMIT and leaves the transaction aborted: [`end`] it with
//! [`End::Rollback`].

use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::account::AccountId;
use crate::db::literal::{bigints, texts};
use crate::db::BEGIN_CLAIM;
use crate::transfer::step::{Claimed, LockedAccount, Outcome, Step};
use crate::transfer::TransferId;

/// What a step's statements are written in.
struct Columns {
    /// Who pays, who is paid, how much.
    debit: &'static str,
    credit: &'static str,
    amount: &'static str,
    /// The state column, and the state a row waits in (the guard).
    state: &'static str,
    waiting: &'static str,
    /// Set when the row leaves it.
    reason: &'static str,
    applied_at: &'static str,
}

fn columns(step: Step) -> Columns {
    match step {
        Step::Transfer => Columns {
            debit: "from_account",
            credit: "to_account",
            amount: "amount",
            state: "status",
            waiting: "PENDING",
            reason: "failure_reason",
            applied_at: "applied_at",
        },
        Step::Refund => Columns {
            debit: "to_account",
            credit: "from_account",
            amount: "refund_amount",
            state: "refund_status",
            waiting: "REQUESTED",
            reason: "refund_failure_reason",
            applied_at: "refund_applied_at",
        },
    }
}

/// A batch's claimed rows (in id order), and the accounts it locked with
/// them when asked to.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    pub rows: Vec<Claimed>,
    /// `Some` when the claim took the accounts too (with SKIP LOCKED: those
    /// another transaction holds are not in it).
    pub accounts: Option<Vec<LockedAccount>>,
}

/// Opens the batch's transaction and claims up to `limit` rows waiting for
/// `step` whose retry time has come, in id order from `floor`, skipping
/// rows other workers hold and rows touching a `busy` account (held by
/// another session, see [`crate::transfer::busy`]). With `lock_accounts`,
/// the same statement locks the rows' accounts `FOR NO KEY UPDATE SKIP
/// LOCKED` (never waiting, so in any order); without, the caller locks them.
///
/// The transaction begins as [`BEGIN_CLAIM`] says, so that the claim walks
/// the waiting index in order; sorts are allowed again after it, by the
/// claim itself: its `set_config(.., true)` runs once the statement is
/// planned, and holds for the rest of the transaction.
pub(crate) async fn begin_and_claim(
    conn: &mut PgConnection,
    step: Step,
    limit: i64,
    floor: TransferId,
    busy: &[AccountId],
    lock_accounts: bool,
) -> sqlx::Result<Claim> {
    let Columns { debit, credit, amount, state, waiting, .. } = columns(step);
    let busy = bigints(&busy.iter().map(|a| a.0).collect::<Vec<_>>());
    let floor = floor.0;
    let sql = format!(
        "{BEGIN_CLAIM};
         WITH claimed AS (
             SELECT id, {debit} AS debit, {credit} AS credit, {amount} AS amount,
                    extract(epoch FROM created_at)::float8 AS created_epoch, traceparent
               FROM transfers
              WHERE {state} = '{waiting}' AND next_attempt_at <= now() AND id >= {floor}
                AND NOT (from_account = ANY({busy}) OR to_account = ANY({busy}))
                AND set_config('enable_sort', 'on', true) = 'on'
              ORDER BY id
              LIMIT {limit}
                FOR NO KEY UPDATE SKIP LOCKED
         ), locked AS (
             SELECT id, balance, daily_limit,
                    CASE WHEN spent_day = (now() AT TIME ZONE 'UTC')::date THEN spent_today ELSE 0 END AS spent_today
               FROM accounts
              WHERE {lock_accounts} AND id IN (SELECT debit FROM claimed UNION ALL SELECT credit FROM claimed)
                FOR NO KEY UPDATE SKIP LOCKED
         )
         SELECT false AS account, id, debit, credit, amount, created_epoch, traceparent,
                NULL::bigint AS balance, NULL::bigint AS daily_limit, NULL::bigint AS spent_today
           FROM claimed
         UNION ALL
         SELECT true, id, NULL, NULL, NULL, NULL, NULL, balance, daily_limit, spent_today
           FROM locked"
    );
    let mut claim = Claim { rows: Vec::new(), accounts: lock_accounts.then(Vec::new) };
    for row in sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(&mut *conn).await? {
        if row.try_get::<bool, _>("account")? {
            claim.accounts.get_or_insert_with(Vec::new).push(LockedAccount {
                id: AccountId(row.try_get("id")?),
                balance: row.try_get("balance")?,
                daily_limit: row.try_get("daily_limit")?,
                spent_today: row.try_get("spent_today")?,
            });
        } else {
            claim.rows.push(Claimed {
                id: TransferId(row.try_get("id")?),
                debit_account: AccountId(row.try_get("debit")?),
                credit_account: AccountId(row.try_get("credit")?),
                amount: row.try_get("amount")?,
                created_epoch: row.try_get("created_epoch")?,
                traceparent: row.try_get("traceparent")?,
            });
        }
    }
    claim.rows.sort_unstable_by_key(|t| t.id);
    Ok(claim)
}

/// How a batch's transaction ends when there is nothing (more) to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Commit,
    Rollback,
}

/// Ends the transaction [`begin_and_claim`] opened.
pub(crate) async fn end(conn: &mut PgConnection, how: End) -> sqlx::Result<()> {
    let sql = match how {
        End::Commit => "COMMIT",
        End::Rollback => "ROLLBACK",
    };
    sqlx::raw_sql(sql).execute(conn).await?;
    Ok(())
}

/// The balance changes of a batch: per account, what its balance moves by
/// and what it adds to the sender's day's total.
#[derive(Debug, Default)]
pub(crate) struct Money {
    pub accounts: Vec<i64>,
    pub deltas: Vec<i64>,
    pub spent: Vec<i64>,
}

/// What [`finish`] changed: accounts updated, rows moved out of waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Finished {
    pub accounts: i64,
    pub rows: i64,
}

/// The write of a batch, in one statement: moves `money` under the row
/// locks the batch holds, moves the rows out of `step`'s waiting state
/// (guarded by it), and inserts one event per row that changed (its
/// `event_id` a time-ordered UUIDv7). The statement checks itself: unless
/// every account of `money` and every row of `outcomes` was updated, it
/// fails (`inconsistent: ...`), and nothing of it stays. With
/// `commit`, the transaction's COMMIT follows in the same message; a
/// failed write skips it.
///
/// The money: `now()` is the transaction's start, the same instant the day's
/// totals were read at; a total saturates (an unlimited account may send
/// more than i64::MAX in a day; that is just "over any limit").
///
/// The guard is written `state || '' = ...` so that no partial index on the
/// waiting state can serve it: the planner sizes those indexes from
/// statistics taken before a burst (a million finished rows and an
/// unanalyzed backlog of 100,000 look like an empty index), and would then
/// hash the whole backlog for every batch of 100 (measured: 60 ms a batch
/// instead of 5). This way the rows are reached from their ids, through the
/// primary key, whatever the statistics say.
pub(crate) async fn finish(
    conn: &mut PgConnection,
    step: Step,
    outcomes: &[(TransferId, Outcome)],
    money: &Money,
    commit: bool,
) -> sqlx::Result<Finished> {
    let Columns { state, waiting, reason, applied_at, .. } = columns(step);
    let ids = bigints(&outcomes.iter().map(|(id, _)| id.0).collect::<Vec<_>>());
    let states = texts(&outcomes.iter().map(|(_, o)| Some(step.state_after(*o))).collect::<Vec<_>>());
    let reasons = texts(&outcomes.iter().map(|(_, o)| o.reason().map(|r| r.as_str())).collect::<Vec<_>>());
    let types = texts(&outcomes.iter().map(|(_, o)| Some(step.event_type(*o).as_str())).collect::<Vec<_>>());
    // Time-ordered ids (UUIDv7): each new one lands at the right edge of the
    // event_id index instead of on a random page of it.
    let event_ids = texts(&outcomes.iter().map(|_| Some(uuid::Uuid::now_v7().to_string())).collect::<Vec<_>>());
    let (n_accounts, n_rows) = (money.accounts.len(), outcomes.len());
    let (accounts, deltas, spent) = (bigints(&money.accounts), bigints(&money.deltas), bigints(&money.spent));
    let commit = if commit { "; COMMIT" } else { "" };
    let sql = format!(
        "WITH moved AS (
             UPDATE accounts a
                SET balance = a.balance + d.delta,
                    spent_today = CASE WHEN d.spent = 0 THEN a.spent_today
                                       WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date
                                       THEN LEAST(a.spent_today::numeric + d.spent, 9223372036854775807)::bigint
                                       ELSE d.spent END,
                    spent_day = CASE WHEN d.spent = 0 THEN a.spent_day ELSE (now() AT TIME ZONE 'UTC')::date END
               FROM unnest({accounts}, {deltas}, {spent}) AS d(id, delta, spent)
              WHERE a.id = d.id
          RETURNING 1
         ), applied AS (
             UPDATE transfers t
                SET {state} = o.state, {reason} = o.reason, {applied_at} = now()
               FROM unnest({ids}, {states}, {reasons}, {event_ids}, {types})
                    AS o(id, state, reason, event_id, event_type)
              WHERE t.id = o.id AND t.{state} || '' = '{waiting}'
          RETURNING t AS row, o.event_id, o.event_type
         ), written AS (
             INSERT INTO outbox (event_id, transfer_id, event_type, data)
             SELECT a.event_id::uuid, (a.row).id, a.event_type, transfer_event_data(a.row, a.event_type)
               FROM applied a
              ORDER BY (a.row).id
          RETURNING 1
         ), counted AS (
             SELECT (SELECT count(*) FROM moved) AS n_accounts, (SELECT count(*) FROM written) AS n_rows
         )
         SELECT n_accounts, n_rows,
                transfer_worker_expect(n_accounts = {n_accounts} AND n_rows = {n_rows},
                    format('updated %s of {n_accounts} accounts and moved %s of {n_rows} claimed rows out of {waiting}',
                           n_accounts, n_rows)) AS checked
           FROM counted{commit}"
    );
    let rows = sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(&mut *conn).await?;
    let row = rows.first().ok_or_else(|| sqlx::Error::RowNotFound)?;
    Ok(Finished { accounts: row.try_get("n_accounts")?, rows: row.try_get("n_rows")? })
}

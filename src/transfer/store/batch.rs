//! A batch's transaction in two messages: `BEGIN` and the claim (with the
//! accounts' row locks when the batch takes them without waiting), then the
//! write and `COMMIT`.
//!
//! Each is one simple-query message of several statements, which PostgreSQL
//! runs in order and answers at once: two round trips where bound
//! statements take five (BEGIN, claim, lock, write, COMMIT), each a thread
//! park and wake-up of the worker. At the rates most teams run, every
//! transfer is a batch of its own, and those round trips were most of the
//! worker's CPU per transfer. Such a message carries no bound parameters, so
//! the values go into the text (rendered by [`crate::db::literal`]: integers
//! and the worker's own words only), as the arguments of the two functions
//! that hold the statements (migration `20261202000006_apply_batch.sql`):
//! as functions, their plans are cached per session, as a bound statement's
//! would be (planned at every batch, they cost more than the round trips
//! saved at full batches).
//!
//! The two steps (a PENDING transfer, a REQUESTED refund) have a pair of
//! functions each; they differ only in who pays whom, the waiting-state
//! guard (a literal, where the partial indexes need it) and the columns a
//! finish sets.
//!
//! The caller owns the transaction these open and close (it is not sqlx's:
//! see [`crate::db::KeptConn::transaction_opened`]). An error in the write
//! skips its COMMIT and leaves the transaction aborted: [`end`] it with
//! [`End::Rollback`].

use rand::Rng;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::account::AccountId;
use crate::db::literal::{any_text, bigints, texts};
use crate::db::BEGIN_CLAIM;
use crate::outbox::handoff::{Handed, HandedEvent, Offer};
use crate::transfer::step::{Claimed, LockedAccount, Outcome, Step};
use crate::transfer::TransferId;

/// A new event's id: time-ordered (UUIDv7), so each lands at the right edge
/// of the event_id index instead of on a random page of it. Its 74 random
/// bits come from the thread's generator: `Uuid::now_v7` asks the kernel
/// (`getrandom(2)`) twice per id, a system call for every event.
pub(crate) fn new_event_id() -> uuid::Uuid {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    uuid::Builder::from_unix_timestamp_millis(millis, &rand::thread_rng().gen()).into_uuid()
}

/// The functions of `step`'s batch.
fn functions(step: Step) -> (&'static str, &'static str) {
    match step {
        Step::Transfer => ("transfer_worker_claim_transfers", "transfer_worker_finish_transfers"),
        Step::Refund => ("transfer_worker_claim_refunds", "transfer_worker_finish_refunds"),
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
/// claim itself (`set_config(.., true)`, for the rest of the transaction).
pub(crate) async fn begin_and_claim(
    conn: &mut PgConnection,
    step: Step,
    limit: i64,
    floor: TransferId,
    busy: &[AccountId],
    lock_accounts: bool,
) -> sqlx::Result<Claim> {
    let (claim_fn, _) = functions(step);
    let busy = bigints(&busy.iter().map(|a| a.0).collect::<Vec<_>>());
    let sql = format!("{BEGIN_CLAIM}; SELECT * FROM {claim_fn}({limit}, {}, {busy}, {lock_accounts})", floor.0);
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

/// The write of a batch, in one statement: moves `money` under the row
/// locks the batch holds, moves the rows out of `step`'s waiting state
/// (guarded by it), and inserts one event per row that changed (its
/// `event_id` a time-ordered UUIDv7). The statement checks itself: unless
/// every account of `money` and every row of `outcomes` was updated, it
/// fails (`inconsistent: ...`), and nothing of it stays. With `commit`, the
/// transaction's COMMIT follows in the same message; a failed write skips
/// it. With `hand_to` (a transfer batch only), the events are written
/// leased to that relay and come back for it (see
/// [`crate::outbox::handoff`]). Returns the rows moved out of waiting.
/// (The statement, and why its guard is written as it is, are in the
/// migrations.)
pub(crate) async fn finish(
    conn: &mut PgConnection,
    step: Step,
    outcomes: &[(TransferId, Outcome)],
    money: &Money,
    commit: bool,
    hand_to: Option<&Offer>,
) -> sqlx::Result<Finish> {
    let (_, finish_fn) = functions(step);
    let ids = bigints(&outcomes.iter().map(|(id, _)| id.0).collect::<Vec<_>>());
    let states = texts(&outcomes.iter().map(|(_, o)| Some(step.state_after(*o))).collect::<Vec<_>>());
    let reasons = texts(&outcomes.iter().map(|(_, o)| o.reason().map(|r| r.as_str())).collect::<Vec<_>>());
    let types = texts(&outcomes.iter().map(|(_, o)| Some(step.event_type(*o).as_str())).collect::<Vec<_>>());
    let event_ids = texts(&outcomes.iter().map(|_| Some(new_event_id().to_string())).collect::<Vec<_>>());
    let (accounts, deltas, spent) = (bigints(&money.accounts), bigints(&money.deltas), bigints(&money.spent));
    // Only the transfer step's write takes the hand-off's two arguments.
    let hand_to = match (step, hand_to) {
        (Step::Refund, _) => String::new(),
        (Step::Transfer, None) => ", NULL, NULL".to_owned(),
        (Step::Transfer, Some(o)) => format!(", {}, {}", any_text(&o.destination), o.lease_ms),
    };
    let commit = if commit { "; COMMIT" } else { "" };
    let sql = format!(
        "SELECT * FROM {finish_fn}({ids}, {states}, {reasons}, {event_ids}, {types}, \
         {accounts}, {deltas}, {spent}{hand_to}){commit}"
    );
    let rows = sqlx::raw_sql(AssertSqlSafe(sql)).fetch_all(&mut *conn).await?;
    let row = rows.first().ok_or_else(|| sqlx::Error::RowNotFound)?;
    let handed = match step {
        Step::Transfer => handed(row)?,
        Step::Refund => None,
    };
    Ok(Finish { rows: row.try_get("n_rows")?, handed })
}

/// What [`finish`] did.
#[derive(Debug)]
pub(crate) struct Finish {
    /// Rows moved out of waiting.
    pub rows: i64,
    /// The events written leased to the relay offered, if one was.
    pub handed: Option<Handed>,
}

/// The events a transfer batch's write handed over, if it did.
fn handed(row: &PgRow) -> sqlx::Result<Option<Handed>> {
    let Some(lease) = row.try_get::<Option<String>, _>("handed_lease")? else { return Ok(None) };
    let ids: Vec<i64> = row.try_get("handed_ids")?;
    let transfer_ids: Vec<i64> = row.try_get("handed_transfer_ids")?;
    let event_ids: Vec<String> = row.try_get("handed_event_ids")?;
    let types: Vec<String> = row.try_get("handed_types")?;
    let data: Vec<String> = row.try_get("handed_data")?;
    let events = ids
        .into_iter()
        .zip(transfer_ids)
        .zip(event_ids.into_iter().zip(types).zip(data))
        .map(|((id, transfer_id), ((event_id, event_type), data))| HandedEvent {
            id,
            transfer_id: TransferId(transfer_id),
            event_id,
            event_type,
            data,
            traceparent: None,
        })
        .collect();
    Ok(Some(Handed {
        lease,
        occurred_at: row.try_get("handed_occurred_at")?,
        occurred_epoch: row.try_get("handed_occurred_epoch")?,
        events,
    }))
}

#[cfg(test)]
mod tests {
    use super::new_event_id;

    #[test]
    fn event_ids_are_version_7_distinct_and_of_now() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let ids: Vec<_> = (0..1_000).map(|_| new_event_id()).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7 && id.get_variant() == uuid::Variant::RFC4122));
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        let (secs, _) = ids[0].get_timestamp().expect("a v7 id carries its time").to_unix();
        assert!(secs.abs_diff(now) <= 2, "id time {secs}, now {now}");
    }
}

//! The one owner of `transfers`' state transitions: every statement that
//! moves a transfer or its refund from one state to another, or that claims
//! one for that purpose, is here, each guarded by the state it leaves, with
//! its rows-affected checked by the caller. The applier ([`super::apply`]),
//! `cancel` and `refund` call these; nothing else writes a state.
//!
//! The worker's two steps (a PENDING transfer, a REQUESTED refund) have the
//! same transitions on different columns; each statement is spelt out once
//! per step, because compile-time checked queries need literal SQL and the
//! partial indexes the claims use need literal guards. The values they set
//! are bound as the enums ([`TransferStatus`], [`RefundStatus`],
//! [`FailureReason`], [`EventType`]) through their TEXT codecs.

use std::time::Duration;

use sqlx::PgConnection;

use crate::account::AccountId;
use crate::outbox::EventType;
use crate::transfer::step::{Claimed, Outcome, Step};
use crate::transfer::{FailureReason, RefundStatus, TransferId, TransferStatus};

// Each step's statements, compile-time checked. The two steps' SQL differs
// only in who pays whom (transfer: from -> to `amount`; refund: to -> from
// `refund_amount`), the waiting-state guard, and the columns a finish sets.

/// The claim of a batch of `step`, in id order, skipping rows other workers
/// hold. `conn` is in a transaction begun with [`crate::db::BEGIN_CLAIM`], so that
/// the claim walks the waiting index in order; sorts are allowed again
/// after it, by the claim itself: its `set_config(.., true)` runs once the
/// statement is planned, and holds for the rest of the transaction (what a
/// `SET LOCAL enable_sort = on` of its own would do, without that round
/// trip).
///
/// Transfers touching a `busy` account (held by another session, see
/// [`super::busy`]) are left alone: they would only take the slots of
/// transfers that can go through.
pub(crate) async fn claim(
    conn: &mut PgConnection,
    step: Step,
    limit: i64,
    floor: TransferId,
    busy: &[AccountId],
) -> sqlx::Result<Vec<Claimed>> {
    claim_in_order(&mut *conn, step, limit, floor, busy).await
}

async fn claim_in_order(
    conn: &mut PgConnection,
    step: Step,
    limit: i64,
    floor: TransferId,
    busy: &[AccountId],
) -> sqlx::Result<Vec<Claimed>> {
    let busy: Vec<i64> = busy.iter().map(|a| a.0).collect();
    match step {
        Step::Transfer => {
            sqlx::query_as!(
                Claimed,
                r#"SELECT id AS "id: TransferId", from_account AS "debit_account: AccountId",
                          to_account AS "credit_account: AccountId", amount,
                          extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                     FROM transfers
                    WHERE status = 'PENDING' AND next_attempt_at <= now() AND id >= $2
                      AND NOT (from_account = ANY($3) OR to_account = ANY($3))
                      AND set_config('enable_sort', 'on', true) = 'on'
                    ORDER BY id
                    LIMIT $1
                      FOR NO KEY UPDATE SKIP LOCKED"#,
                limit,
                floor.0,
                &busy
            )
            .fetch_all(conn)
            .await
        }
        Step::Refund => {
            sqlx::query_as!(
                Claimed,
                r#"SELECT id AS "id: TransferId", to_account AS "debit_account: AccountId",
                          from_account AS "credit_account: AccountId", refund_amount AS "amount!",
                          extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                     FROM transfers
                    WHERE refund_status = 'REQUESTED' AND next_attempt_at <= now() AND id >= $2
                      AND NOT (from_account = ANY($3) OR to_account = ANY($3))
                      AND set_config('enable_sort', 'on', true) = 'on'
                    ORDER BY id
                    LIMIT $1
                      FOR NO KEY UPDATE SKIP LOCKED"#,
                limit,
                floor.0,
                &busy
            )
            .fetch_all(conn)
            .await
        }
    }
}

/// The claim of one row by id, for the per-row path.
pub(crate) async fn claim_one(conn: &mut PgConnection, step: Step, id: TransferId) -> sqlx::Result<Option<Claimed>> {
    match step {
        Step::Transfer => {
            sqlx::query_as!(
                Claimed,
                r#"SELECT id AS "id: TransferId", from_account AS "debit_account: AccountId",
                          to_account AS "credit_account: AccountId", amount,
                          extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                     FROM transfers
                    WHERE id = $1 AND status = 'PENDING'
                      FOR NO KEY UPDATE SKIP LOCKED"#,
                id.0
            )
            .fetch_optional(conn)
            .await
        }
        Step::Refund => {
            sqlx::query_as!(
                Claimed,
                r#"SELECT id AS "id: TransferId", to_account AS "debit_account: AccountId",
                          from_account AS "credit_account: AccountId", refund_amount AS "amount!",
                          extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                     FROM transfers
                    WHERE id = $1 AND refund_status = 'REQUESTED'
                      FOR NO KEY UPDATE SKIP LOCKED"#,
                id.0
            )
            .fetch_optional(conn)
            .await
        }
    }
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

/// The write of a batch, in one statement (one round trip): moves `money`
/// under the row locks the batch holds, moves the rows out of `step`'s
/// waiting state (guarded by it), and inserts one event per row that changed
/// (its type bound from Rust, its `event_id` a time-ordered UUIDv7).
///
/// The money: `now()` is the transaction's start, the same instant the day's
/// totals were read at; a total saturates (an unlimited account may send
/// more than i64::MAX in a day; that is just "over any limit").
///
/// The guard is written `status || '' = ...` so that no partial index on
/// the waiting state can serve it: the planner sizes those indexes from
/// statistics taken before a burst (a million finished rows and an
/// unanalyzed backlog of 100,000 look like an empty index), and would then
/// hash the whole backlog for every batch of 100 (measured: 60 ms a batch
/// instead of 5). This way the rows are reached from their ids, through the
/// primary key, whatever the statistics say. (The guard itself stays a
/// literal; the values set are bound as their enums.)
pub(crate) async fn finish(
    conn: &mut PgConnection,
    step: Step,
    outcomes: &[(TransferId, Outcome)],
    money: &Money,
) -> sqlx::Result<Finished> {
    let ids: Vec<i64> = outcomes.iter().map(|(id, _)| id.0).collect();
    let reasons: Vec<Option<FailureReason>> = outcomes.iter().map(|(_, o)| o.reason()).collect();
    let types: Vec<EventType> = outcomes.iter().map(|(_, o)| step.event_type(*o)).collect();
    // Time-ordered ids (UUIDv7): each new one lands at the right edge of the
    // event_id index instead of on a random page of it.
    let event_ids: Vec<String> = outcomes.iter().map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let (accounts, rows) = match step {
        Step::Transfer => {
            let states: Vec<TransferStatus> = outcomes.iter().map(|(_, o)| Step::transfer_status(*o)).collect();
            let r = sqlx::query!(
                r#"WITH moved AS (
                     UPDATE accounts a
                        SET balance = a.balance + d.delta,
                            spent_today = CASE WHEN d.spent = 0 THEN a.spent_today
                                               WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date
                                               THEN LEAST(a.spent_today::numeric + d.spent, 9223372036854775807)::bigint
                                               ELSE d.spent END,
                            spent_day = CASE WHEN d.spent = 0 THEN a.spent_day ELSE (now() AT TIME ZONE 'UTC')::date END
                       FROM unnest($6::bigint[], $7::bigint[], $8::bigint[]) AS d(id, delta, spent)
                      WHERE a.id = d.id
                  RETURNING 1
                 ), applied AS (
                     UPDATE transfers t
                        SET status = o.state, failure_reason = o.reason, applied_at = now()
                       FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                            AS o(id, state, reason, event_id, event_type)
                      WHERE t.id = o.id AND t.status || '' = 'PENDING'
                  RETURNING t AS row, o.event_id, o.event_type
                 ), written AS (
                     INSERT INTO outbox (event_id, transfer_id, event_type, data)
                     SELECT a.event_id::uuid, (a.row).id, a.event_type, transfer_event_data(a.row, a.event_type)
                       FROM applied a
                      ORDER BY (a.row).id
                  RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM moved) AS "accounts!", (SELECT count(*) FROM written) AS "rows!""#,
                &ids,
                &states as &[TransferStatus],
                &reasons as &[Option<FailureReason>],
                &event_ids,
                &types as &[EventType],
                &money.accounts,
                &money.deltas,
                &money.spent
            )
            .fetch_one(conn)
            .await?;
            (r.accounts, r.rows)
        }
        Step::Refund => {
            let states: Vec<RefundStatus> = outcomes.iter().map(|(_, o)| Step::refund_status(*o)).collect();
            let r = sqlx::query!(
                r#"WITH moved AS (
                     UPDATE accounts a
                        SET balance = a.balance + d.delta,
                            spent_today = CASE WHEN d.spent = 0 THEN a.spent_today
                                               WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date
                                               THEN LEAST(a.spent_today::numeric + d.spent, 9223372036854775807)::bigint
                                               ELSE d.spent END,
                            spent_day = CASE WHEN d.spent = 0 THEN a.spent_day ELSE (now() AT TIME ZONE 'UTC')::date END
                       FROM unnest($6::bigint[], $7::bigint[], $8::bigint[]) AS d(id, delta, spent)
                      WHERE a.id = d.id
                  RETURNING 1
                 ), applied AS (
                     UPDATE transfers t
                        SET refund_status = o.state, refund_failure_reason = o.reason, refund_applied_at = now()
                       FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                            AS o(id, state, reason, event_id, event_type)
                      WHERE t.id = o.id AND t.refund_status || '' = 'REQUESTED'
                  RETURNING t AS row, o.event_id, o.event_type
                 ), written AS (
                     INSERT INTO outbox (event_id, transfer_id, event_type, data)
                     SELECT a.event_id::uuid, (a.row).id, a.event_type, transfer_event_data(a.row, a.event_type)
                       FROM applied a
                      ORDER BY (a.row).id
                  RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM moved) AS "accounts!", (SELECT count(*) FROM written) AS "rows!""#,
                &ids,
                &states as &[RefundStatus],
                &reasons as &[Option<FailureReason>],
                &event_ids,
                &types as &[EventType],
                &money.accounts,
                &money.deltas,
                &money.spent
            )
            .fetch_one(conn)
            .await?;
            (r.accounts, r.rows)
        }
    };
    Ok(Finished { accounts, rows })
}

/// Counts an unexpected error against a waiting row (guarded by its state);
/// returns the new attempt count, or None if it is no longer waiting.
pub(crate) async fn record_error(
    conn: &mut PgConnection,
    step: Step,
    id: TransferId,
    error: &str,
) -> sqlx::Result<Option<i32>> {
    match step {
        Step::Transfer => {
            sqlx::query_scalar!(
                "UPDATE transfers SET attempts = attempts + 1, last_error = $2
                  WHERE id = $1 AND status = 'PENDING'
              RETURNING attempts",
                id.0,
                error
            )
            .fetch_optional(conn)
            .await
        }
        Step::Refund => {
            sqlx::query_scalar!(
                "UPDATE transfers SET attempts = attempts + 1, last_error = $2
                  WHERE id = $1 AND refund_status = 'REQUESTED'
              RETURNING attempts",
                id.0,
                error
            )
            .fetch_optional(conn)
            .await
        }
    }
}

/// Sets when a waiting row may be tried again (guarded by its state).
pub(crate) async fn put_off(
    conn: &mut PgConnection,
    step: Step,
    id: TransferId,
    delay: Duration,
    note: &str,
) -> sqlx::Result<()> {
    let delay_ms = delay.as_millis() as f64;
    match step {
        Step::Transfer => {
            sqlx::query!(
                "UPDATE transfers SET next_attempt_at = now() + $2 * interval '1 millisecond', last_error = $3
                  WHERE id = $1 AND status = 'PENDING'",
                id.0,
                delay_ms,
                note
            )
            .execute(conn)
            .await?
        }
        Step::Refund => {
            sqlx::query!(
                "UPDATE transfers SET next_attempt_at = now() + $2 * interval '1 millisecond', last_error = $3
                  WHERE id = $1 AND refund_status = 'REQUESTED'",
                id.0,
                delay_ms,
                note
            )
            .execute(conn)
            .await?
        }
    };
    Ok(())
}

/// PENDING -> CANCELLED, with its `transfer.cancelled` event inserted by the
/// same statement from the row it updated: a cancel that came too late
/// writes nothing. True if it applied.
pub(crate) async fn cancel_pending(conn: &mut PgConnection, id: TransferId) -> sqlx::Result<bool> {
    let cancelled = sqlx::query_scalar!(
        "WITH cancelled AS (
             UPDATE transfers t SET status = $2, applied_at = now()
              WHERE t.id = $1 AND t.status = 'PENDING'
          RETURNING t AS row
         )
         INSERT INTO outbox (transfer_id, event_type, data)
         SELECT (row).id, $3, transfer_event_data(row, $3) FROM cancelled
         RETURNING transfer_id",
        id.0,
        TransferStatus::Cancelled as TransferStatus,
        EventType::TransferCancelled as EventType
    )
    .fetch_optional(conn)
    .await?;
    Ok(cancelled.is_some())
}

/// A transfer's status, if it exists (to say why a request did not apply).
pub(crate) async fn status_of(conn: &mut PgConnection, id: TransferId) -> sqlx::Result<Option<TransferStatus>> {
    sqlx::query_scalar!(r#"SELECT status AS "status: TransferStatus" FROM transfers WHERE id = $1"#, id.0)
        .fetch_optional(conn)
        .await
}

/// Takes the transfer's row lock for a request, so that the request waits
/// for a worker applying it and is then judged on the committed row (see
/// `refund`). False if there is no such transfer.
pub(crate) async fn lock_for_request(conn: &mut PgConnection, id: TransferId) -> sqlx::Result<bool> {
    let found = sqlx::query_scalar!("SELECT id FROM transfers WHERE id = $1 FOR NO KEY UPDATE", id.0)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

/// NONE -> REQUESTED on a SUCCEEDED transfer, for `amount` (the transfer's
/// amount if None, never more), with its `refund.requested` event inserted by
/// the same statement. The refund amount if it applied.
pub(crate) async fn request_refund(
    conn: &mut PgConnection,
    id: TransferId,
    amount: Option<i64>,
) -> sqlx::Result<Option<i64>> {
    let requested = sqlx::query!(
        r#"WITH requested AS (
             UPDATE transfers t
                SET refund_status = $3, refund_amount = COALESCE($2, t.amount),
                    refund_requested_at = now(), attempts = 0, next_attempt_at = now(), last_error = NULL
              WHERE t.id = $1 AND t.status = 'SUCCEEDED' AND t.refund_status = 'NONE'
                AND COALESCE($2, t.amount) <= t.amount
          RETURNING t AS row
         ), event AS (
             INSERT INTO outbox (transfer_id, event_type, data)
             SELECT (row).id, $4, transfer_event_data(row, $4) FROM requested
         )
         SELECT (row).id AS "id!", (row).refund_amount AS "refund_amount!" FROM requested"#,
        id.0,
        amount,
        RefundStatus::Requested as RefundStatus,
        EventType::RefundRequested as EventType
    )
    .fetch_optional(conn)
    .await?;
    Ok(requested.map(|r| r.refund_amount))
}

/// What a refund request found: the transfer's status, refund status and amount.
pub(crate) struct RefundState {
    pub status: TransferStatus,
    pub refund_status: RefundStatus,
    pub amount: i64,
}

pub(crate) async fn refund_state(conn: &mut PgConnection, id: TransferId) -> sqlx::Result<Option<RefundState>> {
    sqlx::query_as!(
        RefundState,
        r#"SELECT status AS "status: TransferStatus", refund_status AS "refund_status: RefundStatus", amount
             FROM transfers WHERE id = $1"#,
        id.0
    )
    .fetch_optional(conn)
    .await
}

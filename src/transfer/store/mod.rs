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
//!
//! The exception is the batch, in [`batch`]: its claim and its write each
//! travel in one message with the transaction's BEGIN or COMMIT, as SQL
//! text (see there why).

mod batch;
pub(crate) use batch::{begin_and_claim, end, finish, End, Money};

use std::time::Duration;

use sqlx::PgConnection;

use crate::account::AccountId;
use crate::outbox::EventType;
use crate::transfer::step::{Claimed, Step};
use crate::transfer::{RefundStatus, TransferId, TransferStatus};

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

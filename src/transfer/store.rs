//! The one owner of `transfers`' state transitions: every statement that
//! moves a transfer or its refund from one state to another, or that claims
//! one for that purpose, is here, each guarded by the state it leaves, with
//! its rows-affected checked by the caller. The applier ([`super::apply`]),
//! `cancel` and `refund` call these; nothing else writes a state.
//!
//! The worker's two steps (a PENDING transfer, a REQUESTED refund) have the
//! same transitions on different columns; each statement is spelt out once
//! per step, because compile-time checked queries need literal SQL and the
//! partial indexes the claims use need literal guards.

use std::time::Duration;

use sqlx::PgConnection;

use crate::db;
use crate::transfer::apply::Step;
use crate::transfer::{RefundStatus, TransferId, TransferStatus};

/// A claimed row, in money-movement terms: `amount` leaves `debit_account`
/// for `credit_account` if it succeeds.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub id: i64,
    pub debit_account: i64,
    pub credit_account: i64,
    pub amount: i64,
    /// When it was inserted (Unix seconds), for the enqueue -> applied metric.
    pub created_epoch: f64,
    /// The producer's W3C trace context, if it gave one.
    pub traceparent: Option<String>,
}

/// How a claimed row leaves its waiting state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Failed(&'static str),
}

// Each step's statements, compile-time checked. The two steps' SQL differs
// only in who pays whom (transfer: from -> to `amount`; refund: to -> from
// `refund_amount`), the waiting-state guard, and the columns a finish sets.
impl Step {
    /// The claim of a batch, in id order, skipping rows other workers hold.
    /// `conn` is in a transaction begun with [`db::BEGIN_CLAIM`], so that the
    /// claim walks the waiting index in order; sorts are allowed again
    /// after it.
    ///
    /// Transfers touching a `busy` account (held by another session, see
    /// [`super::busy`]) are left alone: they would only take the slots of
    /// transfers that can go through.
    pub(crate) async fn claim(
        self,
        conn: &mut PgConnection,
        limit: i64,
        floor: i64,
        busy: &[i64],
    ) -> sqlx::Result<Vec<Claimed>> {
        let claimed = self.claim_in_order(&mut *conn, limit, floor, busy).await?;
        sqlx::raw_sql(db::SORTS_ALLOWED).execute(&mut *conn).await?;
        Ok(claimed)
    }

    async fn claim_in_order(
        self,
        conn: &mut PgConnection,
        limit: i64,
        floor: i64,
        busy: &[i64],
    ) -> sqlx::Result<Vec<Claimed>> {
        match self {
            Step::Transfer => {
                sqlx::query_as!(
                    Claimed,
                    r#"SELECT id, from_account AS debit_account, to_account AS credit_account, amount,
                              extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                         FROM transfers
                        WHERE status = 'PENDING' AND next_attempt_at <= now() AND id >= $2
                          AND NOT (from_account = ANY($3) OR to_account = ANY($3))
                        ORDER BY id
                        LIMIT $1
                          FOR NO KEY UPDATE SKIP LOCKED"#,
                    limit,
                    floor,
                    busy
                )
                .fetch_all(conn)
                .await
            }
            Step::Refund => {
                sqlx::query_as!(
                    Claimed,
                    r#"SELECT id, to_account AS debit_account, from_account AS credit_account,
                              refund_amount AS "amount!",
                              extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                         FROM transfers
                        WHERE refund_status = 'REQUESTED' AND next_attempt_at <= now() AND id >= $2
                          AND NOT (from_account = ANY($3) OR to_account = ANY($3))
                        ORDER BY id
                        LIMIT $1
                          FOR NO KEY UPDATE SKIP LOCKED"#,
                    limit,
                    floor,
                    busy
                )
                .fetch_all(conn)
                .await
            }
        }
    }

    /// The claim of one row by id, for the per-row path.
    pub(crate) async fn claim_one(self, conn: &mut PgConnection, id: i64) -> sqlx::Result<Option<Claimed>> {
        match self {
            Step::Transfer => {
                sqlx::query_as!(
                    Claimed,
                    r#"SELECT id, from_account AS debit_account, to_account AS credit_account, amount,
                              extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                         FROM transfers
                        WHERE id = $1 AND status = 'PENDING'
                          FOR NO KEY UPDATE SKIP LOCKED"#,
                    id
                )
                .fetch_optional(conn)
                .await
            }
            Step::Refund => {
                sqlx::query_as!(
                    Claimed,
                    r#"SELECT id, to_account AS debit_account, from_account AS credit_account,
                              refund_amount AS "amount!",
                              extract(epoch FROM created_at)::float8 AS "created_epoch!", traceparent
                         FROM transfers
                        WHERE id = $1 AND refund_status = 'REQUESTED'
                          FOR NO KEY UPDATE SKIP LOCKED"#,
                    id
                )
                .fetch_optional(conn)
                .await
            }
        }
    }

    /// Moves rows out of the waiting state, guarded by it, and inserts one
    /// event per row that changed, in one statement; returns how many. The
    /// event type follows from the new state.
    ///
    /// The guard is written `status || '' = ...` so that no partial index on
    /// the waiting state can serve it: the planner sizes those indexes from
    /// statistics taken before a burst (a million finished rows and an
    /// unanalyzed backlog of 100,000 look like an empty index), and would
    /// then hash the whole backlog for every batch of 100 (measured: 60 ms a
    /// batch instead of 5). This way the rows are reached from their ids,
    /// through the primary key, whatever the statistics say.
    pub(crate) async fn finish(
        self,
        conn: &mut PgConnection,
        ids: &[i64],
        states: &[String],
        reasons: &[Option<String>],
        event_ids: &[String],
    ) -> sqlx::Result<u64> {
        let done = match self {
            Step::Transfer => {
                sqlx::query!(
                    "WITH applied AS (
                         UPDATE transfers t
                            SET status = o.state, failure_reason = o.reason, applied_at = now()
                           FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS o(id, state, reason, event_id)
                          WHERE t.id = o.id AND t.status || '' = 'PENDING'
                      RETURNING t AS row, o.event_id
                     )
                     INSERT INTO outbox (event_id, transfer_id, event_type, data)
                     SELECT a.event_id::uuid, (a.row).id, e.event_type, transfer_event_data(a.row, e.event_type)
                       FROM applied a
                      CROSS JOIN LATERAL (SELECT 'transfer.' || lower((a.row).status) AS event_type) e
                      ORDER BY (a.row).id",
                    ids,
                    states,
                    reasons as &[Option<String>],
                    event_ids
                )
                .execute(conn)
                .await?
            }
            Step::Refund => {
                sqlx::query!(
                    "WITH applied AS (
                         UPDATE transfers t
                            SET refund_status = o.state, refund_failure_reason = o.reason, refund_applied_at = now()
                           FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS o(id, state, reason, event_id)
                          WHERE t.id = o.id AND t.refund_status || '' = 'REQUESTED'
                      RETURNING t AS row, o.event_id
                     )
                     INSERT INTO outbox (event_id, transfer_id, event_type, data)
                     SELECT a.event_id::uuid, (a.row).id, e.event_type, transfer_event_data(a.row, e.event_type)
                       FROM applied a
                      CROSS JOIN LATERAL (SELECT 'refund.' || lower((a.row).refund_status) AS event_type) e
                      ORDER BY (a.row).id",
                    ids,
                    states,
                    reasons as &[Option<String>],
                    event_ids
                )
                .execute(conn)
                .await?
            }
        };
        Ok(done.rows_affected())
    }

    /// Counts an unexpected error against a waiting row (guarded by its
    /// state); returns the new attempt count, or None if it is no longer waiting.
    pub(crate) async fn record_error(self, conn: &mut PgConnection, id: i64, error: &str) -> sqlx::Result<Option<i32>> {
        match self {
            Step::Transfer => {
                sqlx::query_scalar!(
                    "UPDATE transfers SET attempts = attempts + 1, last_error = $2
                      WHERE id = $1 AND status = 'PENDING'
                  RETURNING attempts",
                    id,
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
                    id,
                    error
                )
                .fetch_optional(conn)
                .await
            }
        }
    }

    /// Sets when a waiting row may be tried again (guarded by its state).
    pub(crate) async fn put_off(
        self,
        conn: &mut PgConnection,
        id: i64,
        delay: Duration,
        note: &str,
    ) -> sqlx::Result<()> {
        let delay_ms = delay.as_millis() as f64;
        match self {
            Step::Transfer => {
                sqlx::query!(
                    "UPDATE transfers SET next_attempt_at = now() + $2 * interval '1 millisecond', last_error = $3
                      WHERE id = $1 AND status = 'PENDING'",
                    id,
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
                    id,
                    delay_ms,
                    note
                )
                .execute(conn)
                .await?
            }
        };
        Ok(())
    }

    /// The state names of an outcome for this step.
    pub(crate) fn state(self, outcome: Outcome) -> &'static str {
        match (self, outcome) {
            (Step::Transfer, Outcome::Succeeded) => "SUCCEEDED",
            (Step::Refund, Outcome::Succeeded) => "COMPLETED",
            (_, Outcome::Failed(_)) => "FAILED",
        }
    }
}

/// PENDING -> CANCELLED, with its `transfer.cancelled` event inserted by the
/// same statement from the row it updated: a cancel that came too late
/// writes nothing. True if it applied.
pub(crate) async fn cancel_pending(conn: &mut PgConnection, id: TransferId) -> sqlx::Result<bool> {
    let cancelled = sqlx::query_scalar!(
        "WITH cancelled AS (
             UPDATE transfers t SET status = 'CANCELLED', applied_at = now()
              WHERE t.id = $1 AND t.status = 'PENDING'
          RETURNING t AS row
         )
         INSERT INTO outbox (transfer_id, event_type, data)
         SELECT (row).id, 'transfer.cancelled', transfer_event_data(row, 'transfer.cancelled') FROM cancelled
         RETURNING transfer_id",
        id.0
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
                SET refund_status = 'REQUESTED', refund_amount = COALESCE($2, t.amount),
                    refund_requested_at = now(), attempts = 0, next_attempt_at = now(), last_error = NULL
              WHERE t.id = $1 AND t.status = 'SUCCEEDED' AND t.refund_status = 'NONE'
                AND COALESCE($2, t.amount) <= t.amount
          RETURNING t AS row
         ), event AS (
             INSERT INTO outbox (transfer_id, event_type, data)
             SELECT (row).id, 'refund.requested', transfer_event_data(row, 'refund.requested') FROM requested
         )
         SELECT (row).id AS "id!", (row).refund_amount AS "refund_amount!" FROM requested"#,
        id.0,
        amount
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

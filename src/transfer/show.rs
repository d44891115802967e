//! `transfer show`: one transfer, its refund and its events, as an operator
//! wants to see them when asked "what happened to order 42?".

use serde::Serialize;
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::outbox::EventState;
use crate::transfer::{IdempotencyKey, RefundStatus, TransferId, TransferStatus};

/// Which transfer.
#[derive(Debug, Clone)]
pub enum Lookup {
    Id(TransferId),
    Key(IdempotencyKey),
}

/// The transfer's columns, its refund (if one was asked for) and its events
/// in the order they were written. Times are RFC 3339 in UTC.
#[derive(Debug, Clone, Serialize)]
pub struct TransferView {
    pub transfer_id: i64,
    pub idempotency_key: String,
    pub from_account: i64,
    pub to_account: i64,
    pub amount: i64,
    pub status: TransferStatus,
    pub failure_reason: Option<String>,
    pub refund_status: RefundStatus,
    pub refund_amount: Option<i64>,
    /// Unexpected errors met while applying (the transfer, or its refund).
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: String,
    pub applied_at: Option<String>,
    pub refund: Option<RefundView>,
    pub events: Vec<EventView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefundView {
    pub status: RefundStatus,
    pub amount: i64,
    pub failure_reason: Option<String>,
    pub requested_at: Option<String>,
    pub applied_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub outbox_id: i64,
    pub event_id: String,
    /// Where this delivery goes (`outbox.destination`): None while not
    /// routed yet, `""` when no route takes it. An event sent to several
    /// destinations is listed once per destination, with one `event_id`.
    pub destination: Option<String>,
    pub event_type: String,
    pub state: EventState,
    /// Pending behind a dead event of this transfer.
    pub held: bool,
    /// Rejections by SQS (dead after the configured maximum).
    pub attempts: i32,
    pub last_error: Option<String>,
    pub occurred_at: String,
    /// Its latest publication (None while it waits to go out again).
    pub published_at: Option<String>,
    /// Its first publication: never changed by a replay.
    pub first_published_at: Option<String>,
    /// Every publication, oldest first (more than one after a replay).
    pub publications: Vec<String>,
    /// Times an operator replayed it (`outbox replay`).
    pub replays: i32,
}

/// Reads one transfer; one that does not exist is bad input (exit 2).
pub async fn show(pool: &PgPool, lookup: &Lookup) -> Result<TransferView> {
    let (id, key) = match lookup {
        Lookup::Id(id) => (Some(id.0), None),
        Lookup::Key(k) => (None, Some(k.as_str())),
    };
    let t = sqlx::query!(
        r#"SELECT id, idempotency_key, from_account, to_account, amount, status AS "status: TransferStatus",
                  failure_reason, refund_status AS "refund_status: RefundStatus", refund_amount,
                  refund_failure_reason, attempts, last_error,
                  to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS "created_at!",
                  to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS applied_at,
                  to_char(refund_requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS refund_requested_at,
                  to_char(refund_applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS refund_applied_at
             FROM transfers
            WHERE id = $1 OR idempotency_key = $2"#,
        id,
        key
    )
    .fetch_optional(pool)
    .await?;
    let Some(t) = t else {
        // A pruned transfer's key is still known: say so rather than "none".
        let retired = sqlx::query!(
            r#"SELECT transfer_id, status, to_char(retired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS "at!"
                 FROM retired_keys WHERE transfer_id = $1 OR idempotency_key = $2"#,
            id,
            key
        )
        .fetch_optional(pool)
        .await?;
        let pruned = retired
            .map(|r| {
                format!(" (transfer {}, {}, was pruned at {}; its key stays reserved)", r.transfer_id, r.status, r.at)
            })
            .unwrap_or_default();
        return Err(match lookup {
            Lookup::Id(id) if pruned.is_empty() => Error::NotFound { what: "transfer", id: id.0 },
            Lookup::Id(id) => Error::invalid(format!("transfer {id} does not exist{pruned}")),
            Lookup::Key(k) => Error::invalid(format!("no transfer has idempotency key {:?}{pruned}", k.as_str())),
        });
    };
    let events = sqlx::query!(
        r#"SELECT o.id, o.event_id::text AS "event_id!", o.destination, o.event_type, o.state AS "state: EventState",
                  o.attempts, o.last_error,
                  o.state = 'pending' AND EXISTS (SELECT 1 FROM outbox d
                                                   WHERE d.transfer_id = o.transfer_id AND d.state = 'dead'
                                                     AND COALESCE(d.event_seq, d.id) < COALESCE(o.event_seq, o.id)
                                                     AND (d.destination = o.destination OR o.destination IS NULL)) AS "held!",
                  to_char(o.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS "occurred_at!",
                  to_char(o.published_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS published_at,
                  to_char(COALESCE(o.first_published_at, o.published_at) AT TIME ZONE 'UTC',
                          'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS first_published_at,
                  -- (An event published before publications were kept has
                  -- its published_at as its only one.)
                  ARRAY(SELECT to_char(p AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                          FROM unnest(CASE WHEN cardinality(o.publications) = 0 AND o.published_at IS NOT NULL
                                           THEN ARRAY[o.published_at] ELSE o.publications END) AS p
                         ORDER BY p) AS "publications!",
                  o.replays
             FROM outbox o WHERE o.transfer_id = $1 ORDER BY COALESCE(o.event_seq, o.id), o.destination"#,
        t.id
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|e| EventView {
        outbox_id: e.id,
        event_id: e.event_id,
        destination: e.destination,
        event_type: e.event_type,
        state: e.state,
        held: e.held,
        attempts: e.attempts,
        last_error: e.last_error,
        occurred_at: e.occurred_at,
        published_at: e.published_at,
        first_published_at: e.first_published_at,
        publications: e.publications,
        replays: e.replays,
    })
    .collect();
    let refund = (t.refund_status != RefundStatus::None).then(|| RefundView {
        status: t.refund_status,
        amount: t.refund_amount.unwrap_or_default(),
        failure_reason: t.refund_failure_reason.clone(),
        requested_at: t.refund_requested_at.clone(),
        applied_at: t.refund_applied_at.clone(),
    });
    Ok(TransferView {
        transfer_id: t.id,
        idempotency_key: t.idempotency_key,
        from_account: t.from_account,
        to_account: t.to_account,
        amount: t.amount,
        status: t.status,
        failure_reason: t.failure_reason,
        refund_status: t.refund_status,
        refund_amount: t.refund_amount,
        attempts: t.attempts,
        last_error: t.last_error,
        created_at: t.created_at,
        applied_at: t.applied_at,
        refund,
        events,
    })
}

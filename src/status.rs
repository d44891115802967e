//! `status`: what the worker has done and what is waiting, from the database.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::PgPool;

use crate::error::Result;
use crate::transfer::{RefundStatus, TransferStatus};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Transfers per `status`, every state listed.
    pub transfers: BTreeMap<String, i64>,
    /// Refunds per `refund_status` (REQUESTED, COMPLETED, FAILED; NONE is no refund).
    pub refunds: BTreeMap<String, i64>,
    pub outbox: OutboxCounts,
    /// Age in seconds of the oldest event not yet published (dead and held
    /// included); 0 when everything is published.
    pub oldest_unpublished_age_s: f64,
    /// The oldest dead events (at most [`DEAD_SHOWN`]), for the operator to
    /// fix and requeue; shown by `status`, not part of `status --json`.
    #[serde(skip)]
    pub dead_events: Vec<DeadEvent>,
}

/// How many dead events `status` lists.
pub const DEAD_SHOWN: i64 = 10;

#[derive(Debug, Clone, PartialEq)]
pub struct DeadEvent {
    pub id: i64,
    pub event_id: String,
    pub transfer_id: i64,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// The outbox's events, each counted once: `pending` (waiting for the relay),
/// `held` (pending, but behind a dead event of the same transfer), `dead` and
/// `published`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutboxCounts {
    pub pending: i64,
    pub published: i64,
    pub dead: i64,
    pub held: i64,
}

pub async fn read(pool: &PgPool) -> Result<Status> {
    let mut transfers: BTreeMap<String, i64> = TransferStatus::ALL.iter().map(|s| (s.to_string(), 0)).collect();
    let rows =
        sqlx::query!(r#"SELECT status, count(*) AS "n!" FROM transfers GROUP BY status"#).fetch_all(pool).await?;
    transfers.extend(rows.into_iter().map(|r| (r.status, r.n)));

    let mut refunds: BTreeMap<String, i64> =
        RefundStatus::ALL.iter().filter(|s| **s != RefundStatus::None).map(|s| (s.to_string(), 0)).collect();
    let rows = sqlx::query!(
        r#"SELECT refund_status, count(*) AS "n!" FROM transfers WHERE refund_status <> 'NONE' GROUP BY refund_status"#
    )
    .fetch_all(pool)
    .await?;
    refunds.extend(rows.into_iter().map(|r| (r.refund_status, r.n)));

    let outbox = sqlx::query_as!(
        OutboxCounts,
        r#"SELECT count(*) FILTER (WHERE state = 'pending' AND NOT held) AS "pending!",
                count(*) FILTER (WHERE state = 'published') AS "published!",
                count(*) FILTER (WHERE state = 'dead') AS "dead!",
                count(*) FILTER (WHERE state = 'pending' AND held) AS "held!"
           FROM (SELECT o.state,
                        o.state = 'pending' AND EXISTS (
                            SELECT 1 FROM outbox d
                             WHERE d.transfer_id = o.transfer_id AND d.state = 'dead' AND d.id < o.id) AS held
                   FROM outbox o) x"#
    )
    .fetch_one(pool)
    .await?;

    let oldest = sqlx::query_scalar!(
        r#"SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(occurred_at))::float8, 0) AS "age!"
             FROM outbox WHERE state <> 'published'"#
    )
    .fetch_one(pool)
    .await?;

    let dead_events = sqlx::query_as!(
        DeadEvent,
        r#"SELECT id, event_id::text AS "event_id!", transfer_id, event_type, attempts, last_error
             FROM outbox WHERE state = 'dead' ORDER BY id LIMIT $1"#,
        DEAD_SHOWN
    )
    .fetch_all(pool)
    .await?;

    Ok(Status { transfers, refunds, outbox, oldest_unpublished_age_s: oldest.max(0.0), dead_events })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = |m: &BTreeMap<String, i64>| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        writeln!(f, "transfers: {}", line(&self.transfers))?;
        writeln!(f, "refunds:   {}", line(&self.refunds))?;
        let o = &self.outbox;
        writeln!(f, "outbox:    pending {}, published {}, dead {}, held {}", o.pending, o.published, o.dead, o.held)?;
        write!(f, "oldest unpublished event: {:.1} s", self.oldest_unpublished_age_s)?;
        if !self.dead_events.is_empty() {
            write!(f, "\ndead events (oldest first; `outbox requeue [--event ID]` once the cause is fixed):")?;
            for e in &self.dead_events {
                let error = e.last_error.as_deref().unwrap_or("");
                write!(
                    f,
                    "\n  event {} ({}) {} of transfer {}, {} attempts: {error}",
                    e.id, e.event_id, e.event_type, e.transfer_id, e.attempts
                )?;
            }
            if self.outbox.dead > self.dead_events.len() as i64 {
                write!(f, "\n  ... and {} more", self.outbox.dead - self.dead_events.len() as i64)?;
            }
        }
        Ok(())
    }
}

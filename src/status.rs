//! `status` (and `/metrics`): what the worker has done and what is waiting,
//! from cheap sources only, so that a scrape costs the same at 100 rows as at
//! 100 million.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::PgPool;

use crate::controls::PauseState;
use crate::error::Result;
use crate::outbox::EventState;
use crate::transfer::{RefundStatus, TransferStatus};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Transfers per `status`, every state listed.
    pub transfers: BTreeMap<TransferStatus, i64>,
    /// Refunds per `refund_status` (REQUESTED, COMPLETED, FAILED; NONE is no refund).
    pub refunds: BTreeMap<RefundStatus, i64>,
    pub outbox: OutboxCounts,
    /// Age in seconds of the oldest event not yet published (dead and held
    /// included); 0 when everything is published.
    pub oldest_unpublished_age_s: f64,
    /// The oldest dead events (at most [`DEAD_SHOWN`]), for the operator to
    /// fix and requeue.
    pub dead_events: Vec<DeadEvent>,
    /// What an operator paused (`pause`), for every replica.
    pub paused: PauseState,
    /// Each destination's events (its deliveries), by `outbox.destination`;
    /// `""` holds the events no route takes (recorded, not delivered). Events
    /// not routed yet are in `outbox` only.
    pub destinations: BTreeMap<String, OutboxCounts>,
}

/// How many dead events `status` lists.
pub const DEAD_SHOWN: i64 = 10;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadEvent {
    #[serde(rename = "outbox_id")]
    pub id: i64,
    /// Where it could not be delivered.
    pub destination: String,
    pub event_id: String,
    pub transfer_id: i64,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// Pending events of the same transfer it holds back.
    pub held: i64,
}

/// The outbox's events, each counted once: `pending` (waiting for the relay),
/// `held` (pending, but behind a dead event of the same transfer), `dead` and
/// `published`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutboxCounts {
    pub pending: i64,
    pub published: i64,
    pub dead: i64,
    pub held: i64,
}

/// Folds the counting triggers' deltas into the totals (see the
/// `state_counts` migration), so that reads stay small. Safe to call from
/// anywhere at any time; concurrent calls return at once.
pub async fn compact_counts(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar!(r#"SELECT compact_state_counts() AS "folded!""#).fetch_one(pool).await?)
}

/// What waits, for every replica: pending transfers and unpublished
/// (pending or dead) events, from the maintained counters (one small read).
pub async fn backlog(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar!(
        r#"SELECT COALESCE(sum(n), 0)::int8 AS "n!" FROM current_state_counts
            WHERE (kind = 'transfer' AND state = 'PENDING')
               OR (kind NOT IN ('transfer', 'refund') AND state IN ('pending', 'dead'))"#
    )
    .fetch_one(pool)
    .await?)
}

/// Reads the status without scanning any table: counts per state from the
/// maintained counters, `held` from the (few) dead events, the oldest
/// unpublished event from the heads of the pending and dead events' indexes.
pub async fn read(pool: &PgPool) -> Result<Status> {
    let counts = sqlx::query!(r#"SELECT kind AS "kind!", state AS "state!", n AS "n!" FROM current_state_counts"#)
        .fetch_all(pool)
        .await?;
    let mut transfers: BTreeMap<TransferStatus, i64> = TransferStatus::ALL.iter().map(|s| (*s, 0)).collect();
    let mut refunds: BTreeMap<RefundStatus, i64> =
        RefundStatus::ALL.iter().filter(|s| **s != RefundStatus::None).map(|s| (*s, 0)).collect();
    let mut events: BTreeMap<EventState, i64> = EventState::ALL.iter().map(|s| (*s, 0)).collect();
    let mut destinations: BTreeMap<String, OutboxCounts> = BTreeMap::new();
    // The counters' `kind` names which column a state is of ('event' for
    // unrouted events, 'event@<destination>' for a destination's); a state
    // this binary does not know (a newer release wrote it) is left out.
    for c in counts {
        match c.kind.as_str() {
            "transfer" => c.state.parse().ok().map(|s| transfers.insert(s, c.n)),
            "refund" => c.state.parse().ok().map(|s| refunds.insert(s, c.n)),
            kind => {
                let Ok(state) = c.state.parse::<EventState>() else { continue };
                *events.entry(state).or_default() += c.n;
                if let Some(destination) = kind.strip_prefix("event@") {
                    let d = destinations.entry(destination.to_owned()).or_default();
                    match state {
                        EventState::Pending => d.pending += c.n,
                        EventState::Published => d.published += c.n,
                        EventState::Dead => d.dead += c.n,
                    }
                }
                None
            }
        };
    }

    // Pending events behind a dead one of the same transfer and
    // destination: walks the dead events (a partial index) and, per
    // transfer, its events through (transfer_id, id). The state tests are
    // written `state || ''` so that the index of pending events, which
    // statistics from before a backlog make look empty, is never walked once
    // per dead event.
    let held_rows = sqlx::query!(
        r#"SELECT d.destination AS "destination!", count(DISTINCT o.id) AS "held!"
             FROM outbox d
             JOIN outbox o ON o.transfer_id = d.transfer_id
                          AND COALESCE(o.event_seq, o.id) > COALESCE(d.event_seq, d.id)
                          AND o.state || '' = 'pending'
                          AND (o.destination = d.destination OR o.destination IS NULL)
            WHERE d.state = 'dead'
            GROUP BY d.destination"#
    )
    .fetch_all(pool)
    .await?;
    let mut held = 0;
    for r in held_rows {
        held += r.held;
        let d = destinations.entry(r.destination).or_default();
        d.held = r.held;
        d.pending -= r.held;
    }
    destinations.retain(|_, c| *c != OutboxCounts::default());
    let outbox = OutboxCounts {
        pending: events[&EventState::Pending] - held,
        published: events[&EventState::Published],
        dead: events[&EventState::Dead],
        held,
    };

    // The oldest event still waiting: the heads of the unrouted events'
    // index and of each destination's pending events (the destinations the
    // counters know), or a dead event (few, from their own index) if one is
    // older.
    let known: Vec<String> = destinations.keys().filter(|d| !d.is_empty()).cloned().collect();
    let oldest = sqlx::query_scalar!(
        r#"SELECT EXTRACT(EPOCH FROM now() - min(occurred_at))::float8 AS "age"
             FROM ((SELECT occurred_at FROM outbox WHERE state = 'pending' AND destination IS NULL ORDER BY id LIMIT 1)
                   UNION ALL
                   (SELECT h.occurred_at
                      FROM unnest($1::text[]) AS d(destination)
                      CROSS JOIN LATERAL (SELECT occurred_at FROM outbox o
                                           WHERE o.state = 'pending' AND o.destination = d.destination
                                           ORDER BY o.id LIMIT 1) h)
                   UNION ALL
                   (SELECT occurred_at FROM outbox WHERE state = 'dead' ORDER BY id LIMIT 1)) heads"#,
        &known
    )
    .fetch_one(pool)
    .await?
    .unwrap_or(0.0);

    let dead_events = sqlx::query_as!(
        DeadEvent,
        r#"SELECT d.id, COALESCE(d.destination, '') AS "destination!", d.event_id::text AS "event_id!",
                  d.transfer_id, d.event_type, d.attempts, d.last_error,
                  (SELECT count(*) FROM outbox o
                    WHERE o.transfer_id = d.transfer_id
                      AND COALESCE(o.event_seq, o.id) > COALESCE(d.event_seq, d.id)
                      AND o.state || '' = 'pending'
                      AND (o.destination = d.destination OR o.destination IS NULL)) AS "held!"
             FROM outbox d WHERE d.state = 'dead' ORDER BY d.id LIMIT $1"#,
        DEAD_SHOWN
    )
    .fetch_all(pool)
    .await?;

    let paused = crate::controls::read(&mut *pool.acquire().await?).await?;
    Ok(Status {
        transfers,
        refunds,
        outbox,
        oldest_unpublished_age_s: oldest.max(0.0),
        dead_events,
        paused,
        destinations,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn line<K: std::fmt::Display>(m: &BTreeMap<K, i64>) -> String {
            m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
        writeln!(f, "transfers: {}", line(&self.transfers))?;
        writeln!(f, "refunds:   {}", line(&self.refunds))?;
        let o = &self.outbox;
        writeln!(f, "outbox:    pending {}, published {}, dead {}, held {}", o.pending, o.published, o.dead, o.held)?;
        for (destination, c) in &self.destinations {
            let name = if destination.is_empty() { "(no route: recorded, not delivered)" } else { destination };
            writeln!(
                f,
                "  to {name}: pending {}, published {}, dead {}, held {}",
                c.pending, c.published, c.dead, c.held
            )?;
        }
        write!(f, "oldest unpublished event: {:.1} s", self.oldest_unpublished_age_s)?;
        let p = &self.paused;
        if p.apply || p.relay {
            let parts: Vec<&str> =
                [("apply", p.apply), ("relay", p.relay)].iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
            write!(
                f,
                "\nPAUSED: {} since {} ({})",
                parts.join(" and "),
                p.since.as_deref().unwrap_or("?"),
                p.reason.as_deref().unwrap_or("no reason given")
            )?;
        }
        if !self.dead_events.is_empty() {
            write!(f, "\ndead events (oldest first; `outbox requeue [--event ID]` once the cause is fixed):")?;
            for e in &self.dead_events {
                let error = e.last_error.as_deref().unwrap_or("");
                write!(
                    f,
                    "\n  event {} ({}) {} of transfer {} to {}, {} attempts, holding {}: {error}",
                    e.id, e.event_id, e.event_type, e.transfer_id, e.destination, e.attempts, e.held
                )?;
            }
            if self.outbox.dead > self.dead_events.len() as i64 {
                write!(f, "\n  ... and {} more", self.outbox.dead - self.dead_events.len() as i64)?;
            }
        }
        Ok(())
    }
}

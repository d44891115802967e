//! The relay: claims unpublished outbox events, sends them to SQS, and records
//! what happened, so every event reaches SQS at least once and the events of
//! one transfer arrive in the order they were written.
//!
//! One pass ([`Relay::run_once`]) is one transaction:
//!
//! 1. claim up to `batch_size` events with `FOR UPDATE SKIP LOCKED`: only the
//!    *earliest* unpublished event of each transfer, so two relays (or two
//!    concurrent `SendMessageBatch` calls) never carry two events of one
//!    transfer at once, and a dead event holds back only its own transfer;
//! 2. send them (several calls in flight);
//! 3. mark the accepted ones published, count a rejection against each
//!    rejected one (dead after `max_attempts`), leave the unavailable ones as
//!    they were; commit.
//!
//! A crash between 2 and 3 rolls the claim back, and the events go out again:
//! at least once; FIFO queues drop the copy by `MessageDeduplicationId` =
//! `event_id`, other consumers deduplicate by `event_id`. The claim locks
//! outbox rows only, never transfers or accounts, so a slow or unreachable SQS
//! cannot stall the worker; each call is bounded by the SQS call timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::outbox::sqs::{Delivery, Outgoing, Publisher};
use crate::outbox::EventBody;
use crate::retry::RetryPolicy;
use crate::service::{self, Pass};

/// Tuning of the relay; see `transfer-worker run --help` for the flags.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events claimed per pass (default 100).
    pub batch_size: i64,
    /// Rejections by SQS before an event is dead (default 5).
    pub max_attempts: i32,
    /// Delay before a rejected event is retried, by its attempt number.
    pub rejection_retry: RetryPolicy,
    /// Backoff while SQS is unavailable (never gives up).
    pub outage_retry: RetryPolicy,
    /// Longest sleep when idle; a NOTIFY from an outbox insert wakes it sooner.
    pub poll_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 100,
            max_attempts: 5,
            rejection_retry: RetryPolicy::default(),
            outage_retry: RetryPolicy::default(),
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayCounts {
    pub claimed: usize,
    pub published: usize,
    /// Rejected by SQS and left to retry.
    pub rejected: usize,
    /// Rejected for the last allowed time: now dead.
    pub dead: usize,
    /// Not sent because SQS was unavailable (not counted against them).
    pub unavailable: usize,
}

struct ClaimedEvent {
    id: i64,
    event_id: String,
    transfer_id: i64,
    event_type: String,
    data: String,
    occurred_at: String,
    attempts: i32,
}

pub struct Relay {
    pool: PgPool,
    publisher: Publisher,
    config: RelayConfig,
    wake: Arc<Notify>,
}

impl Relay {
    pub fn new(pool: PgPool, publisher: Publisher, config: RelayConfig, wake: Arc<Notify>) -> Self {
        Relay { pool, publisher, config, wake }
    }

    /// One pass: claim, send, record. Errors are database errors; SQS
    /// trouble shows up in the counts instead.
    pub async fn run_once(&self) -> Result<RelayCounts> {
        let mut tx = self.pool.begin().await?;
        // The earliest unpublished event of each transfer, and only when its
        // retry time has come. `state <> 'published'` repeats the partial
        // indexes' predicate so the planner can use them.
        let claimed = sqlx::query_as!(
            ClaimedEvent,
            r#"SELECT o.id, o.event_id::text AS "event_id!", o.transfer_id, o.event_type,
                      o.data::text AS "data!", o.attempts,
                      to_char(o.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS "occurred_at!"
                 FROM outbox o
                WHERE o.state <> 'published' AND o.state = 'pending'
                  AND o.next_attempt_at <= now()
                  AND NOT EXISTS (SELECT 1 FROM outbox e
                                   WHERE e.transfer_id = o.transfer_id
                                     AND e.state <> 'published'
                                     AND e.id < o.id)
                ORDER BY o.id
                LIMIT $1
                  FOR UPDATE OF o SKIP LOCKED"#,
            self.config.batch_size
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut counts = RelayCounts { claimed: claimed.len(), ..Default::default() };
        if claimed.is_empty() {
            tx.commit().await?;
            return Ok(counts);
        }

        let attempts: HashMap<i64, i32> = claimed.iter().map(|e| (e.id, e.attempts)).collect();
        let outgoing: Vec<Outgoing> = claimed.into_iter().map(to_outgoing).collect();
        let outcomes = self.publisher.publish(&outgoing).await;

        let mut published = Vec::new();
        let (mut rejected_ids, mut rejected_errors, mut rejected_delays) = (Vec::new(), Vec::new(), Vec::new());
        let (mut unavailable_ids, mut unavailable_errors) = (Vec::new(), Vec::new());
        for e in &outgoing {
            match outcomes.get(&e.outbox_id) {
                Some(Delivery::Sent) => published.push(e.outbox_id),
                Some(Delivery::Rejected(msg)) => {
                    rejected_ids.push(e.outbox_id);
                    rejected_errors.push(msg.clone());
                    let attempt = attempts[&e.outbox_id] as u32 + 1;
                    rejected_delays.push(self.config.rejection_retry.delay_for_attempt(attempt).as_millis() as i64);
                }
                Some(Delivery::Unavailable(msg)) => {
                    unavailable_ids.push(e.outbox_id);
                    unavailable_errors.push(msg.clone());
                }
                None => {
                    unavailable_ids.push(e.outbox_id);
                    unavailable_errors.push("not sent".to_owned());
                }
            }
        }

        if !published.is_empty() {
            let n = sqlx::query!(
                "UPDATE outbox SET state = 'published', published_at = now(), last_error = NULL
                  WHERE id = ANY($1) AND state = 'pending'",
                &published
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            debug_assert_eq!(n as usize, published.len(), "claimed rows are locked by this pass");
            counts.published = published.len();
        }

        if !rejected_ids.is_empty() {
            let states = sqlx::query_scalar!(
                "UPDATE outbox o
                    SET attempts = o.attempts + 1,
                        last_error = r.error,
                        state = CASE WHEN o.attempts + 1 >= $4 THEN 'dead' ELSE 'pending' END,
                        next_attempt_at = now() + r.delay_ms * interval '1 millisecond'
                   FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS r(id, error, delay_ms)
                  WHERE o.id = r.id AND o.state = 'pending'
              RETURNING o.state",
                &rejected_ids,
                &rejected_errors,
                &rejected_delays,
                self.config.max_attempts
            )
            .fetch_all(&mut *tx)
            .await?;
            counts.dead = states.iter().filter(|s| *s == "dead").count();
            counts.rejected = states.len() - counts.dead;
            for (id, err) in rejected_ids.iter().zip(&rejected_errors) {
                tracing::warn!(outbox_id = id, error = %err, "SQS rejected an event");
            }
        }

        if !unavailable_ids.is_empty() {
            // Not the events' fault: attempts stay as they are.
            sqlx::query!(
                "UPDATE outbox o SET last_error = r.error
                   FROM unnest($1::bigint[], $2::text[]) AS r(id, error)
                  WHERE o.id = r.id",
                &unavailable_ids,
                &unavailable_errors
            )
            .execute(&mut *tx)
            .await?;
            counts.unavailable = unavailable_ids.len();
            tracing::warn!(events = unavailable_ids.len(), error = %unavailable_errors[0], "SQS unavailable; will retry");
        }

        tx.commit().await?;
        Ok(counts)
    }

    /// One pass, judged for the loop: how soon the next one should start.
    pub async fn pass(&self) -> Pass {
        match self.run_once().await {
            Ok(c) if c.unavailable > 0 => Pass::Unavailable,
            Ok(c) if c.claimed as i64 >= self.config.batch_size => Pass::Busy,
            Ok(_) => Pass::Idle,
            Err(e) => {
                tracing::warn!(error = %e, "relay pass failed; will retry");
                Pass::Unavailable
            }
        }
    }

    /// Runs passes until `shutdown` is cancelled (see [`crate::service`]).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (wake, poll, retry) = (self.wake.clone(), self.config.poll_interval, self.config.outage_retry);
        service::run_loop(shutdown, wake, poll, retry, move || {
            let relay = self.clone();
            Box::pin(async move { relay.pass().await })
        })
        .await
    }
}

fn to_outgoing(e: ClaimedEvent) -> Outgoing {
    let body = EventBody {
        event_id: e.event_id.clone(),
        event_type: e.event_type.clone(),
        transfer_id: e.transfer_id,
        occurred_at: e.occurred_at,
        data: serde_json::from_str(&e.data).unwrap_or(serde_json::Value::String(e.data)),
    };
    Outgoing {
        outbox_id: e.id,
        transfer_id: e.transfer_id,
        event_id: e.event_id,
        event_type: e.event_type,
        body: serde_json::to_string(&body).expect("an event body always serializes"),
    }
}

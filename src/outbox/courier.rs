//! The relay's types, and what carries one claim to its destination and
//! records the outcome (steps 2 and 3 of a pass: see `relay`): the part of a
//! relay its sends in flight share.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::db::Kept;
use crate::error::Result;
use crate::health::Health;
use crate::outbox::publisher::{Published, Publisher};
use crate::outbox::sqs::{Delivery, EntryError, Outgoing};
use crate::outbox::telemetry::RelayReport;
use crate::outbox::{store, EventBody, EventState};
use crate::retry::RetryPolicy;
use crate::service::Progress;

/// Tuning of the relay; see `transfer-worker run --help` for the flags.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events claimed per pass (default 100).
    pub batch_size: i64,
    /// Rejections by SQS before an event is dead (default 5).
    pub max_attempts: i32,
    /// Delay before a rejected or deferred event is retried, by its attempt number.
    pub rejection_retry: RetryPolicy,
    /// Backoff while SQS is unavailable (never gives up).
    pub outage_retry: RetryPolicy,
    /// Longest sleep when idle; a NOTIFY from an outbox insert wakes it sooner.
    pub poll_interval: Duration,
    /// How long a claim is this relay's (default 60 s; `run` sets it from the
    /// SQS call bounds). It should outlast the
    /// longest send of a pass ([`Publisher::worst_case_duration`]); if a send
    /// outlives it, another relay may send the same event again (a duplicate,
    /// dropped by `event_id`), never lose or reorder one.
    pub lease: Duration,
    /// Claims the run loop's pass may have with SQS at once (default 4; see
    /// "Pipelining" in the module docs). `run_once` and `drain` wait for
    /// each claim's send instead.
    pub passes_in_flight: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 100,
            max_attempts: 5,
            rejection_retry: RetryPolicy::default(),
            outage_retry: RetryPolicy::default(),
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(60),
            passes_in_flight: 4,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelayCounts {
    pub claimed: usize,
    pub published: usize,
    /// Refused by SQS for their content and left to retry (attempt counted).
    pub rejected: usize,
    /// Refused for the last allowed time: now dead.
    pub dead: usize,
    /// Failed one by one for reasons that are not theirs (throttling, SQS
    /// internal errors): retried on their own backoff, not counted.
    pub deferred: usize,
    /// Not sent because the whole call failed (an outage; not counted).
    pub unavailable: usize,
    /// Outcomes dropped because the lease had expired and another relay had
    /// claimed the event again.
    pub lost_lease: usize,
    /// Published events whose transfer has another event pending (which
    /// may be claimable now).
    pub unblocked: usize,
    /// For the metrics (recorded by the service loop).
    pub report: RelayReport,
}

/// An event as claimed: the typed event itself, and the relay's
/// bookkeeping for it.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    /// `outbox.id`.
    pub id: i64,
    pub event: EventBody,
    pub attempts: i32,
    pub transient_failures: i32,
    /// Times an operator replayed it (its FIFO deduplication id changes with it).
    pub replays: i32,
    /// When it was written (Unix seconds), for the publish-age metric.
    pub occurred_epoch: f64,
    /// The transfer's trace context, if its producer gave one.
    pub traceparent: Option<String>,
}

/// The events of one claim, and the lease that identifies it.
#[derive(Debug)]
pub struct Claim {
    /// `claimed_until` as PostgreSQL printed it: every outcome is recorded
    /// only where it still holds.
    pub lease: String,
    pub events: Vec<ClaimedEvent>,
    /// Claimed rows whose `data` is not an event's (written by hand, say),
    /// with why: never sent, each rejected as the event's own fault (dead
    /// after `max_attempts`, shown by `status`), so that one bad row cannot
    /// stall the relay.
    pub malformed: Vec<(ClaimedEvent, String)>,
    /// The `outbox.publish` spans of events whose transfer carries a trace
    /// context, by outbox id; they end when the outcome is recorded.
    pub(super) spans: Vec<(i64, tracing::Span)>,
}

impl Claim {
    /// Rows claimed.
    pub fn len(&self) -> usize {
        self.events.len() + self.malformed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What carries a claim to its destination and records the outcome: the
/// part of a relay its sends in flight share.
pub(super) struct Courier {
    /// The relay's connections, kept between passes (see [`crate::db::Kept`]).
    pub(super) conns: Kept,
    pub(super) publisher: Publisher,
    pub(super) config: RelayConfig,
    /// Leases claimed and not yet recorded, to give back at shutdown.
    pub(super) open_leases: Mutex<HashSet<String>>,
    /// Where to say how SQS last answered (for `/readyz`).
    pub(super) health: Option<Arc<Health>>,
}

impl Courier {
    /// Steps 2 and 3 of a pass.
    pub(super) async fn deliver(&self, claim: Claim) -> Result<RelayCounts> {
        let started = std::time::Instant::now();
        let published = self.send(&claim).await;
        let sent = started.elapsed();
        let mut counts =
            self.record(claim, &published.outcomes).await.map_err(|e| e.at("recording what SQS did with a batch"))?;
        counts.report.calls = published.calls;
        counts.report.destination = self.publisher.destination().to_owned();
        counts.report.outcomes = [
            counts.published as u64,
            counts.rejected as u64,
            counts.dead as u64,
            counts.deferred as u64,
            counts.unavailable as u64,
        ];
        tracing::debug!(
            events = counts.claimed,
            published = counts.published,
            send_ms = sent.as_secs_f64() * 1e3,
            record_ms = (started.elapsed() - sent).as_secs_f64() * 1e3,
            "relay pass"
        );
        Ok(counts)
    }

    /// Step 2: sends the claimed events; no transaction is open meanwhile.
    pub(super) async fn send(&self, claim: &Claim) -> Published {
        let outgoing: Vec<Outgoing> = claim.events.iter().map(|e| to_outgoing(e, &self.publisher)).collect();
        let mut published = self.publisher.publish(&outgoing).await;
        for (e, why) in &claim.malformed {
            let error = EntryError { code: "MalformedEvent".into(), message: why.clone(), sender_fault: true };
            published.outcomes.insert(e.id, Delivery::Rejected(error));
        }
        published
    }

    /// Step 3: records what happened to each event, where the lease still holds.
    pub(super) async fn record(&self, claim: Claim, outcomes: &HashMap<i64, Delivery>) -> Result<RelayCounts> {
        let mut counts = RelayCounts { claimed: claim.events.len() + claim.malformed.len(), ..Default::default() };
        let lease = claim.lease.as_str();
        let mut published = Vec::new();
        let mut rejected_codes: HashMap<i64, String> = HashMap::new();
        let (mut rejected_ids, mut rejected_errors, mut rejected_delays) = (Vec::new(), Vec::new(), Vec::new());
        let (mut deferred_ids, mut deferred_errors, mut deferred_delays) = (Vec::new(), Vec::new(), Vec::new());
        let (mut unavailable_ids, mut unavailable_errors) = (Vec::new(), Vec::new());
        for e in claim.events.iter().chain(claim.malformed.iter().map(|(e, _)| e)) {
            match outcomes.get(&e.id) {
                Some(Delivery::Sent) => published.push(e.id),
                Some(Delivery::Rejected(err)) => {
                    rejected_codes.insert(e.id, err.code.clone());
                    rejected_ids.push(e.id);
                    rejected_errors.push(err.to_string());
                    let attempt = e.attempts as u32 + 1;
                    rejected_delays.push(self.config.rejection_retry.delay_for_attempt(attempt).as_millis() as i64);
                    tracing::warn!(outbox_id = e.id, event_id = %e.event.event_id, transfer_id = e.event.transfer_id.0, error = %err, "SQS refused an event");
                }
                Some(Delivery::Deferred(err)) => {
                    counts.report.deferred.push(err.code.clone());
                    deferred_ids.push(e.id);
                    deferred_errors.push(format!("{err} (not the message's fault: retried, not counted)"));
                    let n = e.transient_failures as u32 + 1;
                    deferred_delays.push(self.config.outage_retry.delay_for_attempt(n).as_millis() as i64);
                    tracing::warn!(outbox_id = e.id, event_id = %e.event.event_id, transfer_id = e.event.transfer_id.0, error = %err, "SQS failed an event; retrying it later");
                }
                Some(Delivery::Unavailable(failure)) => {
                    unavailable_ids.push(e.id);
                    unavailable_errors.push(failure.to_string());
                }
                None => {
                    unavailable_ids.push(e.id);
                    unavailable_errors.push("not sent".to_owned());
                }
            }
        }

        if let Some(health) = &self.health {
            match unavailable_errors.first() {
                Some(e) => health.sqs_unavailable(e.clone()),
                None => health.sqs_answered("SendMessageBatch answered"),
            }
        }

        for (id, span) in &claim.spans {
            span.record("outcome", outcomes.get(id).map_or("unavailable", Delivery::name));
        }

        // One statement per kind of outcome, each on its own: every update
        // is guarded by the lease on its own, so a crash between two leaves
        // the rest to go out again when the lease expires (as after a crash
        // before any), and no BEGIN and COMMIT round trips are spent.
        let mut conn = self.conns.take().await?;
        let mut recorded = 0;
        let mut published_now = Vec::new();
        if !published.is_empty() {
            published_now = store::mark_published(&mut conn, &published, lease).await?;
            counts.published = published_now.len();
            counts.unblocked = published_now.iter().filter(|p| p.more).count();
            recorded += published_now.len();
        }

        if !rejected_ids.is_empty() {
            let rows = store::count_rejections(
                &mut conn,
                (&rejected_ids, &rejected_errors, &rejected_delays),
                self.config.max_attempts,
                lease,
            )
            .await?;
            counts.dead = rows.iter().filter(|r| r.state == EventState::Dead).count();
            counts.rejected = rows.len() - counts.dead;
            recorded += rows.len();
            for r in &rows {
                let code = rejected_codes.get(&r.id).map(String::as_str).unwrap_or("");
                counts.report.rejected.push((code.to_owned(), r.state == EventState::Dead));
                if r.state == EventState::Dead {
                    tracing::error!(
                        outbox_id = r.id,
                        code,
                        "event is dead after too many rejections; `outbox requeue` once fixed"
                    );
                }
            }
        }

        if !deferred_ids.is_empty() {
            let n = store::defer(&mut conn, (&deferred_ids, &deferred_errors, &deferred_delays), lease).await?;
            counts.deferred = n;
            recorded += n;
        }

        if !unavailable_ids.is_empty() {
            // Not the events' fault: attempts stay as they are, and the lease
            // is given back so that the next pass (after the loop's backoff)
            // may take them at once.
            let n = store::give_back(&mut conn, &unavailable_ids, &unavailable_errors, lease).await?;
            counts.unavailable = unavailable_ids.len();
            recorded += n;
            tracing::warn!(events = unavailable_ids.len(), error = %unavailable_errors[0], "SQS unavailable; will retry");
        }

        conn.give_back();
        self.open_leases.lock().expect("lease set").remove(&claim.lease);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let written: HashMap<i64, f64> = claim.events.iter().map(|e| (e.id, e.occurred_epoch)).collect();
        let claimed = claim.events.len() + claim.malformed.len();
        for p in &published_now {
            let age = now - written.get(&p.id).copied().unwrap_or(now);
            counts.report.published_ages.push(Duration::from_secs_f64(age.max(0.0)));
        }
        counts.lost_lease = claimed - recorded;
        if counts.lost_lease > 0 {
            tracing::warn!(
                events = counts.lost_lease,
                "a send outlived its lease and the events were claimed again: their outcome here is dropped (they may reach SQS twice)"
            );
        }
        Ok(counts)
    }
}

impl Progress for RelayCounts {
    fn claimed(&self) -> usize {
        self.claimed
    }

    fn unavailable(&self) -> bool {
        self.unavailable > 0
    }
}

impl std::ops::AddAssign for RelayCounts {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.published += o.published;
        self.rejected += o.rejected;
        self.dead += o.dead;
        self.deferred += o.deferred;
        self.unavailable += o.unavailable;
        self.lost_lease += o.lost_lease;
        self.unblocked += o.unblocked;
        self.report.merge(o.report);
    }
}

/// What goes out for an event: its body in the destination's format (see
/// [`Publisher::body`]) and its ids.
fn to_outgoing(e: &ClaimedEvent, publisher: &Publisher) -> Outgoing {
    Outgoing {
        outbox_id: e.id,
        transfer_id: e.event.transfer_id,
        event_id: e.event.event_id.clone(),
        // A replay must get past FIFO's five-minute deduplication of the
        // first publication (see `replay`).
        dedup_id: if e.replays == 0 {
            e.event.event_id.clone()
        } else {
            format!("{}:replay-{}", e.event.event_id, e.replays)
        },
        event_type: e.event.event_type,
        body: publisher.body(&e.event),
        traceparent: e.traceparent.clone(),
    }
}

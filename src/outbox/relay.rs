//! The relay: claims unpublished outbox events, sends them to SQS, and records
//! what happened, so every event reaches SQS at least once and the events of
//! one transfer arrive in the order they were written.
//!
//! One pass ([`Relay::run_once`]) is two short transactions around the network:
//!
//! 1. **claim** ([`Relay::claim`], one statement, committed at once): up to
//!    `batch_size` events, only the *earliest* unpublished event of each
//!    transfer, whose retry time has come and that nobody holds a live lease
//!    on; each gets `claimed_until = now() + lease`. Two relays (or two
//!    concurrent `SendMessageBatch` calls) therefore never carry two events of
//!    one transfer at once, and a dead event holds back only its own transfer;
//! 2. **send** ([`Relay::send`]), several calls in flight, with no transaction
//!    open and no row locked: a slow or hung SQS holds nothing in PostgreSQL
//!    (no locks, no snapshot holding back vacuum, nothing for
//!    `idle_in_transaction_session_timeout` to kill);
//! 3. **record** ([`Relay::record`], one transaction): accepted events become
//!    published; an event SQS refused for its own content has the attempt
//!    counted (dead after `max_attempts`); one that failed for another reason
//!    (throttling, an SQS internal error) is retried later on its own
//!    backoff, uncounted; after an outage of the whole call, events go back
//!    as they were. Every update is guarded by the claim's lease: if a slow
//!    call outlived its lease and another relay claimed the event again, the
//!    stale outcome is dropped (the event was sent twice, never lost).
//!
//! # Pipelining
//!
//! The run loop's pass ([`Service::pass`]) claims and hands the claim's send
//! and record to a task of its own, then returns: the next pass may claim
//! at once (up to `passes_in_flight` claims with SQS at a time), so an event
//! written while an earlier one waits on SQS goes out without waiting for
//! that call. The claim's rules above keep per-transfer order: an event in
//! flight holds a live lease, and its transfer's next event is not claimable
//! until it is published (the send's task wakes the loop when it is). A
//! pass first collects what the finished sends did; if SQS was unavailable
//! the loop backs off before claiming more. At shutdown the loop stops
//! claiming and [`Service::settle`] waits for the sends in flight; at the
//! deadline they are stopped and their leases given back.
//!
//! A crash between 2 and 3 leaves the lease to expire, and the events go out
//! again: at least once; FIFO queues drop the copy by `MessageDeduplicationId`
//! = `event_id`, other consumers deduplicate by `event_id`. Per-transfer order
//! holds because the next event of a transfer is claimable only once the
//! previous one is published, i.e. after SQS accepted it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::controls::{Part, Paused};
use crate::db::Kept;
use crate::error::{Error, Result};
use crate::health::Health;
use crate::outbox::courier::Courier;
pub use crate::outbox::courier::{Claim, ClaimedEvent, RelayConfig, RelayCounts};
use crate::outbox::handoff::{Handed, Offer, TRANSFER_BATCH_TYPES};
use crate::outbox::inflight::InFlight;
use crate::outbox::publisher::{Published, Publisher, MAX_BATCH_ENTRIES};
use crate::outbox::route::{Route, Routing, Scope};
use crate::outbox::sqs::Delivery;
use crate::outbox::telemetry;
use crate::outbox::{store, EventBody, EventData, SCHEMA_VERSION};
use crate::service::{Pass, Progress, Service, Timing};
use futures::future::BoxFuture;

/// A relay with this many sends in flight is offered no events (see
/// [`Relay::offer`]).
const HANDOFF_BELOW: usize = 2;

pub struct Relay {
    /// What a claim's send and record need (shared with the sends in flight).
    courier: Arc<Courier>,
    wake: Arc<Notify>,
    /// The run loop's sends in flight.
    in_flight: InFlight<Result<RelayCounts>>,
    /// The operator's pause (no new pass while the relay is paused).
    paused: Option<Arc<Paused>>,
    /// What its destination claims, and the copies it makes for the others.
    scope: Scope,
    /// The event types no route takes (recorded as such by this relay).
    unrouted: Vec<String>,
    /// Woken when a claim made copies for other destinations (their relays).
    others: Option<Arc<Notify>>,
    /// When the events no route takes were last looked for.
    last_unrouted_sweep: Mutex<Option<std::time::Instant>>,
}

impl Relay {
    pub fn new(pool: PgPool, publisher: Publisher, config: RelayConfig, wake: Arc<Notify>) -> Self {
        let worst = publisher.worst_case_duration(config.batch_size as usize);
        if config.lease <= worst {
            tracing::warn!(
                lease = ?config.lease, worst_case_send = ?worst,
                "the relay lease is shorter than a pass's longest send: slow passes may send events twice"
            );
        }
        let routing = Routing::new(vec![Route::everything_to(publisher.target().clone())]);
        Relay {
            scope: routing.scope_of(publisher.destination()),
            unrouted: Vec::new(),
            in_flight: InFlight::new(config.passes_in_flight),
            courier: Arc::new(Courier {
                // Its own pool, with the relay's session settings (see `db::for_relay`).
                conns: Kept::new(crate::db::for_relay(&pool, pool.options().get_max_connections())),
                publisher,
                config,
                open_leases: Mutex::new(HashSet::new()),
                health: None,
            }),
            wake,
            paused: None,
            others: None,
            last_unrouted_sweep: Mutex::new(None),
        }
    }

    /// Claims by `routing` (its destination's route and the others'), and
    /// wakes `others` when a claim copied events for them.
    pub fn routed(mut self, routing: &Routing, others: Arc<Notify>) -> Self {
        self.scope = routing.scope_of(self.courier.publisher.destination());
        self.unrouted = routing.unrouted();
        self.others = Some(others);
        self
    }

    /// Starts no pass while `paused` says the relay is paused.
    pub fn pausable(mut self, paused: Arc<Paused>) -> Self {
        self.paused = Some(paused);
        self
    }

    /// Reports how SQS answers each pass to `health`.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        Arc::get_mut(&mut self.courier).expect("set before any pass").health = Some(health);
        self
    }

    /// Whether apply tasks may hand it a transfer batch's events: its
    /// destination alone takes them (see [`crate::outbox::handoff`]).
    pub fn takes_handoffs(&self) -> bool {
        Self::scope_takes_transfer_events(&self.scope)
    }

    /// Whether the destination of `scope` alone takes both of a transfer
    /// batch's event types (no other destination gets copies of them).
    pub fn scope_takes_transfer_events(scope: &Scope) -> bool {
        TRANSFER_BATCH_TYPES
            .iter()
            .all(|t| scope.types.iter().any(|s| s == t.as_str()) && !scope.copy_types.iter().any(|s| s == t.as_str()))
    }

    pub fn publisher(&self) -> &Publisher {
        &self.courier.publisher
    }

    /// Closes the relay's connections (see [`crate::db::for_relay`]).
    pub async fn close(&self) {
        self.courier.conns.clear();
        self.courier.conns.pool().close().await;
    }

    /// Claim, send, record (see the module docs), all before returning.
    async fn relay_pass(&self) -> Result<RelayCounts> {
        if self.paused.as_ref().is_some_and(|p| p.is_paused(Part::Relay)) {
            return Ok(RelayCounts::default());
        }
        let claim = self.claim().await?;
        if claim.is_empty() {
            return Ok(RelayCounts::default());
        }
        self.courier.deliver(claim).await
    }

    /// The run loop's pass (see "Pipelining" in the module docs): what the
    /// sends that ended since the last pass did, then a claim handed to a
    /// send of its own in the background, without waiting for it.
    async fn pipelined_pass(&self) -> Result<RelayCounts> {
        let mut done = RelayCounts::default();
        let mut failed = None;
        for outcome in self.in_flight.reap(|why| tracing::error!(%why, "a relay send panicked; its lease expires")) {
            match outcome {
                Ok(c) => done += c,
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            self.record_counts(&done);
            return Err(e);
        }
        // What the sends claimed was counted by the passes that claimed it.
        done.claimed = 0;
        let paused = self.paused.as_ref().is_some_and(|p| p.is_paused(Part::Relay));
        // While SQS is unavailable the loop backs off before claiming more.
        if paused || done.unavailable() {
            return Ok(done);
        }
        let slot = self.in_flight.slot().await;
        let claim = self.claim().await?;
        if claim.is_empty() {
            return Ok(done);
        }
        done.claimed = claim.len();
        self.dispatch(slot, claim);
        Ok(done)
    }

    /// Sends and records `claim` in the background, in `slot`.
    fn dispatch(&self, slot: OwnedSemaphorePermit, claim: Claim) {
        let (courier, wake) = (self.courier.clone(), self.wake.clone());
        self.in_flight.spawn(slot, async move {
            let outcome = courier.deliver(claim).await;
            // The next event of a transfer it published may be claimed now.
            if outcome.as_ref().is_ok_and(|c| c.unblocked > 0) {
                wake.notify_one();
            }
            outcome
        });
    }

    /// A send slot for the events a transfer batch is about to write, if
    /// this relay takes them now: its destination the only one for them,
    /// not paused, and at most one send in flight (see
    /// [`crate::outbox::handoff`]: with more, its next claim gathers the
    /// events of several batches into fuller calls); a batch of `events` that
    /// fills a call on its own, whenever a slot is free.
    pub fn offer(&self, events: usize) -> Option<Offer> {
        if !self.takes_handoffs() || self.paused.as_ref().is_some_and(|p| p.is_paused(Part::Relay)) {
            return None;
        }
        let below = if events >= MAX_BATCH_ENTRIES { usize::MAX } else { HANDOFF_BELOW };
        Some(Offer {
            slot: self.in_flight.try_slot_below(below)?,
            destination: self.courier.publisher.destination().to_owned(),
            lease_ms: self.courier.config.lease.as_millis() as f64,
        })
    }

    /// Sends and records the events a committed batch wrote under `offer`,
    /// as a claim of its own: in the background, in the offer's slot.
    pub fn take(&self, offer: Offer, handed: Handed) {
        let mut claim = handed.into_claim();
        if claim.is_empty() {
            return;
        }
        self.courier.open_leases.lock().expect("lease set").insert(claim.lease.clone());
        claim.spans = claim.events.iter_mut().filter_map(publish_span).collect();
        self.dispatch(offer.slot, claim);
    }

    fn record_counts(&self, counts: &RelayCounts) {
        telemetry::record(&counts.report);
    }

    /// Records the events no route takes, at most once a second (they are
    /// never claimed, and would otherwise wait forever as pending).
    async fn sweep_unrouted(&self) {
        if self.unrouted.is_empty() {
            return;
        }
        {
            let mut last = self.last_unrouted_sweep.lock().expect("sweep clock");
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let marked = async {
            let mut conn = self.courier.conns.take().await?;
            let n = store::mark_unrouted(&mut conn, &self.unrouted, 1_000).await?;
            conn.give_back();
            Ok::<_, sqlx::Error>(n)
        };
        match marked.await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "recorded events no route takes (not delivered anywhere)"),
            Err(e) => tracing::warn!(error = %e, "recording events no route takes failed; will retry"),
        }
    }

    /// Step 1: claims a batch under a fresh lease (committed before return).
    pub async fn claim(&self) -> Result<Claim> {
        self.sweep_unrouted().await;
        let courier = &*self.courier;
        let lease_ms = courier.config.lease.as_millis() as f64;
        let scope = store::ClaimScope {
            destination: courier.publisher.destination(),
            types: &self.scope.types,
            copy_types: &self.scope.copy_types,
            copy_destinations: &self.scope.copy_destinations,
        };
        let mut conn = courier.conns.take().await.map_err(|e| Error::from(e).at("claiming events to publish"))?;
        let rows = store::claim_heads(&mut conn, courier.config.batch_size, lease_ms, &scope)
            .await
            .map_err(|e| Error::from(e).at("claiming events to publish"))?;
        conn.give_back();
        if !rows.is_empty() && !self.scope.copy_types.is_empty() {
            if let Some(others) = &self.others {
                others.notify_one();
            }
        }
        let lease = rows.first().map(|r| r.lease.clone()).unwrap_or_default();
        let (mut events, mut malformed) = (Vec::with_capacity(rows.len()), Vec::new());
        for r in rows {
            let data = serde_json::from_value::<EventData>(r.data.0);
            let event = ClaimedEvent {
                id: r.id,
                event: EventBody {
                    event_id: r.event_id,
                    event_type: r.event_type,
                    transfer_id: r.transfer_id,
                    occurred_at: r.occurred_at,
                    schema_version: SCHEMA_VERSION,
                    data: data.as_ref().cloned().unwrap_or_else(|_| EventData::unreadable()),
                },
                attempts: r.attempts,
                transient_failures: r.transient_failures,
                replays: r.replays,
                occurred_epoch: r.occurred_epoch,
                // Only what the producer API accepts travels on (W3C Trace Context).
                traceparent: r.traceparent.filter(|t| crate::transfer::TraceParent::new(t).is_ok()),
            };
            match data {
                Ok(_) => events.push(event),
                Err(e) => malformed.push((event, format!("its data is not an event's: {e}"))),
            }
        }
        events.sort_by_key(|e| e.id);
        if !events.is_empty() || !malformed.is_empty() {
            courier.open_leases.lock().expect("lease set").insert(lease.clone());
        }
        let spans = events.iter_mut().filter_map(publish_span).collect();
        Ok(Claim { lease, events, malformed, spans })
    }

    /// Step 2: sends the claimed events; no transaction is open meanwhile.
    pub async fn send(&self, claim: &Claim) -> Published {
        self.courier.send(claim).await
    }

    /// Step 3: records what happened to each event, where the lease still holds.
    pub async fn record(&self, claim: Claim, outcomes: &HashMap<i64, Delivery>) -> Result<RelayCounts> {
        self.courier.record(claim, outcomes).await
    }

    /// Gives back the leases of passes that were abandoned (at a shutdown
    /// deadline), so a restarted worker sends those events at once instead
    /// of waiting for the leases to expire. Events SQS had in fact accepted
    /// go out again: a duplicate, never a loss.
    pub async fn release_open_leases(&self) -> Result<u64> {
        self.in_flight.abort_all();
        let leases: Vec<String> = self.courier.open_leases.lock().expect("lease set").drain().collect();
        if leases.is_empty() {
            return Ok(0);
        }
        let mut conn = self.courier.conns.take().await?;
        let n = store::release_leases(&mut conn, &leases).await?;
        conn.give_back();
        Ok(n)
    }
}

impl Service for Relay {
    type Counts = RelayCounts;
    const NAME: &'static str = "relay";

    /// One pass: claim, send, record. Errors are database errors; SQS
    /// trouble shows up in the counts instead.
    fn run_once(&self) -> BoxFuture<'_, Result<RelayCounts>> {
        Box::pin(self.relay_pass())
    }

    /// The run loop's pass: pipelined (see the module docs).
    fn pass(&self) -> BoxFuture<'_, Pass> {
        Box::pin(async move {
            let outcome = self.pipelined_pass().await;
            self.judge(outcome)
        })
    }

    /// Waits for the sends the loop left in flight.
    fn settle(&self) -> BoxFuture<'_, Result<RelayCounts>> {
        Box::pin(async move {
            let mut total = RelayCounts::default();
            for outcome in self.in_flight.settle(|why| tracing::error!(%why, "a relay send panicked")).await {
                total += outcome?;
            }
            Ok(total)
        })
    }

    fn batch_size(&self) -> i64 {
        self.courier.config.batch_size
    }

    /// Its poll interval, and its backoff while SQS (or the database) is
    /// unavailable.
    fn timing(&self) -> Timing {
        Timing { poll_interval: self.courier.config.poll_interval, outage_retry: self.courier.config.outage_retry }
    }

    /// Events written by this process, or notified.
    fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    fn record(&self, counts: &RelayCounts) {
        self.record_counts(counts);
    }
}

/// Opens the publish span of an event whose transfer carries a trace
/// context, and makes the event carry the span's context (see
/// [`crate::trace`]).
fn publish_span(e: &mut ClaimedEvent) -> Option<(i64, tracing::Span)> {
    let traceparent = e.traceparent.as_deref()?;
    let span = tracing::info_span!(
        "publish",
        otel.name = "outbox.publish",
        otel.kind = "producer",
        outbox_id = e.id,
        event_id = %e.event.event_id,
        event_type = %e.event.event_type,
        transfer_id = e.event.transfer_id.0,
        outcome = tracing::field::Empty,
    );
    e.traceparent = Some(crate::trace::continue_remote(&span, traceparent));
    Some((e.id, span))
}

//! Events handed from an apply commit straight to the relay of the same
//! process, without the relay claiming them.
//!
//! # Why
//! At the rates most teams run, every transfer is a batch of its own, and
//! the relay's claim of its one event is a round trip (a thread park and
//! wake-up, and a statement that rewrites the row) that costs about as much
//! of the worker's CPU as the apply's own. The apply transaction has just
//! written the event: it can write it the way a claim would leave it
//! instead, and give it to the relay.
//!
//! # How
//! Before a transfer batch's write, the apply task asks its relay for an
//! [`Offer`]: one of the relay's send slots (the same ones its claims use),
//! the relay's destination and its lease. The write then inserts each event
//! as that destination's, under the lease (`claimed_until`), exactly as a
//! relay's claim would have left it, and returns the events ([`Handed`];
//! migration `20261202000007_apply_handoff.sql`). After the COMMIT, the
//! relay sends and records them as it does a claim of its own.
//!
//! # What stays true
//! - **Nothing is lost.** If the process dies, or the COMMIT's outcome is
//!   unknown, between the write and the send, the lease runs out and any
//!   relay claims the events, as after a crash of a relay mid-send.
//! - **Nothing goes out twice more than before.** Other relays see a leased
//!   event and skip it, as they skip any claimed one.
//! - **Order holds.** Only a PENDING transfer's batch hands off: its event
//!   is the first of its transfer, the head a claim would take. Refunds,
//!   whose events follow others, are claimed as before.
//! - **Routes hold.** Only a relay whose destination alone takes both
//!   `transfer.succeeded` and `transfer.failed` is offered events; when
//!   another destination takes them too (copies), the claim routes them.
//! - **No offer, no change.** A paused relay, or one with two sends in
//!   flight already, makes no offer: the events are written unrouted and
//!   claimed as before.
//!
//! # Only to a relay that is keeping up
//! A hand-off is one batch's events in one call. At the rates where every
//! transfer is a batch of its own, the relay has at most one send in flight
//! when the next batch commits, and the hand-off saves the claim. Where
//! batches come faster than the destination answers, handing each its own
//! call would make many small calls where the relay's next claim makes one
//! fuller one, and slow the destination for everyone (measured at 500/s
//! with a free slot as the only condition: published 446-498/s against
//! 493-496/s); so a relay with two sends in flight is offered nothing and
//! gathers the events by its claims, as before. A batch of ten events or
//! more fills its own calls, as full as a claim's: it is offered any free
//! slot (at a thousand a second, gathered batches are that size, and the
//! claims that took their events were the busiest statement in PostgreSQL).

use crate::outbox::courier::{Claim, ClaimedEvent};
use crate::outbox::{EventBody, EventData, EventType, SCHEMA_VERSION};
use crate::transfer::TransferId;

/// A relay's consent to take a batch's events: a send slot held until
/// they are recorded, and where and how long the write leases them.
pub struct Offer {
    pub(super) slot: tokio::sync::OwnedSemaphorePermit,
    /// The relay's destination, as the outbox records it.
    pub destination: String,
    /// The relay's lease, in milliseconds.
    pub lease_ms: f64,
}

/// The events a batch's write inserted under an [`Offer`], as the write
/// returned them (in outbox id order).
#[derive(Debug)]
pub struct Handed {
    /// `claimed_until` as PostgreSQL prints it (see [`Claim::lease`]).
    pub lease: String,
    /// When they occurred: the transaction's time, as events carry it.
    pub occurred_at: String,
    pub occurred_epoch: f64,
    pub events: Vec<HandedEvent>,
}

/// One event of [`Handed`].
#[derive(Debug)]
pub struct HandedEvent {
    pub id: i64,
    pub transfer_id: TransferId,
    pub event_id: String,
    pub event_type: String,
    /// Its `data` as JSON text.
    pub data: String,
    /// Its transfer's trace context, if its producer gave one.
    pub traceparent: Option<String>,
}

/// The event types a transfer batch writes: a relay is offered them only
/// if its destination alone takes both.
pub const TRANSFER_BATCH_TYPES: [EventType; 2] = [EventType::TransferSucceeded, EventType::TransferFailed];

impl Handed {
    /// The claim a relay would have made of these events.
    pub(super) fn into_claim(self) -> Claim {
        let (mut events, mut malformed) = (Vec::with_capacity(self.events.len()), Vec::new());
        for e in self.events {
            let data = serde_json::from_str::<EventData>(&e.data);
            let event_type = e.event_type.parse::<EventType>();
            let event = ClaimedEvent {
                id: e.id,
                event: EventBody {
                    event_id: e.event_id,
                    event_type: *event_type.as_ref().unwrap_or(&EventType::TransferFailed),
                    transfer_id: e.transfer_id,
                    occurred_at: self.occurred_at.clone(),
                    schema_version: SCHEMA_VERSION,
                    data: data.as_ref().cloned().unwrap_or_else(|_| EventData::unreadable()),
                },
                attempts: 0,
                transient_failures: 0,
                replays: 0,
                occurred_epoch: self.occurred_epoch,
                traceparent: e.traceparent.filter(|t| crate::transfer::TraceParent::new(t).is_ok()),
            };
            match (data, event_type) {
                (Ok(_), Ok(_)) => events.push(event),
                (Err(e), _) => malformed.push((event, format!("its data is not an event's: {e}"))),
                (_, Err(e)) => malformed.push((event, format!("its type is not an event's: {e}"))),
            }
        }
        Claim { lease: self.lease, events, malformed, spans: Vec::new() }
    }
}

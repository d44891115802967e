//! The transactional outbox: every state change that applied writes one row
//! here, in the same transaction as the change; the [`relay`] publishes rows
//! to SQS through [`sqs`].
//!
//! ```text
//!  (state change commits) ──> pending ──(relay: SQS accepted it)──────────> published
//!                               │  ^
//!                               │  └──(relay: SQS rejected it, attempts < max: retried later)
//!                               └─────(relay: rejected `max_attempts` times)──> dead
//!  dead ──(operator: `outbox requeue`)──> pending
//! ```
//!
//! Per transfer, events are published strictly in `id` order: the relay only
//! claims the earliest unpublished event of each transfer, so a `dead` event
//! holds back the later events of its own transfer (counted as *held*) and
//! nothing else. Outages (SQS unreachable, throttled, 5xx, queue missing) never
//! change `attempts` and never make an event dead.

mod courier;
pub mod delivery;
pub mod glob;
pub mod handoff;
mod inflight;
pub mod message;
pub mod publisher;
pub mod relay;
pub mod replay;
pub mod requeue;
pub mod route;
pub mod sns;
pub mod sqs;
pub(crate) mod store;
pub mod telemetry;

use serde::Serialize;

use crate::account::AccountId;
use crate::transfer::TransferId;

/// `outbox.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    /// Written with its state change; the relay claims it when it is the
    /// earliest unpublished event of its transfer and its backoff has passed.
    Pending,
    /// Terminal. SQS accepted it.
    Published,
    /// SQS refused it for its content `max_attempts` times. Holds back the
    /// later events of its transfer until an operator requeues it (dead ->
    /// pending).
    Dead,
}

impl EventState {
    pub const ALL: [EventState; 3] = [EventState::Pending, EventState::Published, EventState::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Pending => "pending",
            EventState::Published => "published",
            EventState::Dead => "dead",
        }
    }
}

impl std::fmt::Display for EventState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        EventState::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| format!("unknown event state {s:?}"))
    }
}

crate::text_state::text_state!(EventState);

/// `outbox.event_type`: what happened, in the events' one spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub enum EventType {
    /// A transfer moved the money (PENDING -> SUCCEEDED).
    #[serde(rename = "transfer.succeeded")]
    TransferSucceeded,
    /// A transfer failed (PENDING -> FAILED); the data has `reason`.
    #[serde(rename = "transfer.failed")]
    TransferFailed,
    /// A transfer was cancelled while PENDING.
    #[serde(rename = "transfer.cancelled")]
    TransferCancelled,
    /// A refund was accepted (NONE -> REQUESTED); the data has `refund_amount`.
    #[serde(rename = "refund.requested")]
    RefundRequested,
    /// The refund moved the money back (REQUESTED -> COMPLETED).
    #[serde(rename = "refund.completed")]
    RefundCompleted,
    /// The refund failed (REQUESTED -> FAILED); the data has `reason`.
    #[serde(rename = "refund.failed")]
    RefundFailed,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::TransferSucceeded,
        EventType::TransferFailed,
        EventType::TransferCancelled,
        EventType::RefundRequested,
        EventType::RefundCompleted,
        EventType::RefundFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::TransferSucceeded => "transfer.succeeded",
            EventType::TransferFailed => "transfer.failed",
            EventType::TransferCancelled => "transfer.cancelled",
            EventType::RefundRequested => "refund.requested",
            EventType::RefundCompleted => "refund.completed",
            EventType::RefundFailed => "refund.failed",
        }
    }

    /// Where the event stands among its transfer's events: a transfer has at
    /// most three, always in this order (its outcome, then a refund's
    /// request and outcome), so a consumer of a standard queue, where events
    /// of one transfer may arrive out of order, can put them back in order.
    pub fn sequence(self) -> u8 {
        match self {
            EventType::TransferSucceeded | EventType::TransferFailed | EventType::TransferCancelled => 1,
            EventType::RefundRequested => 2,
            EventType::RefundCompleted | EventType::RefundFailed => 3,
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| format!("unknown event type {s:?}"))
    }
}

crate::text_state::text_state!(EventType);

/// The version of the event body's schema this binary writes. The rule:
/// adding a field keeps the version (consumers must ignore fields they do
/// not know); anything else (a field removed, renamed or retyped, a meaning
/// changed) is a new version, published side by side with the old one for a
/// deprecation window.
pub const SCHEMA_VERSION: u32 = 1;

/// The message body published to SQS (the contract's event format), and
/// what a consumer decodes it back into: one typed value from the relay's
/// claim to the SQS call, and from the SQS message to a consumer's handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EventBody {
    pub event_id: String,
    pub event_type: EventType,
    pub transfer_id: TransferId,
    /// When the change was written (RFC 3339, UTC, microseconds).
    pub occurred_at: String,
    pub schema_version: u32,
    pub data: EventData,
}

/// An event's `data`: the transfer's parties and amount, plus the reason of
/// a failure and the amount of a refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EventData {
    pub from_account: AccountId,
    pub to_account: AccountId,
    pub amount: i64,
    pub idempotency_key: String,
    /// `transfer.failed` and `refund.failed`: why (`insufficient_funds`,
    /// `daily_limit_exceeded`, `processing_error`). Text rather than an enum
    /// so that a consumer built before a new reason still reads the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Refund events: the refund's amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_amount: Option<i64>,
}

impl EventData {
    /// Stands in for data that did not decode, in an event that is never
    /// sent (see `relay::Claim::malformed`).
    pub(crate) fn unreadable() -> EventData {
        EventData {
            from_account: AccountId(0),
            to_account: AccountId(0),
            amount: 0,
            idempotency_key: String::new(),
            reason: None,
            refund_amount: None,
        }
    }
}

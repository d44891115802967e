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

pub mod relay;
pub mod requeue;
pub mod sqs;
pub(crate) mod store;

use serde::Serialize;

/// `outbox.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

crate::db::text_state!(EventState);

/// The message body published to SQS (the contract's event format).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EventBody {
    pub event_id: String,
    pub event_type: String,
    pub transfer_id: i64,
    pub occurred_at: String,
    pub data: serde_json::Value,
}

//! What goes out: one event as a message (its body, already escaped, its
//! attributes and ids), what characters a message may hold, and how one
//! batch call's answer is read entry by entry. Shared by SQS and SNS.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use super::delivery::{Delivery, EntryError};
use super::EventType;
use crate::transfer::TransferId;

/// The String message attribute every message carries.
pub const EVENT_TYPE_ATTRIBUTE: &str = "event_type";

/// The String message attribute carrying the producer's W3C trace context,
/// when the transfer has one.
pub const TRACEPARENT_ATTRIBUTE: &str = "traceparent";

/// Whether `c` may appear in an SQS message body or attribute value:
/// `#x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF`.
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessage.html>
pub fn allowed_in_sqs(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Writes every character SQS refuses as a JSON `\uXXXX` escape. Applied to a
/// serialized JSON document, the result is valid JSON that decodes to exactly
/// the same value: such characters can only occur inside JSON strings (all of
/// JSON's own syntax is plain ASCII), and all of them are in the Basic
/// Multilingual Plane, so one escape each suffices. Applied to an attribute
/// value, the consumer sees the escape as text.
pub fn escape_for_sqs(text: &str) -> Cow<'_, str> {
    if text.chars().all(allowed_in_sqs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if allowed_in_sqs(c) {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{:04x}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// One event ready to send. `body` and the attribute values must already be
/// valid for SQS (see [`escape_for_sqs`]).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// `outbox.id`, also the batch entry id.
    pub outbox_id: i64,
    pub transfer_id: TransferId,
    pub event_id: String,
    /// The FIFO `MessageDeduplicationId`: the `event_id`, or for a replay
    /// `<event_id>:replay-<n>`.
    pub dedup_id: String,
    pub event_type: EventType,
    pub body: String,
    /// The producer's trace context, sent as the `traceparent` attribute.
    pub traceparent: Option<String>,
}

impl Outgoing {
    /// The size SQS and SNS count for this message: body plus each
    /// attribute's name, type and value.
    pub(super) fn size(&self) -> usize {
        let trace = self.traceparent.as_ref().map(|t| TRACEPARENT_ATTRIBUTE.len() + "String".len() + t.len());
        self.body.len()
            + EVENT_TYPE_ATTRIBUTE.len()
            + "String".len()
            + self.event_type.as_str().len()
            + trace.unwrap_or(0)
    }
}

/// One call's outcomes by outbox id, and the call's result and duration.
pub(crate) type BatchSent = (Vec<(i64, Delivery)>, (&'static str, Duration));

/// Reads a batch call's answer: each entry's outcome by outbox id, an entry
/// listed neither as sent nor as failed deferred (not sent, not its fault).
pub(crate) fn outcomes_of(
    batch: &[&Outgoing],
    sent: impl Iterator<Item = i64>,
    failed: impl Iterator<Item = (i64, EntryError)>,
) -> Vec<(i64, Delivery)> {
    let mut outcomes: HashMap<i64, Delivery> = HashMap::with_capacity(batch.len());
    for id in sent {
        outcomes.insert(id, Delivery::Sent);
    }
    for (id, error) in failed {
        outcomes.insert(id, Delivery::for_entry(error));
    }
    batch
        .iter()
        .map(|e| {
            let d = outcomes.remove(&e.outbox_id).unwrap_or_else(|| {
                Delivery::Deferred(EntryError {
                    code: "NoResult".into(),
                    message: "the destination returned no result for this entry".into(),
                    sender_fault: false,
                })
            });
            (e.outbox_id, d)
        })
        .collect()
}

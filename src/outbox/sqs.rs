//! Publishing events to SQS with `SendMessageBatch`, and classifying every
//! failure: the message's own fault (a rejection, counted toward dead), a
//! per-entry hiccup that is not its fault (throttling, an internal error:
//! retried later, not counted), or an outage of the whole call (never counted).
//!
//! Every response is read entry by entry: `SendMessageBatch` answers HTTP 200
//! even when some entries failed, and an entry that is not listed as
//! successful was not sent. A per-entry failure is that event's business
//! only; it never makes the relay back off the others.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use futures::StreamExt;

use crate::outbox::EventType;
use crate::transfer::TransferId;

/// At most 10 entries per `SendMessageBatch` call.
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessageBatch.html>
pub const MAX_BATCH_ENTRIES: usize = 10;

/// The sum of all message sizes in one batch (bodies and attributes) may not
/// exceed 1 MiB, the same as one message's maximum (raised from 256 KiB in 2025).
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html>
pub const MAX_BATCH_BYTES: usize = 1_048_576;

/// The largest message SQS accepts at all; a queue may set a lower maximum.
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html>
pub const MAX_MESSAGE_BYTES: usize = 1_048_576;

/// The String message attribute every message carries.
pub const EVENT_TYPE_ATTRIBUTE: &str = "event_type";

/// The String message attribute carrying the producer's W3C trace context,
/// when the transfer has one.
pub const TRACEPARENT_ATTRIBUTE: &str = "traceparent";

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
    /// The size SQS counts for this message: body plus each attribute's name,
    /// type and value.
    fn size(&self) -> usize {
        let trace = self.traceparent.as_ref().map(|t| TRACEPARENT_ATTRIBUTE.len() + "String".len() + t.len());
        self.body.len()
            + EVENT_TYPE_ATTRIBUTE.len()
            + "String".len()
            + self.event_type.as_str().len()
            + trace.unwrap_or(0)
    }
}

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

pub use super::delivery::{Delivery, EntryError, SqsFailure};

/// `SendMessageBatch` calls a relay pass keeps in flight unless told
/// otherwise: a default pass (100 events) goes out in one wave of 10 calls,
/// so no call waits for a slot while SQS has room.
pub const DEFAULT_CONCURRENCY: usize = 10;

/// How the SQS client behaves.
#[derive(Debug, Clone)]
pub struct SqsConfig {
    pub queue_url: String,
    /// Bound on one `SendMessageBatch` call, so a hung SQS cannot hang the relay
    /// (the SDK has no operation timeout by default).
    pub call_timeout: Duration,
    /// How many `SendMessageBatch` calls one relay pass keeps in flight.
    pub concurrency: usize,
}

/// What `GetQueueAttributes` said about the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    pub fifo: bool,
}

/// An SQS client from aws-config's standard chain (env, profile, ...);
/// LocalStack is just `AWS_ENDPOINT_URL`. Every call is bounded by
/// `call_timeout` and tried once: the relay owns the retry policy.
pub async fn client_from_env(call_timeout: Duration) -> aws_sdk_sqs::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3).min(call_timeout))
        .operation_attempt_timeout(call_timeout)
        .operation_timeout(call_timeout)
        .build();
    let sdk_config = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        .load()
        .await;
    aws_sdk_sqs::Client::new(&sdk_config)
}

/// Whether a queue URL names a FIFO queue: its last path segment ends in
/// `.fifo` (a trailing `/`, a query string or a fragment do not hide it).
pub fn url_names_fifo_queue(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.trim_end_matches('/').rsplit('/').next().is_some_and(|name| name.ends_with(".fifo"))
}

/// Sends events to one queue.
#[derive(Clone)]
pub struct Publisher {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    fifo: bool,
    concurrency: usize,
    call_timeout: Duration,
}

impl Publisher {
    /// A publisher on `client`; whether the queue is FIFO is read from its
    /// URL until [`Publisher::check_queue`] asks SQS.
    pub fn new(client: aws_sdk_sqs::Client, config: &SqsConfig) -> Self {
        Publisher {
            client,
            fifo: url_names_fifo_queue(&config.queue_url),
            queue_url: config.queue_url.clone(),
            concurrency: config.concurrency.max(1),
            call_timeout: config.call_timeout,
        }
    }

    /// Overrides what the URL said about the queue being FIFO.
    pub fn with_fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }

    /// Asks SQS for the queue's `FifoQueue` attribute and believes it over
    /// the URL. An error (SQS unreachable, the queue missing) is returned for
    /// the caller to report; it changes nothing here.
    pub async fn check_queue(&mut self) -> Result<QueueInfo, String> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::FifoQueue)
            .send()
            .await
            .map_err(|e| SqsFailure::from_sdk(format!("GetQueueAttributes on {}", self.queue_url), &e).to_string())?;
        let fifo = out.attributes().and_then(|a| a.get(&QueueAttributeName::FifoQueue)).is_some_and(|v| v == "true");
        self.fifo = fifo;
        Ok(QueueInfo { fifo })
    }

    pub fn client(&self) -> &aws_sdk_sqs::Client {
        &self.client
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    /// The longest [`Publisher::publish`] of `events` events can take: its
    /// calls go `concurrency` at a time, each bounded by the call timeout.
    pub fn worst_case_duration(&self, events: usize) -> Duration {
        let calls = events.div_ceil(MAX_BATCH_ENTRIES).max(1);
        self.call_timeout * calls.div_ceil(self.concurrency) as u32
    }

    /// Sends `events` in batches of at most 10 entries and 1 MiB, several
    /// calls at once, and returns each event's outcome keyed by outbox id.
    ///
    /// The caller must not pass two events of one transfer: calls complete in
    /// any order. (The relay claims only the earliest unpublished event of
    /// each transfer.)
    pub async fn publish(&self, events: &[Outgoing]) -> Published {
        // An event larger than any SQS message is refused here, without a
        // call: it is that event's fault, and alone it would fail the call.
        let (sendable, too_large): (Vec<&Outgoing>, Vec<&Outgoing>) =
            events.iter().partition(|e| e.size() <= MAX_MESSAGE_BYTES);
        let mut outcomes: HashMap<i64, Delivery> = too_large
            .into_iter()
            .map(|e| {
                let error = EntryError {
                    code: "MessageTooLong".into(),
                    message: format!("{} bytes, more than SQS's maximum of {MAX_MESSAGE_BYTES}", e.size()),
                    sender_fault: true,
                };
                (e.outbox_id, Delivery::Rejected(error))
            })
            .collect();
        // The calls are built first and then driven: a closure inside the
        // stream would make this future's `Send` unprovable for spawned tasks.
        let calls: Vec<_> = batches(&sendable).into_iter().map(|batch| self.send_batch(batch)).collect();
        let results: Vec<BatchSent> = futures::stream::iter(calls).buffer_unordered(self.concurrency).collect().await;
        let mut calls = Vec::with_capacity(results.len());
        for (deliveries, call) in results {
            outcomes.extend(deliveries);
            calls.push(call);
        }
        Published { outcomes, calls }
    }

    /// One `SendMessageBatch`: each entry's outcome, and how the call ended.
    async fn send_batch(&self, batch: Vec<&Outgoing>) -> BatchSent {
        let mut entries = Vec::with_capacity(batch.len());
        for e in &batch {
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(e.outbox_id.to_string())
                .message_body(&e.body)
                .message_attributes(
                    EVENT_TYPE_ATTRIBUTE,
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(e.event_type.as_str())
                        .build()
                        .expect("data_type is set"),
                );
            if let Some(tp) = &e.traceparent {
                entry = entry.message_attributes(
                    TRACEPARENT_ATTRIBUTE,
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(escape_for_sqs(tp))
                        .build()
                        .expect("data_type is set"),
                );
            }
            if self.fifo {
                // Per-transfer order on a FIFO queue; SQS drops a resend of the
                // same event_id within its 5-minute deduplication window.
                entry = entry.message_group_id(e.transfer_id.to_string()).message_deduplication_id(&e.dedup_id);
            }
            entries.push(entry.build().expect("id and body are set"));
        }

        let started = std::time::Instant::now();
        let result =
            self.client.send_message_batch().queue_url(&self.queue_url).set_entries(Some(entries)).send().await;
        let call_result = match &result {
            Ok(_) => "ok",
            Err(e) if e.code().is_some_and(|c| c.contains("Throttl")) => "throttled",
            Err(_) => "unavailable",
        };
        let call = (call_result, started.elapsed());
        let deliveries = match result {
            Ok(out) => {
                let mut outcomes: HashMap<i64, Delivery> = HashMap::with_capacity(batch.len());
                for ok in out.successful() {
                    if let Ok(id) = ok.id().parse() {
                        outcomes.insert(id, Delivery::Sent);
                    }
                }
                for failed in out.failed() {
                    if let Ok(id) = failed.id().parse() {
                        outcomes.insert(id, Delivery::for_entry(EntryError::from(failed)));
                    }
                }
                batch
                    .iter()
                    .map(|e| {
                        let d = outcomes.remove(&e.outbox_id).unwrap_or_else(|| {
                            Delivery::Deferred(EntryError {
                                code: "NoResult".into(),
                                message: "SQS returned no result for this entry".into(),
                                sender_fault: false,
                            })
                        });
                        (e.outbox_id, d)
                    })
                    .collect()
            }
            Err(err) => {
                // Whatever the call's error says, it is not one event's fault:
                // a misconfiguration that fails a batch of one would fail a
                // batch of ten just the same.
                let failure = SqsFailure::from_sdk("SendMessageBatch", &err);
                batch.iter().map(|e| (e.outbox_id, Delivery::Unavailable(failure.clone()))).collect()
            }
        };
        (deliveries, call)
    }
}

/// One call's outcomes by outbox id, and the call's result and duration.
type BatchSent = (Vec<(i64, Delivery)>, (&'static str, Duration));

/// What a [`Publisher::publish`] did: each event's outcome by outbox id,
/// and each call's result and duration (for the metrics, recorded by the
/// relay's loop).
#[derive(Debug, Default)]
pub struct Published {
    pub outcomes: HashMap<i64, Delivery>,
    pub calls: Vec<(&'static str, Duration)>,
}

/// Creates the queue `name` (a FIFO queue if it ends in `.fifo`; an existing
/// one with the same attributes is returned as is) and returns its URL. For
/// `demo` and `bench`, which use queues of their own.
pub async fn create_queue(client: &aws_sdk_sqs::Client, name: &str) -> crate::Result<String> {
    let mut request = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        request = request.attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true");
    }
    let created =
        request.send().await.map_err(|e| crate::Error::Sqs(SqsFailure::from_sdk(format!("CreateQueue {name}"), &e)))?;
    created.queue_url.ok_or_else(|| {
        crate::Error::Sqs(SqsFailure {
            call: format!("CreateQueue {name}"),
            code: None,
            request_id: None,
            message: "SQS returned no queue URL".into(),
        })
    })
}

/// Splits events into batches of at most [`MAX_BATCH_ENTRIES`] entries and
/// [`MAX_BATCH_BYTES`]; an event too large on its own goes alone (and SQS
/// rejects it, which counts against that event only).
fn batches<'a>(events: &[&'a Outgoing]) -> Vec<Vec<&'a Outgoing>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, e) in events.iter().enumerate() {
        let size = e.size();
        let full = i - start == MAX_BATCH_ENTRIES || (i > start && bytes + size > MAX_BATCH_BYTES);
        if full {
            out.push(events[start..i].to_vec());
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < events.len() {
        out.push(events[start..].to_vec());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, body_len: usize) -> Outgoing {
        Outgoing {
            outbox_id: id,
            transfer_id: TransferId(id),
            event_id: id.to_string(),
            dedup_id: id.to_string(),
            event_type: EventType::TransferSucceeded,
            body: "x".repeat(body_len),
            traceparent: None,
        }
    }

    #[test]
    fn batches_hold_at_most_ten_entries_and_one_mebibyte() {
        let sizes_of = |events: &[Outgoing]| {
            let refs: Vec<&Outgoing> = events.iter().collect();
            batches(&refs).iter().map(|b| b.iter().map(|e| e.size()).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        let small: Vec<_> = (0..25).map(|i| event(i, 100)).collect();
        assert_eq!(sizes_of(&small).iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);

        let large: Vec<_> = (0..5).map(|i| event(i, 400_000)).collect();
        let b = sizes_of(&large);
        assert!(b.iter().all(|b| b.iter().sum::<usize>() <= MAX_BATCH_BYTES));
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 5);
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn characters_sqs_refuses_become_json_escapes_that_decode_to_the_same_string() {
        let original = "k\u{FFFF}\u{FFFE}-\u{1}-\u{B}-é-\u{1F600}-\u{D7FF}-\u{E000}";
        let json = serde_json::to_string(&serde_json::json!({ "key": original })).unwrap();
        assert!(!json.chars().all(allowed_in_sqs), "serde_json leaves U+FFFF as is: {json:?}");
        let safe = escape_for_sqs(&json);
        assert!(safe.chars().all(allowed_in_sqs), "{safe:?}");
        assert!(safe.contains("\\uffff") && safe.contains("\\ufffe"), "{safe}");
        let decoded: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(decoded["key"], original);
        assert!(matches!(escape_for_sqs("plain ascii"), Cow::Borrowed(_)));
    }

    #[test]
    fn per_entry_failures_are_classified_by_code_then_by_sender_fault() {
        let entry = |code: &str, sender_fault| EntryError { code: code.into(), message: String::new(), sender_fault };
        // LocalStack's answer to a body with U+FFFF: the message's fault, whatever the flag.
        assert!(matches!(Delivery::for_entry(entry("InvalidMessageContents", false)), Delivery::Rejected(_)));
        assert!(matches!(Delivery::for_entry(entry("InvalidParameterValue", true)), Delivery::Rejected(_)));
        assert!(matches!(Delivery::for_entry(entry("ThrottlingException", true)), Delivery::Deferred(_)));
        assert!(matches!(Delivery::for_entry(entry("InternalError", false)), Delivery::Deferred(_)));
        assert!(matches!(Delivery::for_entry(entry("KMS.DisabledException", true)), Delivery::Deferred(_)));
        assert!(matches!(Delivery::for_entry(entry("SomethingNew", true)), Delivery::Rejected(_)));
        assert!(matches!(Delivery::for_entry(entry("SomethingNew", false)), Delivery::Deferred(_)));
    }

    #[test]
    fn a_fifo_queue_is_recognised_from_its_url_whatever_trails_it() {
        let base = "http://127.0.0.1:4566/queue/us-east-1/000000000000/events";
        assert!(url_names_fifo_queue(&format!("{base}.fifo")));
        assert!(url_names_fifo_queue(&format!("{base}.fifo/")));
        assert!(url_names_fifo_queue(&format!("{base}.fifo?x=1")));
        assert!(url_names_fifo_queue("https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo//"));
        assert!(!url_names_fifo_queue(base));
        assert!(!url_names_fifo_queue("http://host.fifo/queue/events"));
    }
}

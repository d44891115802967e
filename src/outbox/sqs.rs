//! Publishing events to SQS with `SendMessageBatch`, and classifying every
//! failure as the event's fault (a rejection, counted) or not (an outage,
//! never counted).
//!
//! Every response is read entry by entry: `SendMessageBatch` answers HTTP 200
//! even when some entries failed, and an entry that is not listed as
//! successful was not sent.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures::StreamExt;

/// At most 10 entries per `SendMessageBatch` call.
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessageBatch.html>
pub const MAX_BATCH_ENTRIES: usize = 10;

/// The sum of all message sizes in one batch (bodies and attributes) may not
/// exceed 1 MiB, the same as one message's maximum (raised from 256 KiB in 2025).
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html>
pub const MAX_BATCH_BYTES: usize = 1_048_576;

/// The String message attribute every message carries.
pub const EVENT_TYPE_ATTRIBUTE: &str = "event_type";

/// One event ready to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// `outbox.id`, also the batch entry id.
    pub outbox_id: i64,
    pub transfer_id: i64,
    pub event_id: String,
    pub event_type: String,
    pub body: String,
}

impl Outgoing {
    /// The size SQS counts for this message: body plus attribute name, type and value.
    fn size(&self) -> usize {
        self.body.len() + EVENT_TYPE_ATTRIBUTE.len() + "String".len() + self.event_type.len()
    }
}

/// What happened to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// SQS accepted it.
    Sent,
    /// SQS rejected this entry itself (a sender fault, e.g. too large): counts
    /// as an attempt, and the event is dead after the configured maximum.
    Rejected(String),
    /// SQS could not be used (unreachable, timed out, throttled, 5xx, queue
    /// missing, credentials): never counts against the event.
    Unavailable(String),
}

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

/// Sends events to one queue.
#[derive(Clone)]
pub struct Publisher {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    fifo: bool,
    concurrency: usize,
}

impl Publisher {
    /// Builds a client from aws-config's standard chain (env, profile, ...);
    /// LocalStack is just `AWS_ENDPOINT_URL`.
    pub async fn from_env(config: &SqsConfig) -> Self {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_attempt_timeout(config.call_timeout)
            .operation_timeout(config.call_timeout)
            .build();
        let sdk_config = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            // One attempt per call: the relay owns the retry policy (with
            // backoff and without holding its claim for long).
            .retry_config(RetryConfig::standard().with_max_attempts(1))
            .load()
            .await;
        Publisher::new(aws_sdk_sqs::Client::new(&sdk_config), config)
    }

    pub fn new(client: aws_sdk_sqs::Client, config: &SqsConfig) -> Self {
        Publisher {
            client,
            fifo: config.queue_url.ends_with(".fifo"),
            queue_url: config.queue_url.clone(),
            concurrency: config.concurrency.max(1),
        }
    }

    pub fn client(&self) -> &aws_sdk_sqs::Client {
        &self.client
    }

    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    /// Sends `events` in batches of at most 10 entries and 1 MiB, several
    /// calls at once, and returns each event's outcome keyed by outbox id.
    ///
    /// The caller must not pass two events of one transfer: calls complete in
    /// any order. (The relay claims only the earliest unpublished event of
    /// each transfer.)
    pub async fn publish(&self, events: &[Outgoing]) -> HashMap<i64, Delivery> {
        // The calls are built first and then driven: a closure inside the
        // stream would make this future's `Send` unprovable for spawned tasks.
        let calls: Vec<_> = batches(events).into_iter().map(|batch| self.send_batch(batch)).collect();
        let results: Vec<Vec<(i64, Delivery)>> =
            futures::stream::iter(calls).buffer_unordered(self.concurrency).collect().await;
        results.into_iter().flatten().collect()
    }

    async fn send_batch(&self, batch: &[Outgoing]) -> Vec<(i64, Delivery)> {
        let mut entries = Vec::with_capacity(batch.len());
        for e in batch {
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(e.outbox_id.to_string())
                .message_body(&e.body)
                .message_attributes(
                    EVENT_TYPE_ATTRIBUTE,
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(&e.event_type)
                        .build()
                        .expect("data_type is set"),
                );
            if self.fifo {
                // Per-transfer order on a FIFO queue; SQS drops a resend of the
                // same event_id within its 5-minute deduplication window.
                entry = entry.message_group_id(e.transfer_id.to_string()).message_deduplication_id(&e.event_id);
            }
            entries.push(entry.build().expect("id and body are set"));
        }

        let result =
            self.client.send_message_batch().queue_url(&self.queue_url).set_entries(Some(entries)).send().await;
        match result {
            Ok(out) => {
                let mut outcomes: HashMap<i64, Delivery> = HashMap::with_capacity(batch.len());
                for ok in out.successful() {
                    if let Ok(id) = ok.id().parse() {
                        outcomes.insert(id, Delivery::Sent);
                    }
                }
                for failed in out.failed() {
                    let msg = format!("{}: {}", failed.code(), failed.message().unwrap_or(""));
                    let delivery =
                        if failed.sender_fault() { Delivery::Rejected(msg) } else { Delivery::Unavailable(msg) };
                    if let Ok(id) = failed.id().parse() {
                        outcomes.insert(id, delivery);
                    }
                }
                batch
                    .iter()
                    .map(|e| {
                        let d = outcomes
                            .remove(&e.outbox_id)
                            .unwrap_or_else(|| Delivery::Unavailable("SQS returned no result for this entry".into()));
                        (e.outbox_id, d)
                    })
                    .collect()
            }
            Err(err) => {
                let msg = format!("{}", DisplayErrorContext(&err));
                let delivery = if batch.len() == 1 && is_entry_fault(&err) {
                    Delivery::Rejected(msg)
                } else {
                    Delivery::Unavailable(msg)
                };
                batch.iter().map(|e| (e.outbox_id, delivery.clone())).collect()
            }
        }
    }
}

/// Creates the queue `name` (a FIFO queue if it ends in `.fifo`; an existing
/// one with the same attributes is returned as is) and returns its URL. For
/// `demo` and `bench`, which use queues of their own.
pub async fn create_queue(client: &aws_sdk_sqs::Client, name: &str) -> crate::Result<String> {
    let mut request = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        request = request.attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true");
    }
    let created = request
        .send()
        .await
        .map_err(|e| crate::Error::Sqs(format!("cannot create queue {name}: {}", DisplayErrorContext(&e))))?;
    created.queue_url.ok_or_else(|| crate::Error::Sqs(format!("SQS returned no URL for queue {name}")))
}

/// Whether a whole-call error is the content's fault. Only meaningful for a
/// call that carried one entry: then that entry is too large or malformed.
/// Everything else (no connection, timeouts, throttling, 5xx, missing queue,
/// credentials) is an outage.
fn is_entry_fault(err: &SdkError<SendMessageBatchError>) -> bool {
    match err.as_service_error() {
        Some(SendMessageBatchError::BatchRequestTooLong(_)) => true,
        Some(other) => matches!(
            other.code(),
            Some("InvalidMessageContents" | "InvalidParameterValue" | "InvalidAttributeValue" | "InvalidAttributeName")
        ),
        None => false,
    }
}

/// Splits events into batches of at most [`MAX_BATCH_ENTRIES`] entries and
/// [`MAX_BATCH_BYTES`]; an event too large on its own goes alone (and SQS
/// rejects it, which counts against that event only).
fn batches(events: &[Outgoing]) -> Vec<&[Outgoing]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, e) in events.iter().enumerate() {
        let size = e.size();
        let full = i - start == MAX_BATCH_ENTRIES || (i > start && bytes + size > MAX_BATCH_BYTES);
        if full {
            out.push(&events[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < events.len() {
        out.push(&events[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, body_len: usize) -> Outgoing {
        Outgoing {
            outbox_id: id,
            transfer_id: id,
            event_id: id.to_string(),
            event_type: "transfer.succeeded".into(),
            body: "x".repeat(body_len),
        }
    }

    #[test]
    fn batches_hold_at_most_ten_entries_and_one_mebibyte() {
        let small: Vec<_> = (0..25).map(|i| event(i, 100)).collect();
        let sizes: Vec<usize> = batches(&small).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![10, 10, 5]);

        let large: Vec<_> = (0..5).map(|i| event(i, 400_000)).collect();
        let b = batches(&large);
        assert!(b.iter().all(|b| b.iter().map(Outgoing::size).sum::<usize>() <= MAX_BATCH_BYTES));
        assert_eq!(b.iter().map(|b| b.len()).sum::<usize>(), 5);

        let oversize = vec![event(1, 10), event(2, 2_000_000), event(3, 10)];
        let b = batches(&oversize);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert!(batches(&[]).is_empty());
    }
}

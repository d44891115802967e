//! A publisher sends events to one destination: an SQS queue
//! (`SendMessageBatch`, see [`super::sqs`]) or an SNS topic (`PublishBatch`,
//! see [`super::sns`]), in batches of at most 10, several calls at once, in
//! the destination's body format (native or CloudEvents). Both answer entry
//! by entry, and every outcome is classified the same way (see
//! [`super::delivery`]): a per-entry failure is that event's business only,
//! and a failed call is an outage, never counted against its events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use futures::StreamExt;

use super::delivery::{Delivery, EntryError};
pub use super::message::Outgoing;
use super::message::{escape_for_sqs, BatchSent};
use super::route::{EventFormat, Target};
use super::sqs::SqsConfig;
use super::EventBody;

/// At most 10 entries per `SendMessageBatch` / `PublishBatch` call.
pub const MAX_BATCH_ENTRIES: usize = 10;

/// The default `source` of CloudEvents bodies.
pub const DEFAULT_EVENT_SOURCE: &str = "transfer-worker";

/// The client of a destination.
#[derive(Clone)]
enum Client {
    Sqs(aws_sdk_sqs::Client),
    Sns(aws_sdk_sns::Client),
}

/// Sends events to one destination.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    target: Target,
    fifo: bool,
    concurrency: usize,
    /// Calls in flight, shared by the clones of this publisher (all the
    /// sends in flight of a destination's relays).
    calls: Arc<Semaphore>,
    call_limit: usize,
    call_timeout: Duration,
    format: EventFormat,
    source: String,
}

/// What the destination said about itself at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    pub fifo: bool,
}

impl Publisher {
    /// A publisher to the SQS queue of `config`; whether it is FIFO is read
    /// from its URL until [`Publisher::check`] asks SQS.
    pub fn new(client: aws_sdk_sqs::Client, config: &SqsConfig) -> Self {
        let target = Target::SqsQueue(config.queue_url.trim_end_matches('/').to_owned());
        Self::with_client(Client::Sqs(client), target, config)
    }

    /// A publisher to `target`, on the client its kind needs.
    pub fn to(target: Target, sqs: aws_sdk_sqs::Client, sns: aws_sdk_sns::Client, config: &SqsConfig) -> Self {
        let client = match target {
            Target::SqsQueue(_) => Client::Sqs(sqs),
            Target::SnsTopic(_) => Client::Sns(sns),
        };
        Self::with_client(client, target, config)
    }

    fn with_client(client: Client, target: Target, config: &SqsConfig) -> Self {
        Publisher {
            client,
            fifo: target.names_fifo(),
            target,
            concurrency: config.concurrency.max(1),
            calls: Arc::new(Semaphore::new(config.concurrency.max(1))),
            call_limit: config.concurrency.max(1),
            call_timeout: config.call_timeout,
            format: EventFormat::Native,
            source: DEFAULT_EVENT_SOURCE.into(),
        }
    }

    /// At most `limit` calls in flight at once, for this publisher and the
    /// clones made of it from now on (default: the configured concurrency,
    /// for this publisher and all its clones). The relay's sends in flight
    /// share it, so that under a backlog they wait for a call rather than
    /// crowd the destination with more calls than it serves at its best;
    /// the events that arrive meanwhile go into fuller batches.
    pub fn with_calls_in_flight(mut self, limit: usize) -> Self {
        self.calls = Arc::new(Semaphore::new(limit.max(1)));
        self.call_limit = limit.max(1);
        self
    }

    /// Overrides what the name said about the destination being FIFO.
    pub fn with_fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }

    /// Writes bodies in `format`, CloudEvents with `source`.
    pub fn with_format(mut self, format: EventFormat, source: &str) -> Self {
        self.format = format;
        self.source = source.to_owned();
        self
    }

    /// Asks the destination whether it exists and is FIFO
    /// (`GetQueueAttributes` / `GetTopicAttributes`), and believes it over
    /// its name. An error (unreachable, missing) is returned for the caller
    /// to report; it changes nothing here.
    pub async fn check(&mut self) -> Result<QueueInfo, super::delivery::SqsFailure> {
        let fifo = match &self.client {
            Client::Sqs(c) => super::sqs::queue_is_fifo(c, self.target.key()).await?,
            Client::Sns(c) => super::sns::topic_is_fifo(c, self.target.key()).await?,
        };
        self.fifo = fifo;
        Ok(QueueInfo { fifo })
    }

    /// The SQS client, if this publishes to a queue.
    pub fn sqs_client(&self) -> Option<&aws_sdk_sqs::Client> {
        match &self.client {
            Client::Sqs(c) => Some(c),
            Client::Sns(_) => None,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The destination as the outbox records it.
    pub fn destination(&self) -> &str {
        self.target.key()
    }

    /// Calls one publish keeps in flight.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    pub fn format(&self) -> EventFormat {
        self.format
    }

    /// The longest [`Publisher::publish`] of `events` events can take, or
    /// the last of several that together send `events`: their calls go at
    /// most as many at a time as the calls in flight allow, each bounded by
    /// the call timeout.
    pub fn worst_case_duration(&self, events: usize) -> Duration {
        let calls = events.div_ceil(MAX_BATCH_ENTRIES).max(1);
        self.call_timeout * calls.div_ceil(self.concurrency.min(self.call_limit)) as u32
    }

    /// The largest message the destination takes, and the most one batch
    /// may carry.
    fn limits(&self) -> (usize, usize) {
        match self.client {
            Client::Sqs(_) => (super::sqs::MAX_MESSAGE_BYTES, super::sqs::MAX_BATCH_BYTES),
            Client::Sns(_) => (super::sns::MAX_MESSAGE_BYTES, super::sns::MAX_BATCH_BYTES),
        }
    }

    /// The message body of `event` in this destination's format, escaped
    /// for SQS (and so for SNS, which delivers to SQS): a producer's
    /// idempotency key may hold characters SQS refuses (U+FFFF, say); they go
    /// out as JSON escapes, so the consumer decodes exactly what the database
    /// holds.
    pub fn body(&self, event: &EventBody) -> String {
        let json = match self.format {
            EventFormat::Native => serde_json::to_string(event),
            EventFormat::CloudEvents => serde_json::to_string(&CloudEvent::of(event, &self.source)),
        }
        .expect("an event body always serializes");
        escape_for_sqs(&json).into_owned()
    }

    /// Sends `events` in batches of at most 10 entries and the destination's
    /// size limit, several calls at once, and returns each event's outcome
    /// keyed by outbox id.
    ///
    /// The caller must not pass two events of one transfer: calls complete in
    /// any order. (The relay claims only the earliest unpublished event of
    /// each transfer.)
    pub async fn publish(&self, events: &[Outgoing]) -> Published {
        let (max_message, max_batch) = self.limits();
        // An event larger than any message is refused here, without a call:
        // it is that event's fault, and alone it would fail the call.
        let (sendable, too_large): (Vec<&Outgoing>, Vec<&Outgoing>) =
            events.iter().partition(|e| e.size() <= max_message);
        let mut outcomes: HashMap<i64, Delivery> = too_large
            .into_iter()
            .map(|e| {
                let error = EntryError {
                    code: "MessageTooLong".into(),
                    message: format!("{} bytes, more than the destination's maximum of {max_message}", e.size()),
                    sender_fault: true,
                };
                (e.outbox_id, Delivery::Rejected(error))
            })
            .collect();
        // The calls are built first and then driven: a closure inside the
        // stream would make this future's `Send` unprovable for spawned tasks.
        let calls: Vec<_> = batches(&sendable, max_batch).into_iter().map(|batch| self.send_batch(batch)).collect();
        let results: Vec<BatchSent> = futures::stream::iter(calls).buffer_unordered(self.concurrency).collect().await;
        let mut calls = Vec::with_capacity(results.len());
        for (deliveries, call) in results {
            outcomes.extend(deliveries);
            calls.push(call);
        }
        Published { outcomes, calls }
    }

    async fn send_batch(&self, batch: Vec<&Outgoing>) -> BatchSent {
        let _call = self.calls.acquire().await.expect("the call slots are never closed");
        match &self.client {
            Client::Sqs(c) => super::sqs::send_batch(c, self.target.key(), self.fifo, batch).await,
            Client::Sns(c) => super::sns::send_batch(c, self.target.key(), self.fifo, batch).await,
        }
    }
}

/// What a [`Publisher::publish`] did: each event's outcome by outbox id,
/// and each call's result and duration (for the metrics, recorded by the
/// relay's loop).
#[derive(Debug, Default)]
pub struct Published {
    pub outcomes: HashMap<i64, Delivery>,
    pub calls: Vec<(&'static str, Duration)>,
}

/// A CloudEvents 1.0 structured JSON event: the native body is its `data`.
/// <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md>
#[derive(serde::Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'static str,
    subject: String,
    time: &'a str,
    datacontenttype: &'static str,
    data: &'a EventBody,
}

impl<'a> CloudEvent<'a> {
    fn of(event: &'a EventBody, source: &'a str) -> Self {
        CloudEvent {
            specversion: "1.0",
            id: &event.event_id,
            source,
            event_type: event.event_type.as_str(),
            subject: event.transfer_id.to_string(),
            time: &event.occurred_at,
            datacontenttype: "application/json",
            data: event,
        }
    }
}

/// Splits events into batches of at most [`MAX_BATCH_ENTRIES`] entries and
/// `max_bytes`; an event too large on its own goes alone (and the
/// destination rejects it, which counts against that event only).
fn batches<'a>(events: &[&'a Outgoing], max_bytes: usize) -> Vec<Vec<&'a Outgoing>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, e) in events.iter().enumerate() {
        let size = e.size();
        let full = i - start == MAX_BATCH_ENTRIES || (i > start && bytes + size > max_bytes);
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
    use crate::outbox::EventType;
    use crate::transfer::TransferId;

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
    fn batches_hold_at_most_ten_entries_and_the_size_limit() {
        let max = super::super::sqs::MAX_BATCH_BYTES;
        let sizes_of = |events: &[Outgoing], max: usize| {
            let refs: Vec<&Outgoing> = events.iter().collect();
            batches(&refs, max).iter().map(|b| b.iter().map(|e| e.size()).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        let small: Vec<_> = (0..25).map(|i| event(i, 100)).collect();
        assert_eq!(sizes_of(&small, max).iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);

        let large: Vec<_> = (0..5).map(|i| event(i, 400_000)).collect();
        let b = sizes_of(&large, max);
        assert!(b.iter().all(|b| b.iter().sum::<usize>() <= max));
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 5);
        let sns = sizes_of(&(0..5).map(|i| event(i, 100_000)).collect::<Vec<_>>(), super::super::sns::MAX_BATCH_BYTES);
        assert_eq!(sns.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1], "SNS: 256 KiB a batch");
        assert!(batches(&[], max).is_empty());
    }

    #[test]
    fn a_cloudevent_carries_the_native_body_as_data() {
        let event: EventBody = serde_json::from_value(serde_json::json!({
            "event_id": "0190b2a4-7d2e-7c3a-9f00-000000000001", "event_type": "refund.completed",
            "transfer_id": 42, "occurred_at": "2026-12-02T06:00:00.000000Z", "schema_version": 1,
            "data": {"from_account": 1, "to_account": 2, "amount": 500, "idempotency_key": "k", "refund_amount": 5}
        }))
        .unwrap();
        let ce = serde_json::to_value(CloudEvent::of(&event, "payments/eu")).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "0190b2a4-7d2e-7c3a-9f00-000000000001");
        assert_eq!(ce["source"], "payments/eu");
        assert_eq!(ce["type"], "refund.completed");
        assert_eq!(ce["subject"], "42");
        assert_eq!(ce["time"], "2026-12-02T06:00:00.000000Z");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["data"], serde_json::to_value(&event).unwrap());
        let (decoded, _) = crate::consumer::decode(&ce.to_string()).unwrap();
        assert_eq!(decoded, event, "the consumer reads it back");
    }
}

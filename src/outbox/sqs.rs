//! SQS: the client, what a message body may hold, and one
//! `SendMessageBatch` read entry by entry (it answers HTTP 200 even when some
//! entries failed, and an entry not listed as successful was not sent). The
//! [`Publisher`](super::publisher::Publisher) drives the calls.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};

pub use super::message::{allowed_in_sqs, escape_for_sqs, Outgoing, EVENT_TYPE_ATTRIBUTE, TRACEPARENT_ATTRIBUTE};
use super::message::{outcomes_of, BatchSent};

/// The sum of all message sizes in one batch (bodies and attributes) may not
/// exceed 1 MiB, the same as one message's maximum (raised from 256 KiB in 2025).
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html>
pub const MAX_BATCH_BYTES: usize = 1_048_576;

/// The largest message SQS accepts at all; a queue may set a lower maximum.
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html>
pub const MAX_MESSAGE_BYTES: usize = 1_048_576;

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
    /// How many `SendMessageBatch` calls one relay task keeps in flight (see
    /// [`super::publisher::Publisher::with_calls_in_flight`]).
    pub concurrency: usize,
}

/// The AWS configuration from aws-config's standard chain (env, profile,
/// ...); LocalStack is just `AWS_ENDPOINT_URL`. Every call is bounded by
/// `call_timeout` and tried once: the relay owns the retry policy.
pub async fn aws_config_from_env(call_timeout: Duration) -> aws_config::SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3).min(call_timeout))
        .operation_attempt_timeout(call_timeout)
        .operation_timeout(call_timeout)
        .build();
    aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        // The call timeouts above already bound a call that stalls; the
        // SDK's own watch over each body's throughput would add a timer and
        // its wake-ups to every call.
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .load()
        .await
}

/// An SQS client from [`aws_config_from_env`].
pub async fn client_from_env(call_timeout: Duration) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&aws_config_from_env(call_timeout).await)
}

/// Whether a queue URL names a FIFO queue: its last path segment ends in
/// `.fifo` (a trailing `/`, a query string or a fragment do not hide it).
pub fn url_names_fifo_queue(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.trim_end_matches('/').rsplit('/').next().is_some_and(|name| name.ends_with(".fifo"))
}

/// Whether the queue exists and is FIFO (`GetQueueAttributes`).
pub(super) async fn queue_is_fifo(client: &aws_sdk_sqs::Client, url: &str) -> Result<bool, SqsFailure> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::FifoQueue)
        .send()
        .await
        .map_err(|e| SqsFailure::from_sdk(format!("GetQueueAttributes on {url}"), &e))?;
    Ok(out.attributes().and_then(|a| a.get(&QueueAttributeName::FifoQueue)).is_some_and(|v| v == "true"))
}

/// One `SendMessageBatch`: each entry's outcome, and how the call ended.
pub(super) async fn send_batch(
    client: &aws_sdk_sqs::Client,
    url: &str,
    fifo: bool,
    batch: Vec<&Outgoing>,
) -> BatchSent {
    let attribute = |value: &str| {
        MessageAttributeValue::builder().data_type("String").string_value(value).build().expect("data_type is set")
    };
    let mut entries = Vec::with_capacity(batch.len());
    for e in &batch {
        let mut entry = SendMessageBatchRequestEntry::builder()
            .id(e.outbox_id.to_string())
            .message_body(&e.body)
            .message_attributes(EVENT_TYPE_ATTRIBUTE, attribute(e.event_type.as_str()));
        if let Some(tp) = &e.traceparent {
            entry = entry.message_attributes(TRACEPARENT_ATTRIBUTE, attribute(&escape_for_sqs(tp)));
        }
        if fifo {
            // Per-transfer order on a FIFO queue; SQS drops a resend of the
            // same deduplication id within its 5-minute window.
            entry = entry.message_group_id(e.transfer_id.to_string()).message_deduplication_id(&e.dedup_id);
        }
        entries.push(entry.build().expect("id and body are set"));
    }
    let started = std::time::Instant::now();
    let result = client.send_message_batch().queue_url(url).set_entries(Some(entries)).send().await;
    let call_result = match &result {
        Ok(_) => "ok",
        Err(e) if e.code().is_some_and(|c| c.contains("Throttl")) => "throttled",
        Err(_) => "unavailable",
    };
    let call = (call_result, started.elapsed());
    let deliveries = match result {
        Ok(out) => outcomes_of(
            &batch,
            out.successful().iter().filter_map(|ok| ok.id().parse().ok()),
            out.failed().iter().filter_map(|f| Some((f.id().parse().ok()?, EntryError::from(f)))),
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(escape_for_sqs("plain ascii"), std::borrow::Cow::Borrowed(_)));
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

//! SNS: one `PublishBatch` read entry by entry, like SQS's
//! `SendMessageBatch` (HTTP 200 with per-entry failures), with the same
//! `event_type` (and `traceparent`) message attributes, so subscriptions can
//! filter on the type, and on a FIFO topic the same group (the transfer id)
//! and deduplication ids as a FIFO queue.

use aws_sdk_sns::error::ProvideErrorMetadata;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};

use super::delivery::{Delivery, EntryError, SqsFailure};
use super::message::{escape_for_sqs, outcomes_of, BatchSent, Outgoing, EVENT_TYPE_ATTRIBUTE, TRACEPARENT_ATTRIBUTE};

/// The largest message SNS takes, and the most one `PublishBatch` may carry.
/// <https://docs.aws.amazon.com/sns/latest/api/API_PublishBatch.html>
pub const MAX_MESSAGE_BYTES: usize = 262_144;
pub const MAX_BATCH_BYTES: usize = 262_144;

/// An SNS client from [`super::sqs::aws_config_from_env`].
pub async fn client_from_env(call_timeout: std::time::Duration) -> aws_sdk_sns::Client {
    aws_sdk_sns::Client::new(&super::sqs::aws_config_from_env(call_timeout).await)
}

/// Whether the topic exists and is FIFO (`GetTopicAttributes`).
pub(super) async fn topic_is_fifo(client: &aws_sdk_sns::Client, arn: &str) -> Result<bool, SqsFailure> {
    let out = client
        .get_topic_attributes()
        .topic_arn(arn)
        .send()
        .await
        .map_err(|e| SqsFailure::from_sdk(format!("GetTopicAttributes on {arn}"), &e))?;
    Ok(out.attributes().and_then(|a| a.get("FifoTopic")).is_some_and(|v| v == "true"))
}

/// One `PublishBatch`: each entry's outcome, and how the call ended.
pub(super) async fn send_batch(
    client: &aws_sdk_sns::Client,
    arn: &str,
    fifo: bool,
    batch: Vec<&Outgoing>,
) -> BatchSent {
    let attribute = |value: &str| {
        MessageAttributeValue::builder().data_type("String").string_value(value).build().expect("data_type is set")
    };
    let mut entries = Vec::with_capacity(batch.len());
    for e in &batch {
        let mut entry = PublishBatchRequestEntry::builder()
            .id(e.outbox_id.to_string())
            .message(&e.body)
            .message_attributes(EVENT_TYPE_ATTRIBUTE, attribute(e.event_type.as_str()));
        if let Some(tp) = &e.traceparent {
            entry = entry.message_attributes(TRACEPARENT_ATTRIBUTE, attribute(&escape_for_sqs(tp)));
        }
        if fifo {
            entry = entry.message_group_id(e.transfer_id.to_string()).message_deduplication_id(&e.dedup_id);
        }
        entries.push(entry.build().expect("id and message are set"));
    }
    let started = std::time::Instant::now();
    let result = client.publish_batch().topic_arn(arn).set_publish_batch_request_entries(Some(entries)).send().await;
    let call_result = match &result {
        Ok(_) => "ok",
        Err(e) if e.code().is_some_and(|c| c.contains("Throttl")) => "throttled",
        Err(_) => "unavailable",
    };
    let call = (call_result, started.elapsed());
    let deliveries = match result {
        Ok(out) => outcomes_of(
            &batch,
            out.successful().iter().filter_map(|ok| ok.id()?.parse().ok()),
            out.failed().iter().filter_map(|f| {
                let error = EntryError {
                    code: f.code().to_owned(),
                    message: f.message().unwrap_or_default().to_owned(),
                    sender_fault: f.sender_fault(),
                };
                Some((f.id().parse().ok()?, error))
            }),
        ),
        Err(err) => {
            let failure = SqsFailure::from_sdk("PublishBatch", &err);
            batch.iter().map(|e| (e.outbox_id, Delivery::Unavailable(failure.clone()))).collect()
        }
    };
    (deliveries, call)
}

/// Creates the topic `name` (a FIFO topic if it ends in `.fifo`) and returns
/// its ARN. For tests, `demo` and `bench`.
pub async fn create_topic(client: &aws_sdk_sns::Client, name: &str) -> crate::Result<String> {
    let mut request = client.create_topic().name(name);
    if name.ends_with(".fifo") {
        request = request.attributes("FifoTopic", "true");
    }
    let created =
        request.send().await.map_err(|e| crate::Error::Sqs(SqsFailure::from_sdk(format!("CreateTopic {name}"), &e)))?;
    created.topic_arn.ok_or_else(|| {
        crate::Error::Sqs(SqsFailure {
            call: format!("CreateTopic {name}"),
            code: None,
            request_id: None,
            message: "SNS returned no topic ARN".into(),
        })
    })
}

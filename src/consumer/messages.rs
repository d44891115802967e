//! What the consumer says back to SQS about a message: keep it invisible
//! while its handler runs, make it visible again after a backoff, delete it
//! once its effects committed.

use std::time::Duration;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message};

use super::{Consumer, MAX_RECEIVE, MAX_VISIBILITY};
use crate::outbox::delivery::SqsFailure;

impl Consumer {
    /// Extends the message's visibility every third of the timeout, forever
    /// (the caller drops it when the handler is done).
    pub(super) async fn keep_invisible(&self, m: &Message) {
        let every = (self.config.visibility_timeout / 3).max(Duration::from_millis(500));
        loop {
            tokio::time::sleep(every).await;
            self.set_visibility(m, self.config.visibility_timeout).await;
        }
    }

    pub(super) async fn set_visibility(&self, m: &Message, visible_in: Duration) {
        let Some(receipt) = m.receipt_handle() else { return };
        let r = self
            .client
            .change_message_visibility()
            .queue_url(&self.config.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(visible_in.min(MAX_VISIBILITY).as_secs() as i32)
            .send()
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %SqsFailure::from_sdk("ChangeMessageVisibility", &e), "could not change a message's visibility");
        }
    }

    /// Deletes handled messages without holding up the next receive: the
    /// deletes run on a task of their own (at most [`DELETES_IN_FLIGHT`] at
    /// once; beyond that the pass waits for a slot). Everything deleted has
    /// committed; a delete that never happens (a crash, a failure) only means
    /// a redelivery, which the inbox drops.
    pub(super) async fn delete_in_background(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let Ok(slot) = self.deletes.clone().acquire_owned().await else { return };
        let (client, url) = (self.client.clone(), self.config.queue_url.clone());
        tokio::spawn(async move {
            delete(&client, &url, &messages).await;
            drop(slot);
        });
    }

    /// Waits until every delete started so far is done (tests, shutdown).
    pub async fn deletes_done(&self) {
        let _all = self.deletes.acquire_many(DELETES_IN_FLIGHT as u32).await;
    }
}

/// Delete calls a consumer keeps in flight.
pub const DELETES_IN_FLIGHT: usize = 8;

/// Deletes handled messages, 10 per call.
async fn delete(client: &aws_sdk_sqs::Client, queue_url: &str, messages: &[Message]) {
    for chunk in messages.chunks(MAX_RECEIVE as usize) {
        let entries = delete_entries(chunk);
        if entries.is_empty() {
            continue;
        }
        let r = client.delete_message_batch().queue_url(queue_url).set_entries(Some(entries)).send().await;
        match r {
            Ok(out) if !out.failed().is_empty() => {
                tracing::warn!(
                    failed = out.failed().len(),
                    "some deletes failed; those messages come back and are dropped as duplicates"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %SqsFailure::from_sdk("DeleteMessageBatch", &e), "deletes failed; those messages come back and are dropped as duplicates")
            }
        }
    }
}

/// The `DeleteMessageBatch` entries of up to 10 received messages.
pub fn delete_entries(messages: &[Message]) -> Vec<DeleteMessageBatchRequestEntry> {
    messages
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(m.receipt_handle()?).build().ok()
        })
        .collect()
}

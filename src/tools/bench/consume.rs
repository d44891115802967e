//! `bench --mode consume`: the consumer's rate against SQS's own, same run,
//! same queue kind, same batch size (10) and as many receive loops:
//!
//! 1. **bar**: N messages are put on a scratch queue, then loops of
//!    `ReceiveMessage(10)` + `DeleteMessageBatch` (the consumer's own receive
//!    request) until all N are gone: SQS's own receive + delete rate, with
//!    nothing else done, at K and 2K loops, before and after the consumer;
//!    the fastest is the bar;
//! 2. **consumer**: N other messages (events with fresh ids), then 2K receive
//!    loops of the consumer library (`consume`'s default handler: the inbox
//!    row is the effect, a batch lands in one statement, deletes after the
//!    commit) until all N landed.
//!
//! Bodies are real events of the relay's size. The ratio is the figure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageSystemAttributeName, SendMessageBatchRequestEntry};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::sqs::ScratchQueue;
use transfer_worker::account::AccountId;
use transfer_worker::consumer::{inbox, Consumer, ConsumerConfig, Record};
use transfer_worker::error::{Error, Result};
use transfer_worker::outbox::{EventBody, EventData, EventType, SCHEMA_VERSION};
use transfer_worker::service::Service;
use transfer_worker::transfer::TransferId;

#[derive(Debug, Clone, Serialize)]
pub struct ConsumeReport {
    /// Events landed (inbox committed, message deleted) per second.
    pub consumed_per_s: f64,
    /// SQS alone: messages received and deleted per second, the best of
    /// `bar_runs_per_s`.
    pub sqs_receive_delete_per_s: f64,
    pub consume_ratio: f64,
    /// Every bar run: K and 2K loops before the consumer, then again after.
    pub bar_runs_per_s: Vec<f64>,
    /// Receive loops the consumer ran (2K).
    pub consumer_loops: usize,
    /// The process's CPU while the consumer ran, per 1,000 events.
    pub consumer_cpu_ms_per_1000: f64,
}

fn body(n: usize) -> String {
    let event = EventBody {
        event_id: uuid::Uuid::now_v7().to_string(),
        event_type: EventType::TransferSucceeded,
        transfer_id: TransferId(n as i64 + 1),
        occurred_at: "2026-12-02T00:00:00.000000Z".into(),
        schema_version: SCHEMA_VERSION,
        data: EventData {
            from_account: AccountId(1 + n as i64 % 1000),
            to_account: AccountId(1 + (n as i64 + 1) % 1000),
            amount: 1 + n as i64 % 1000,
            idempotency_key: format!("bench-consume-{n:012}"),
            reason: None,
            refund_amount: None,
        },
    };
    serde_json::to_string(&event).expect("an event serializes")
}

async fn fill(queue: &ScratchQueue, n: usize) -> Result<()> {
    let fifo = queue.url.ends_with(".fifo");
    let calls: Vec<_> = (0..n)
        .collect::<Vec<_>>()
        .chunks(10)
        .map(|chunk| {
            let entries: Vec<_> = chunk
                .iter()
                .map(|i| {
                    let entry = SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(body(*i));
                    let entry = if fifo {
                        // One group per transfer, as the relay sends them.
                        entry
                            .message_group_id((i + 1).to_string())
                            .message_deduplication_id(format!("{i}-{}", rand::random::<u64>()))
                    } else {
                        entry
                    };
                    entry.build()
                })
                .collect::<std::result::Result<_, _>>()
                .expect("id and body are set");
            queue.client().send_message_batch().queue_url(&queue.url).set_entries(Some(entries)).send()
        })
        .collect();
    let results: Vec<_> =
        futures::StreamExt::collect(futures::StreamExt::buffer_unordered(futures::stream::iter(calls), 16)).await;
    for r in results {
        r.map_err(|e| Error::Failed(format!("filling the bench queue: {e}")))?;
    }
    Ok(())
}

/// SQS alone: `loops` loops receive 10 and delete them until `n` are gone.
async fn receive_delete_rate(queue: &ScratchQueue, n: usize, loops: usize) -> Result<f64> {
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (client, url, done) = (queue.client().clone(), queue.url.clone(), done.clone());
            tokio::spawn(async move {
                while done.load(Ordering::Relaxed) < n {
                    let out = client
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(1)
                        // The consumer's own request, attribute for attribute.
                        .visibility_timeout(30)
                        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                        .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                        .message_attribute_names("All")
                        .send()
                        .await
                        .map_err(|e| Error::Failed(format!("receive: {e}")))?;
                    let messages = out.messages.unwrap_or_default();
                    if messages.is_empty() {
                        continue;
                    }
                    let entries = transfer_worker::consumer::delete_entries(&messages);
                    client
                        .delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map_err(|e| Error::Failed(format!("delete: {e}")))?;
                    done.fetch_add(messages.len(), Ordering::Relaxed);
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| Error::Failed(format!("bench receiver: {e}")))??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The consumer library: `loops` receive loops until `n` events landed.
async fn consumer_rate(pool: &PgPool, queue: &ScratchQueue, n: usize, loops: usize) -> Result<f64> {
    inbox::ensure_table(pool).await?;
    let mut config = ConsumerConfig::new("bench", queue.url.clone());
    config.wait = Duration::from_secs(1);
    let stop = CancellationToken::new();
    let consumer = Arc::new(
        Consumer::new(pool.clone(), queue.client().clone(), config, Arc::new(Record)).stopping_on(stop.clone()),
    );
    let landed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (consumer, landed) = (consumer.clone(), landed.clone());
            tokio::spawn(async move {
                while landed.load(Ordering::Relaxed) < n {
                    let c = consumer.run_once().await?;
                    landed.fetch_add(c.landed, Ordering::Relaxed);
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| Error::Failed(format!("bench consumer: {e}")))??;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    Ok(rate)
}

pub async fn measure(pool: &PgPool, messages: usize, loops: usize, fifo: bool) -> Result<ConsumeReport> {
    let queue = ScratchQueue::create(fifo, 10).await?;
    let result = async {
        // The bar at its best: K and 2K loops, before and after the consumer
        // (against drift while it runs), the fastest counted. The consumer
        // runs 2K receive loops: each of its loops spends part of a cycle in
        // the database, where SQS's loop only calls SQS.
        let mut bars = Vec::new();
        for n in [loops, 2 * loops] {
            fill(&queue, messages).await?;
            bars.push(receive_delete_rate(&queue, messages, n).await?);
        }
        fill(&queue, messages).await?;
        let c0 = super::cpu::process_ms();
        let started = Instant::now();
        let consumed = consumer_rate(pool, &queue, messages, 2 * loops).await?;
        let cpu_ms = super::cpu::process_ms() - c0;
        let _ = started;
        for n in [loops, 2 * loops] {
            fill(&queue, messages).await?;
            bars.push(receive_delete_rate(&queue, messages, n).await?);
        }
        let bar = bars.iter().copied().fold(0.0, f64::max);
        Ok(ConsumeReport {
            consumed_per_s: consumed,
            sqs_receive_delete_per_s: bar,
            consume_ratio: consumed / bar,
            bar_runs_per_s: bars,
            consumer_loops: 2 * loops,
            consumer_cpu_ms_per_1000: cpu_ms / messages as f64 * 1_000.0,
        })
    }
    .await;
    queue.delete().await;
    result
}

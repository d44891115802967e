//! `bench --mode consume`: the consumer's rate against SQS's own, same run,
//! same queue kind, same batch size (10) and as many receive loops.
//!
//! Five rounds; each runs, at K loops and then at 2K:
//!
//! 1. **SQS alone**: N messages are put on a scratch queue, then loops of
//!    `ReceiveMessage(10)` + `DeleteMessageBatch` (the consumer's own receive
//!    request) until all N are deleted: SQS's own receive + delete rate with
//!    nothing else done;
//! 2. **the consumer**: N other messages (events with fresh ids), then as
//!    many receive loops of the consumer library (`consume`'s default
//!    handler: the inbox row is the effect, a batch lands in one statement,
//!    deletes after the commit) until all N landed *and* were deleted.
//!
//! The round's ratio is the consumer's faster run over SQS's faster run.
//!
//! Each run is timed from its first receive to its N-th message done (the
//! bar's last delete; the consumer's last delete after its commit), not to
//! the end of the long polls (1 s) still waiting on the empty queue. The two
//! sides alternate, seconds apart, so that LocalStack's drift (its rate
//! swings by half from one run to the next on these shared cores, and it
//! slows as it ages) falls on both; the figure is the median round. Bodies are real events of the
//! relay's size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Events landed (inbox committed, message deleted) per second: the
    /// median round's.
    pub consumed_per_s: f64,
    /// SQS alone: messages received and deleted per second, the median of
    /// the rounds' faster runs.
    pub sqs_receive_delete_per_s: f64,
    /// The median of the rounds' ratios.
    pub consume_ratio: f64,
    /// Every round, in the order run.
    pub rounds: Vec<Round>,
    /// Receive loops of the two runs of each side (K and 2K).
    pub loops: [usize; 2],
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

/// When the N-th message of a run is done, and a token that stops the
/// run's loops from then on (after the long poll each is in).
#[derive(Clone)]
struct Finish {
    n: usize,
    done: Arc<AtomicUsize>,
    at: Arc<Mutex<Option<Instant>>>,
    stop: CancellationToken,
}

impl Finish {
    fn new(n: usize) -> Finish {
        Finish { n, done: Arc::default(), at: Arc::default(), stop: CancellationToken::new() }
    }

    /// Counts `k` more done; true for the call that completes the run.
    fn add(&self, k: usize) -> bool {
        let before = self.done.fetch_add(k, Ordering::Relaxed);
        before < self.n && before + k >= self.n
    }

    fn finished_now(&self) {
        *self.at.lock().expect("finish time") = Some(Instant::now());
        self.stop.cancel();
    }

    fn rate(&self, started: Instant) -> Result<f64> {
        let at =
            self.at.lock().expect("finish time").ok_or_else(|| Error::Failed("bench: a run did not finish".into()))?;
        Ok(self.n as f64 / at.duration_since(started).as_secs_f64())
    }
}

/// SQS alone: `loops` loops receive 10 and delete them until `n` are gone.
async fn receive_delete_rate(queue: &ScratchQueue, n: usize, loops: usize) -> Result<f64> {
    let finish = Finish::new(n);
    let started = Instant::now();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (client, url, finish) = (queue.client().clone(), queue.url.clone(), finish.clone());
            tokio::spawn(async move {
                while !finish.stop.is_cancelled() {
                    let receive = client
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(1)
                        // The consumer's own request, attribute for attribute.
                        .visibility_timeout(30)
                        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                        .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                        .message_attribute_names("All")
                        .send();
                    // Not cut short at the end: a long poll dropped by its
                    // client still takes messages that arrive while it waits
                    // (the next run's), hiding them for the visibility timeout.
                    let out = receive.await.map_err(|e| Error::Failed(format!("receive: {e}")))?;
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
                    if finish.add(messages.len()) {
                        finish.finished_now();
                    }
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| Error::Failed(format!("bench receiver: {e}")))??;
    }
    finish.rate(started)
}

/// The consumer library: `loops` receive loops until `n` events landed and
/// their messages were deleted.
async fn consumer_rate(pool: &PgPool, queue: &ScratchQueue, n: usize, loops: usize) -> Result<f64> {
    inbox::ensure_table(pool).await?;
    let mut config = ConsumerConfig::new("bench", queue.url.clone());
    config.wait = Duration::from_secs(1);
    let finish = Finish::new(n);
    let all_landed = Arc::new(tokio::sync::Notify::new());
    let on_landed = {
        let (finish, all_landed) = (finish.clone(), all_landed.clone());
        Box::new(move |_: &transfer_worker::consumer::Delivered| {
            if finish.add(1) {
                all_landed.notify_one();
            }
        })
    };
    let consumer = Arc::new(
        Consumer::new(pool.clone(), queue.client().clone(), config, Arc::new(Record))
            // Its polls are not cut short either (see receive_delete_rate).
            .on_landed(on_landed),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (consumer, stop) = (consumer.clone(), finish.stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    consumer.run_once().await?;
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    // Done when the last landed event's message is deleted too.
    if tokio::time::timeout(Duration::from_secs(300), all_landed.notified()).await.is_err() {
        finish.stop.cancel();
        return Err(Error::Failed(format!(
            "bench: the consumer landed {} of {n} events in 300 s",
            finish.done.load(Ordering::Relaxed)
        )));
    }
    consumer.deletes_done().await;
    finish.finished_now();
    for t in tasks {
        t.await.map_err(|e| Error::Failed(format!("bench consumer: {e}")))??;
    }
    finish.rate(started)
}

/// One round: SQS alone and the consumer, each at K and at 2K loops,
/// alternating; each side's faster run counts.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// SQS alone at K and 2K loops.
    pub bar_per_s: [f64; 2],
    /// The consumer at K and 2K loops.
    pub consumed_per_s: [f64; 2],
    /// The consumer's faster run over SQS's faster run.
    pub ratio: f64,
}

/// Rounds run (see the module docs).
const ROUNDS: usize = 5;

pub async fn measure(pool: &PgPool, messages: usize, loops: usize, fifo: bool) -> Result<ConsumeReport> {
    let queue = ScratchQueue::create(fifo, 10).await?;
    let result = async {
        let mut rounds = Vec::new();
        let mut cpu_ms = 0.0;
        for _ in 0..ROUNDS {
            let (mut bar, mut consumed) = ([0.0; 2], [0.0; 2]);
            for (i, n) in [loops, 2 * loops].into_iter().enumerate() {
                fill(&queue, messages).await?;
                bar[i] = receive_delete_rate(&queue, messages, n).await?;
                fill(&queue, messages).await?;
                let c0 = super::cpu::process_ms();
                consumed[i] = consumer_rate(pool, &queue, messages, n).await?;
                cpu_ms += super::cpu::process_ms() - c0;
            }
            let ratio = consumed[0].max(consumed[1]) / bar[0].max(bar[1]);
            rounds.push(Round { bar_per_s: bar, consumed_per_s: consumed, ratio });
        }
        let median = |f: &dyn Fn(&Round) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Ok(ConsumeReport {
            consumed_per_s: median(&|r| r.consumed_per_s[0].max(r.consumed_per_s[1])),
            sqs_receive_delete_per_s: median(&|r| r.bar_per_s[0].max(r.bar_per_s[1])),
            consume_ratio: median(&|r| r.ratio),
            loops: [loops, 2 * loops],
            consumer_cpu_ms_per_1000: cpu_ms / (2 * ROUNDS * messages) as f64 * 1_000.0,
            rounds,
        })
    }
    .await;
    queue.delete().await;
    result
}

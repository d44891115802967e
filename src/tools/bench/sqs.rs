//! The benchmark's SQS side: a scratch queue, a real consumer that stamps
//! every message when it is received, and SQS's own figures (its
//! `SendMessageBatch` rate, its send -> receive latency) measured with the same
//! client, to hold the relay against.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use tokio::task::JoinSet;

use crate::tools::bench::cpu::ThreadCpu;

use transfer_worker::error::{Error, Result};
use transfer_worker::outbox::publisher::Publisher;
use transfer_worker::outbox::sqs::{
    client_from_env, create_queue, SqsConfig, SqsFailure, DEFAULT_CONCURRENCY, EVENT_TYPE_ATTRIBUTE,
};
use transfer_worker::outbox::EventBody;

/// Receive calls in flight at once (each takes up to 10 messages).
const CONSUMERS: usize = 6;

/// A queue of the benchmark's own, deleted afterwards.
pub struct ScratchQueue {
    pub publisher: Publisher,
    pub url: String,
}

impl ScratchQueue {
    pub async fn create(fifo: bool, concurrency: usize) -> Result<ScratchQueue> {
        let client = client_from_env(Duration::from_secs(10)).await;
        let suffix = if fifo { ".fifo" } else { "" };
        let name = format!("transfer-worker-bench-{}-{:08x}{suffix}", std::process::id(), rand::random::<u32>());
        let url = create_queue(&client, &name).await?;
        let config = SqsConfig { queue_url: url.clone(), call_timeout: Duration::from_secs(10), concurrency };
        Ok(ScratchQueue { publisher: Publisher::new(client, &config), url })
    }

    pub fn client(&self) -> &aws_sdk_sqs::Client {
        self.publisher.sqs_client().expect("a scratch queue is an SQS queue")
    }

    pub async fn delete(self) {
        let _ = self.client().delete_queue().queue_url(&self.url).send().await;
    }
}

/// A message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub body: String,
    pub at: SystemTime,
}

/// A real consumer: several long polls in flight, each message stamped when
/// its `ReceiveMessage` answered, then deleted in a batch (off the receive
/// path, as a consumer that acks asynchronously would).
pub struct Consumer {
    received: Arc<Mutex<Vec<Receipt>>>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Consumer {
    pub fn start(queue: &ScratchQueue) -> Consumer {
        let received = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for _ in 0..CONSUMERS {
            let (client, url) = (queue.client().clone(), queue.url.clone());
            let (received, count, stop) = (received.clone(), count.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let out = client
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(1)
                        .send()
                        .await;
                    let at = SystemTime::now();
                    let Ok(out) = out else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let mut deletes = Vec::new();
                    {
                        let mut r = received.lock().expect("receipts");
                        for (i, m) in out.messages().iter().enumerate() {
                            r.push(Receipt { body: m.body().unwrap_or_default().to_owned(), at });
                            if let Some(h) = m.receipt_handle() {
                                deletes.push(
                                    DeleteMessageBatchRequestEntry::builder()
                                        .id(i.to_string())
                                        .receipt_handle(h)
                                        .build()
                                        .expect("id and handle are set"),
                                );
                            }
                        }
                    }
                    count.fetch_add(out.messages().len() as u64, Ordering::Relaxed);
                    if !deletes.is_empty() {
                        let (client, url) = (client.clone(), url.clone());
                        tokio::spawn(async move {
                            let _ =
                                client.delete_message_batch().queue_url(url).set_entries(Some(deletes)).send().await;
                        });
                    }
                }
            });
        }
        Consumer { received, count, stop, tasks }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `expected` messages arrived or `timeout` passed.
    pub async fn wait_for(&self, expected: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count() < expected {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops and returns every receipt.
    pub async fn stop(mut self) -> Vec<Receipt> {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        std::mem::take(&mut *self.received.lock().expect("receipts"))
    }
}

/// Receipts of event bodies, keyed by transfer id (the first event of each).
pub fn first_receipt_per_transfer(receipts: &[Receipt]) -> HashMap<i64, SystemTime> {
    let mut out: HashMap<i64, SystemTime> = HashMap::new();
    for r in receipts {
        if let Ok(body) = serde_json::from_str::<EventBody>(&r.body) {
            let at = out.entry(body.transfer_id.0).or_insert(r.at);
            if r.at < *at {
                *at = r.at;
            }
        }
    }
    out
}

/// SQS alone: `rate` messages a second for `seconds`, received by the same
/// kind of consumer; with `batch` 1, a `SendMessage` each at its due time,
/// otherwise a `SendMessageBatch` of `batch` when its last message is due
/// (from several tasks). Returns each message's send -> receive latency in
/// ms, and the rate SQS took them at (below `rate` when SQS itself cannot
/// keep up: then the floor is a queue, not a latency). This is the floor no
/// relay can beat (with batches: the floor of a relay that batches).
///
/// The senders run on a runtime of their own (two threads, as the worker's
/// in steady mode) with a client of their own made as `run` makes its own,
/// so that their CPU is counted apart: what the SDK alone costs per message
/// sent this way (`Floor::sender_cpu_ms_per_1000`).
pub async fn floor_latency(fifo: bool, rate: f64, seconds: f64, batch: usize) -> Result<Floor> {
    let queue = ScratchQueue::create(fifo, DEFAULT_CONCURRENCY).await?;
    let consumer = Consumer::start(&queue);
    let cpu = ThreadCpu::default();
    let runtime = cpu.runtime("bench-floor").map_err(|e| Error::Failed(format!("the floor's runtime: {e}")))?;
    let client = client_from_env(Duration::from_secs(10)).await;
    let total = (rate * seconds).round() as u64;
    let batch = batch.clamp(1, 10) as u64;
    let sent: Arc<Mutex<HashMap<u64, SystemTime>>> = Arc::new(Mutex::new(HashMap::new()));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let cpu_before = cpu.ms();
    let mut senders = JoinSet::new();
    for _ in 0..16 {
        let (client, url, sent, next) = (client.clone(), queue.url.clone(), sent.clone(), next.clone());
        senders.spawn_on(
            async move {
                loop {
                    let first = next.fetch_add(1, Ordering::Relaxed) * batch;
                    if first >= total {
                        return;
                    }
                    let ids = first..(first + batch).min(total);
                    let last = ids.end - 1;
                    tokio::time::sleep_until((started + Duration::from_secs_f64(last as f64 / rate)).into()).await;
                    let at = SystemTime::now();
                    let ok = if batch == 1 {
                        let mut req = client
                            .send_message()
                            .queue_url(&url)
                            .message_body(floor_body(first))
                            .message_attributes(EVENT_TYPE_ATTRIBUTE, event_type_attribute());
                        if fifo {
                            req = req.message_group_id(first.to_string()).message_deduplication_id(first.to_string());
                        }
                        req.send().await.is_ok()
                    } else {
                        let entries = ids
                            .clone()
                            .map(|i| {
                                let mut entry = SendMessageBatchRequestEntry::builder()
                                    .id(i.to_string())
                                    .message_body(floor_body(i))
                                    .message_attributes(EVENT_TYPE_ATTRIBUTE, event_type_attribute());
                                if fifo {
                                    entry =
                                        entry.message_group_id(i.to_string()).message_deduplication_id(i.to_string());
                                }
                                entry.build().expect("id and body are set")
                            })
                            .collect();
                        client.send_message_batch().queue_url(&url).set_entries(Some(entries)).send().await.is_ok()
                    };
                    if ok {
                        sent.lock().expect("sent").extend(ids.map(|i| (i, at)));
                    }
                }
            },
            runtime.handle(),
        );
    }
    while senders.join_next().await.is_some() {}
    let sender_cpu_ms = cpu.ms() - cpu_before;
    drop(client);
    runtime.shutdown_background();
    let sent_count = sent.lock().expect("sent").len() as u64;
    let sent_per_s = sent_count as f64 / started.elapsed().as_secs_f64();
    consumer.wait_for(sent_count, Duration::from_secs(30)).await;
    let receipts = consumer.stop().await;
    queue.delete().await;
    let sent = sent.lock().expect("sent");
    let mut first: HashMap<u64, SystemTime> = HashMap::new();
    for r in &receipts {
        let Some(i) = serde_json::from_str::<serde_json::Value>(&r.body).ok().and_then(|v| v["i"].as_u64()) else {
            continue;
        };
        first.entry(i).and_modify(|t| *t = (*t).min(r.at)).or_insert(r.at);
    }
    Ok(Floor {
        latencies: first.iter().filter_map(|(i, at)| sent.get(i).map(|s| ms_between(*s, *at))).collect(),
        sent_per_s,
        sender_cpu_ms_per_1000: sender_cpu_ms / (sent_count.max(1) as f64) * 1_000.0,
    })
}

/// What [`floor_latency`] measured.
pub struct Floor {
    /// Each message's send -> receive latency, ms.
    pub latencies: Vec<f64>,
    /// The rate SQS took the sends at.
    pub sent_per_s: f64,
    /// The senders' CPU per 1,000 messages sent (their own threads).
    pub sender_cpu_ms_per_1000: f64,
}

/// SQS alone: how many messages per second `SendMessageBatch` of 10 takes,
/// from `clients` concurrent callers with the relay's client, bodies of
/// `body_len` bytes. The bar for the relay's own rate.
pub async fn batch_send_rate(fifo: bool, messages: usize, clients: usize, body_len: usize) -> Result<f64> {
    let queue = ScratchQueue::create(fifo, clients).await?;
    let body = "x".repeat(body_len);
    let batches = messages.div_ceil(10);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let (client, url, next, body) = (queue.client().clone(), queue.url.clone(), next.clone(), body.clone());
        tasks.spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed) as usize;
                if b >= batches {
                    return Ok::<(), Error>(());
                }
                let entries: Vec<_> = (0..10)
                    .map(|e| {
                        let id = format!("{b}-{e}");
                        // The relay's message shape: a body of an event's length
                        // and the `event_type` attribute every event carries.
                        let mut entry = SendMessageBatchRequestEntry::builder()
                            .id(e.to_string())
                            .message_body(&body)
                            .message_attributes(EVENT_TYPE_ATTRIBUTE, event_type_attribute());
                        if fifo {
                            entry = entry.message_group_id(&id).message_deduplication_id(&id);
                        }
                        entry.build().expect("id and body are set")
                    })
                    .collect();
                client
                    .send_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| Error::Sqs(SqsFailure::from_sdk("SendMessageBatch", &e)))?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| Error::Failed(format!("SQS rate task failed: {e}")))??;
    }
    let rate = (batches * 10) as f64 / started.elapsed().as_secs_f64();
    let _ = queue.client().purge_queue().queue_url(&queue.url).send().await;
    queue.delete().await;
    Ok(rate)
}

/// A body and attribute of an event's size and shape, so SQS does the same
/// work per message as for the relay's; `i` says which message it is.
fn floor_body(i: u64) -> String {
    format!(
        "{{\"i\":{i},\"event_id\":\"0195e0a4-7c1f-7000-8000-{i:012}\",\"event_type\":\"transfer.succeeded\",\"transfer_id\":{i},\"occurred_at\":\"2026-12-01T00:00:00.000000Z\",\"data\":{{\"from_account\":1,\"to_account\":2,\"amount\":500,\"idempotency_key\":\"steady-{i}\"}}}}"
    )
}

/// The `event_type` attribute of a `transfer.succeeded` event.
fn event_type_attribute() -> aws_sdk_sqs::types::MessageAttributeValue {
    aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value("transfer.succeeded")
        .build()
        .expect("data_type is set")
}

/// Milliseconds from `from` to `to` (0 if `to` is earlier).
pub fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
}

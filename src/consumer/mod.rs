//! The consuming half: turns SQS's at-least-once delivery into exactly-once
//! effects, per consumer name, with an inbox in the consumer's own database.
//!
//! One pass ([`Consumer::run_once`]):
//!
//! 1. **receive**: `ReceiveMessage`, up to 10 messages, long-polling up to
//!    20 s (cut short at shutdown); a pass handles the batch the previous
//!    one received while it receives the next;
//! 2. **decode** each body into the one event type ([`crate::outbox::EventBody`], native or
//!    CloudEvents). A body that is not one of our events (a foreign message,
//!    bad JSON) is logged with its message id, counted, and left alone: the
//!    queue's redrive policy (`maxReceiveCount` to a dead-letter queue)
//!    takes it; it never stops the consumer or blocks another message;
//! 3. **handle**, per event, in a transaction on the consumer's pool: insert
//!    `(consumer name, event_id)` into `consumed_events` ([`inbox`]); only if
//!    the row is new, run the [`Handler`] with that transaction; commit. A
//!    duplicate (a standard queue's second copy, a redelivery after a
//!    visibility timeout, a replay, a crash between commit and delete) finds
//!    the row and does nothing. While a handler runs, the message's
//!    visibility is extended, so a long handler is not handed to another
//!    replica meanwhile;
//! 4. **delete** what committed (and the duplicates), in batches, only after
//!    the commit: a crash before the delete means a redelivery, which step 3
//!    drops. A handler error rolls back, leaves the message, and sets its
//!    visibility to a backoff that grows with its receive count (never a
//!    hot loop); one that keeps failing is the redrive policy's.
//!
//! On a FIFO queue the messages of one group (one transfer) are handled in
//! order, one group's failure stopping only that group; different groups,
//! and every message of a standard queue, are handled in parallel. On a
//! standard queue the events of one transfer may arrive out of order; the
//! event type says where each stands (see [`crate::outbox::EventType::sequence`]).
//!
//! Several replicas of one consumer name share a queue safely: the inbox's
//! primary key makes one of two concurrent deliveries of an event wait for
//! the other's transaction, then see it as a duplicate.

mod decode;
pub mod handler;
pub mod inbox;
mod messages;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use futures::future::BoxFuture;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::concurrency::advisory::{LockKey, SessionLock};
use crate::error::{Error, Result};
use crate::metrics::metrics;
use crate::outbox::delivery::SqsFailure;
use crate::retry::RetryPolicy;
use crate::service::{Progress, Service, Timing};
pub use decode::{decode, in_transfer_order};
pub use handler::{Delivered, Exec, Handler, HandlerError, Record};
pub use messages::{delete_entries, DELETES_IN_FLIGHT};

/// SQS's limits for `ReceiveMessage`: at most 10 messages, at most 20 s of
/// long polling, visibility at most 12 hours.
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_ReceiveMessage.html>
pub const MAX_RECEIVE: i32 = 10;
pub const MAX_WAIT: Duration = Duration::from_secs(20);
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// How a consumer runs; see `transfer-worker consume --help` for the flags.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer's name: each name gets every event once.
    pub name: String,
    pub queue_url: String,
    /// Messages per `ReceiveMessage` (1 to 10; default 10).
    pub batch_size: i32,
    /// Long-polling wait of each receive (default 20 s, SQS's maximum).
    pub wait: Duration,
    /// How long a received message stays invisible to other consumers
    /// (default 30 s); extended while its handler runs.
    pub visibility_timeout: Duration,
    /// Messages (on FIFO: groups) handled at once (default 10).
    pub concurrency: usize,
    /// How long a message whose handler failed waits before its next try,
    /// by its receive count (default 1 s doubling to 5 min).
    pub retry: RetryPolicy,
    /// Inbox rows received longer ago than this are pruned (default 15
    /// days: longer than SQS's longest retention, 14 days, so a message SQS
    /// could still deliver always finds its row). None: kept.
    pub retention: Option<Duration>,
    /// How often one replica prunes the inbox (default 1 hour).
    pub prune_interval: Duration,
}

impl ConsumerConfig {
    pub fn new(name: impl Into<String>, queue_url: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            queue_url: queue_url.into(),
            batch_size: MAX_RECEIVE,
            wait: MAX_WAIT,
            visibility_timeout: Duration::from_secs(30),
            concurrency: 10,
            retry: RetryPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(300), multiplier: 2.0 },
            retention: Some(Duration::from_secs(15 * 86_400)),
            prune_interval: Duration::from_secs(3_600),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ConsumeCounts {
    pub received: usize,
    /// New events whose handler committed.
    pub landed: usize,
    /// Events this consumer had already: dropped (and deleted).
    pub duplicates: usize,
    /// Handler errors: rolled back, retried later with backoff.
    pub failed: usize,
    /// Bodies that are not our events: left for the redrive policy.
    pub foreign: usize,
    /// SQS or the database did not answer (back off).
    pub unavailable: bool,
    /// Per landed event: now minus its `occurred_at`.
    pub lags: Vec<Duration>,
}

impl std::ops::AddAssign for ConsumeCounts {
    fn add_assign(&mut self, o: Self) {
        self.received += o.received;
        self.landed += o.landed;
        self.duplicates += o.duplicates;
        self.failed += o.failed;
        self.foreign += o.foreign;
        self.unavailable |= o.unavailable;
        self.lags.extend(o.lags);
    }
}

impl Progress for ConsumeCounts {
    fn claimed(&self) -> usize {
        self.received
    }

    fn unavailable(&self) -> bool {
        self.unavailable
    }
}

/// Called after each new event commits (`consume --print` writes it out).
pub type OnLanded = Box<dyn Fn(&Delivered) + Send + Sync>;

/// A consumer of transfer-worker events (see the module docs).
pub struct Consumer {
    pool: PgPool,
    client: aws_sdk_sqs::Client,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    fifo: bool,
    /// Cuts a long poll short; the loop itself stops between passes.
    shutdown: CancellationToken,
    wake: Arc<Notify>,
    on_landed: Option<OnLanded>,
    last_prune: Mutex<Option<Instant>>,
    /// Slots for deletes running in the background.
    deletes: Arc<tokio::sync::Semaphore>,
    /// Batches received by a pass, for the next pass to handle.
    received: Mutex<Vec<Vec<Message>>>,
}

/// How one message went.
enum Handled {
    Landed(Box<Delivered>),
    Duplicate,
    Failed(String),
}

impl Consumer {
    /// A consumer on `pool` (the consumer's database; [`inbox::ensure_table`]
    /// must have run there) and `client`.
    pub fn new(pool: PgPool, client: aws_sdk_sqs::Client, config: ConsumerConfig, handler: Arc<dyn Handler>) -> Self {
        let fifo = crate::outbox::sqs::url_names_fifo_queue(&config.queue_url);
        Consumer {
            pool,
            client,
            config,
            handler,
            fifo,
            shutdown: CancellationToken::new(),
            wake: Arc::new(Notify::new()),
            on_landed: None,
            last_prune: Mutex::new(None),
            deletes: Arc::new(tokio::sync::Semaphore::new(DELETES_IN_FLIGHT)),
            received: Mutex::new(Vec::new()),
        }
    }

    /// Stops a receive that is waiting when `shutdown` is cancelled.
    pub fn stopping_on(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Calls `f` after each new event commits.
    pub fn on_landed(mut self, f: OnLanded) -> Self {
        self.on_landed = Some(f);
        self
    }

    /// Asks SQS about the queue: whether it exists and answers, and whether
    /// it is FIFO. `Err(Error::Invalid)` for a queue that does not exist,
    /// `Err(Error::Unavailable)` when SQS cannot be reached; both name the URL.
    pub async fn check_queue(&mut self) -> Result<()> {
        let asked = self
            .client
            .get_queue_attributes()
            .queue_url(&self.config.queue_url)
            .attribute_names(QueueAttributeName::FifoQueue)
            .send()
            .await;
        match asked {
            Ok(out) => {
                self.fifo =
                    out.attributes().and_then(|a| a.get(&QueueAttributeName::FifoQueue)).is_some_and(|v| v == "true");
                Ok(())
            }
            Err(e) => {
                let failure = SqsFailure::from_sdk(format!("GetQueueAttributes on {}", self.config.queue_url), &e);
                let missing = failure
                    .code
                    .as_deref()
                    .is_some_and(|c| c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist"));
                if missing {
                    Err(Error::invalid(format!("the queue {} does not exist ({failure})", self.config.queue_url)))
                } else {
                    Err(Error::Unavailable(format!("cannot reach the queue {}: {failure}", self.config.queue_url)))
                }
            }
        }
    }

    /// One pass: receive, decode, handle, delete (see the module docs).
    ///
    /// The handling of one batch overlaps the receive of the next: a pass
    /// handles the batch an earlier pass received (if any) while it receives
    /// another, so neither SQS nor the database waits for the other.
    async fn consume_pass(&self) -> Result<ConsumeCounts> {
        self.prune_if_due().await;
        let ready = self.received.lock().expect("received batches").pop();
        let receive = async {
            if self.shutdown.is_cancelled() {
                return Ok(Vec::new());
            }
            tokio::select! {
                r = self.receive() => r,
                _ = self.shutdown.cancelled() => Ok(Vec::new()),
            }
        };
        let (mut counts, received) = match ready {
            Some(batch) => tokio::join!(self.handle_batch(batch), receive),
            None => (ConsumeCounts::default(), receive.await),
        };
        match received {
            Ok(next) => {
                counts.received = next.len();
                if !next.is_empty() {
                    self.received.lock().expect("received batches").push(next);
                }
            }
            Err(failure) => {
                tracing::warn!(error = %failure, "SQS receive failed; will retry");
                counts.unavailable = true;
            }
        }
        Ok(counts)
    }

    /// Handles what earlier passes received and no pass handled yet (after
    /// the loops stopped): what is not done by `deadline` is handed back to
    /// the queue at once (visibility 0) rather than after its timeout.
    pub async fn finish(&self, deadline: tokio::time::Instant) {
        let left: Vec<Vec<Message>> = std::mem::take(&mut *self.received.lock().expect("received batches"));
        for batch in left {
            if tokio::time::Instant::now() < deadline {
                if let Ok(c) = tokio::time::timeout_at(deadline, self.handle_batch(batch.clone())).await {
                    self.record(&c);
                    continue;
                }
            }
            for m in &batch {
                self.set_visibility(m, Duration::ZERO).await;
            }
        }
        let _ = tokio::time::timeout_at(deadline, self.deletes_done()).await;
    }

    /// Decodes, handles and deletes one received batch (see the module docs).
    async fn handle_batch(&self, messages: Vec<Message>) -> ConsumeCounts {
        let mut counts = ConsumeCounts::default();
        // Decode; group (FIFO: by message group, in order; standard: alone).
        let mut groups: BTreeMap<String, Vec<(Message, Delivered)>> = BTreeMap::new();
        for m in messages {
            let id = m.message_id().unwrap_or_default().to_owned();
            match decode(m.body().unwrap_or_default()) {
                Ok((event, body)) => {
                    let receive_count = system(&m, MessageSystemAttributeName::ApproximateReceiveCount)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1);
                    let group = match (self.fifo, system(&m, MessageSystemAttributeName::MessageGroupId)) {
                        (true, Some(g)) => g.to_owned(),
                        _ => id.clone(),
                    };
                    let delivered = Delivered { event, body, message_id: id, receive_count };
                    groups.entry(group).or_default().push((m, delivered));
                }
                Err(why) => {
                    counts.foreign += 1;
                    tracing::warn!(message_id = %id, why, "not a transfer-worker event; left for the queue's redrive policy");
                }
            }
        }
        let results: Vec<Vec<(Message, Handled)>> = if self.handler.records_only() {
            match self.land_batch(groups).await {
                Ok(r) => vec![r],
                Err(e) => {
                    // Nothing landed; the messages come back after their
                    // visibility timeout. The database's trouble: back off.
                    tracing::warn!(error = %e, "landing a batch failed; it comes back");
                    counts.unavailable = true;
                    return counts;
                }
            }
        } else {
            let work: Vec<_> = groups.into_values().map(|group| self.handle_group(group)).collect();
            futures::stream::iter(work).buffer_unordered(self.config.concurrency.max(1)).collect().await
        };
        let mut done = Vec::new();
        for (m, handled) in results.into_iter().flatten() {
            match handled {
                Handled::Landed(d) => {
                    counts.landed += 1;
                    counts.lags.push(decode::lag(&d.event));
                    if let Some(f) = &self.on_landed {
                        f(&d);
                    }
                    done.push(m);
                }
                Handled::Duplicate => {
                    counts.duplicates += 1;
                    done.push(m);
                }
                Handled::Failed(why) => {
                    counts.failed += 1;
                    let count = system(&m, MessageSystemAttributeName::ApproximateReceiveCount)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1);
                    let delay = self.config.retry.delay_for_attempt(count).min(MAX_VISIBILITY);
                    tracing::warn!(
                        message_id = m.message_id().unwrap_or_default(), receive_count = count, retry_in = ?delay,
                        error = %why, "handler failed; rolled back, the message comes back later"
                    );
                    self.set_visibility(&m, delay).await;
                }
            }
        }
        self.delete_in_background(done).await;
        counts
    }

    async fn receive(&self) -> std::result::Result<Vec<Message>, SqsFailure> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.config.queue_url)
            .max_number_of_messages(self.config.batch_size.clamp(1, MAX_RECEIVE))
            .wait_time_seconds(self.config.wait.min(MAX_WAIT).as_secs() as i32)
            .visibility_timeout(self.config.visibility_timeout.as_secs().max(1) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| SqsFailure::from_sdk(format!("ReceiveMessage on {}", self.config.queue_url), &e))?;
        Ok(out.messages.unwrap_or_default())
    }

    /// One group's messages in order; the first failure stops the group
    /// (the later ones stay in flight and come back after it, in order).
    fn handle_group(&self, group: Vec<(Message, Delivered)>) -> BoxFuture<'_, Vec<(Message, Handled)>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(group.len());
            for (m, d) in group {
                let handled = self.handle_one(&m, d).await;
                let failed = matches!(handled, Handled::Failed(_));
                out.push((m, handled));
                if failed {
                    break;
                }
            }
            out
        })
    }

    /// When the inbox row is the handler's whole effect, a batch lands in
    /// one statement: one round trip for up to 10 events.
    async fn land_batch(&self, groups: BTreeMap<String, Vec<(Message, Delivered)>>) -> Result<Vec<(Message, Handled)>> {
        let all: Vec<(Message, Delivered)> = groups.into_values().flatten().collect();
        let batch: Vec<&Delivered> = all.iter().map(|(_, d)| d).collect();
        let mut landed = inbox::land_all(&self.pool, &self.config.name, &batch).await?;
        // The same event twice in one batch lands once: the first copy.
        Ok(all
            .into_iter()
            .map(|(m, d)| {
                let handled =
                    if landed.remove(&d.event.event_id) { Handled::Landed(Box::new(d)) } else { Handled::Duplicate };
                (m, handled)
            })
            .collect())
    }

    async fn handle_one(&self, m: &Message, d: Delivered) -> Handled {
        let attempt = async {
            let mut tx = self.pool.begin().await?;
            if !inbox::land(&mut tx, &self.config.name, &d).await? {
                tx.rollback().await?;
                return Ok::<_, Error>(Handled::Duplicate);
            }
            // While the handler runs, keep the message from going back to
            // the queue (and to another replica).
            let heartbeat = self.keep_invisible(m);
            let handled = tokio::select! {
                r = self.handler.handle(&mut tx, &d) => r,
                _ = heartbeat => unreachable!("the heartbeat never ends on its own"),
            };
            match handled {
                Ok(()) => {
                    tx.commit().await?;
                    Ok(Handled::Landed(Box::new(d)))
                }
                Err(e) => {
                    tx.rollback().await?;
                    Ok(Handled::Failed(e.0))
                }
            }
        };
        match attempt.await {
            Ok(h) => h,
            Err(e) => Handled::Failed(e.to_string()),
        }
    }

    /// Prunes the inbox every `prune_interval`, one replica at a time.
    async fn prune_if_due(&self) {
        let Some(retention) = self.config.retention else { return };
        {
            let mut last = self.last_prune.lock().expect("prune clock");
            if last.is_some_and(|t| t.elapsed() < self.config.prune_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        let key = LockKey::hashed("transfer-worker:consumer-prune", &self.config.name);
        match SessionLock::try_acquire(&self.pool, key).await {
            Ok(Some(lock)) => {
                match inbox::prune(&self.pool, &self.config.name, retention).await {
                    Ok(n) if n > 0 => tracing::info!(rows = n, "pruned the inbox"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning the inbox failed; will retry"),
                }
                let _ = lock.release().await;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not take the inbox's prune lock"),
        }
    }
}

impl Service for Consumer {
    type Counts = ConsumeCounts;
    const NAME: &'static str = "consumer";

    fn run_once(&self) -> BoxFuture<'_, Result<ConsumeCounts>> {
        Box::pin(self.consume_pass())
    }

    fn batch_size(&self) -> i64 {
        self.config.batch_size.clamp(1, MAX_RECEIVE) as i64
    }

    /// The long poll is the wait: no sleep between passes; backoff while
    /// SQS or the database is down.
    fn timing(&self) -> Timing {
        Timing { poll_interval: Duration::from_millis(1), outage_retry: RetryPolicy::default() }
    }

    fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    fn record(&self, c: &ConsumeCounts) {
        let m = metrics();
        m.consumed(c.received as u64, c.landed as u64, c.duplicates as u64, c.failed as u64, c.foreign as u64);
        for lag in &c.lags {
            m.consumer_lag(*lag);
        }
    }
}

fn system(m: &Message, name: MessageSystemAttributeName) -> Option<&str> {
    m.attributes().and_then(|a| a.get(&name)).map(String::as_str)
}

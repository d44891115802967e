//! `bench`: throughput and latency of the real code paths on a scratch
//! database (and, for the relay, a scratch queue), with the invariants checked
//! afterwards.
//!
//! - `apply`: N transfers are enqueued up front, then K apply tasks drain
//!   them; `applied_per_s` = N / drain time; latency = enqueue to applied.
//! - `relay`: the N transfers are applied first (untimed), then K relay tasks
//!   publish their N events; `published_per_s` = N / publish time; latency =
//!   event written to published.
//! - `both`: the `run` process's loop (K apply tasks, K relay tasks) from a
//!   full queue; both rates, latency = enqueue to published.
//! - `enqueue`: the daily-limit check's cost: enqueue latency from an account
//!   that made 100,000 transfers today and from one that made none.
//! - `--rate R --seconds S` ([`steady`]): a steady producer and consumer,
//!   enqueue -> applied and enqueue -> received, next to SQS's own floor.
//!
//! Every figure that only means something against a bar comes with the bar,
//! measured in the same run: apply with the PostgreSQL [`ceiling`] for its
//! shape, relay with SQS's own `SendMessageBatch` rate, steady latency with
//! SQS's own send -> receive latency. Apply also reports how long its
//! transactions waited on locks ([`locks`]). `--preload N` puts N finished
//! transfers and published events in the tables first; `--hot` makes every
//! transfer touch account 1.

//!
//! Its few queries are runtime-checked on purpose: they are measurement
//! plumbing over a scratch database (the latency query is chosen per mode),
//! not part of what the worker runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::tools::fixtures::ScratchDb;
use transfer_worker::error::{Error, Result};
use transfer_worker::health::Health;
use transfer_worker::outbox::relay::{Relay, RelayConfig};
use transfer_worker::outbox::route::{Route, Routing};
use transfer_worker::service::Service;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};
use transfer_worker::worker::{self, WorkerConfig};

pub mod ceiling;
pub mod consume;
pub mod cpu;
pub mod invariants;
pub mod locks;
mod setup;
pub mod sqs;
pub mod steady;

use invariants::{invariants_hold, unfinished};
use setup::{enqueue_latency, open_accounts, preload, seed};
use sqs::ScratchQueue;
use transfer_worker::outbox::sqs::DEFAULT_CONCURRENCY;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Apply,
    Relay,
    Both,
    Enqueue,
    /// The consumer against SQS's own receive + delete rate.
    Consume,
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub transfers: usize,
    pub accounts: usize,
    pub workers: usize,
    pub batch_size: i64,
    pub mode: Mode,
    /// Steady-rate mode: transfers per second and for how long.
    pub rate: Option<f64>,
    pub seconds: f64,
    /// A FIFO queue (relay, both, steady).
    pub fifo: bool,
    /// Finished transfers and published events loaded before the timed part.
    pub preload: usize,
    /// Every transfer touches account 1.
    pub hot: bool,
    /// Seconds to measure the PostgreSQL ceiling for (apply; 0 = skip).
    pub ceiling_seconds: f64,
    /// Relay tasks (steady; the `run` default if None).
    pub relays: Option<usize>,
    /// Steady: prune events published longer ago than this, every second.
    pub prune_after: Option<Duration>,
    /// Steady: also measure SQS's own latency at this rate while the
    /// pipeline runs (its own queue and consumer).
    pub floor_alongside: Option<f64>,
    /// Relay: destinations every event goes to (each a queue of its own).
    pub destinations: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// A latency distribution in ms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Dist {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(mut samples: Vec<f64>) -> Dist {
        samples.sort_by(f64::total_cmp);
        Dist {
            p50: percentile(&samples, 0.50),
            p95: percentile(&samples, 0.95),
            p99: percentile(&samples, 0.99),
            max: percentile(&samples, 1.0),
        }
    }

    fn latency(&self) -> Latency {
        Latency { p50: self.p50, p95: self.p95, p99: self.p99 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub mode: Mode,
    pub transfers: usize,
    pub accounts: usize,
    pub workers: usize,
    pub batch_size: i64,
    /// Transfers applied per second (0 when the mode does not measure it).
    pub applied_per_s: f64,
    /// Events published per second (0 when the mode does not measure it).
    pub published_per_s: f64,
    /// Per-transfer latency in milliseconds (see the module docs per mode).
    pub latency_ms: Latency,
    pub elapsed_ms: f64,
    /// Money conserved, no negative balance, one event per finished
    /// transfer, and (relay, both, steady) every event published.
    pub invariants_ok: bool,
    /// PostgreSQL at its durability settings, as the figures depend on them.
    pub fsync: String,
    pub synchronous_commit: String,
    pub preload: usize,
    pub hot: bool,
    pub fifo: bool,
    /// apply: the PostgreSQL ceiling for the apply shape, same run and
    /// cluster, same number of connections; and applied_per_s / it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_ratio: Option<f64>,
    /// apply, both: time the transactions spent waiting on locks, per 1,000 transfers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_wait_ms_per_1000: Option<f64>,
    /// relay: SQS's own SendMessageBatch(10) rate with the same client and
    /// as many callers, right before the relay ran; and published_per_s / it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqs_batch_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_ratio: Option<f64>,
    /// relay: destinations, and deliveries (events x destinations) per second.
    pub destinations: usize,
    pub delivered_per_s: Option<f64>,
    /// steady: the producer's achieved rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_per_s: Option<f64>,
    /// steady: enqueue -> received by the consumer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_latency_ms: Option<Dist>,
    /// steady: the rate SQS accepted the events at (the relay's record of
    /// each answer), to compare with the floors' send rates; and enqueue ->
    /// accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_latency_ms: Option<Dist>,
    /// steady: SQS's own send -> receive, same consumer, same rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_latency_ms: Option<Dist>,
    /// steady: the rate SQS took the floor's messages at (below the offered
    /// rate when SQS alone cannot keep up: then no floor holds at that rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_sent_per_s: Option<f64>,
    /// steady with `--floor-alongside R`: SQS's own send -> receive at R/s,
    /// measured while the pipeline ran (SQS under the run's load).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_alongside_latency_ms: Option<Dist>,
    /// steady: SQS alone taking the same rate in `SendMessageBatch` calls of
    /// 10 (the floor of a relay that batches), and the rate it took them at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batched_floor_latency_ms: Option<Dist>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batched_floor_sent_per_s: Option<f64>,
    /// steady: the worker's own CPU time per 1,000 transfers (its threads'
    /// counters, apart from the producer's and the consumer's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_cpu_ms_per_1000: Option<f64>,
    /// SQS alone, single sends at the same rate: its senders' CPU per
    /// 1,000 messages (steady mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_cpu_ms_per_1000: Option<f64>,
    /// The same for SQS alone in batches of 10 at the same rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batched_floor_cpu_ms_per_1000: Option<f64>,
    /// steady: enqueue -> applied (commit), with its max.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_latency_ms: Option<Dist>,
    /// steady: the most events waiting in the outbox at any moment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog_max: Option<i64>,
    /// enqueue: latency of an enqueue from a limited account that made no
    /// transfer today, and from one that made 100,000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enqueue_ms: Option<EnqueueLatency>,
    /// consume: the consumer's rate, SQS's own receive + delete rate with as
    /// many loops, and their ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consume: Option<consume::ConsumeReport>,
    /// How long loading `preload` took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preload_s: Option<f64>,
    /// steady: the outbox's size and dead tuples every 5 s (flat with pruning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_footprint: Option<Vec<steady::Footprint>>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EnqueueLatency {
    pub fresh_account: Dist,
    pub busy_account: Dist,
    /// Transfers the busy account made today.
    pub busy_transfers_today: usize,
}

pub const OPENING_BALANCE: i64 = 1_000_000;
/// The hot account's balance: enough that it never runs dry.
pub const HOT_BALANCE: i64 = 1_000_000_000_000;

pub async fn run(database_url: &str, config: &BenchConfig) -> Result<BenchReport> {
    if config.accounts < 2 {
        return Err(Error::invalid("bench needs at least 2 accounts"));
    }
    // Written so that NaN is refused too.
    let positive = |x: f64| x > 0.0;
    if config.rate.is_some_and(|r| !(positive(r) && r <= 50_000.0)) || !positive(config.seconds) {
        return Err(Error::invalid("--rate must be in (0, 50000] and --seconds > 0"));
    }
    if let Some(r) = config.floor_alongside {
        if config.rate.is_none() || !(r > 0.0 && r <= 50_000.0) {
            return Err(Error::invalid("--floor-alongside needs --rate, and must be in (0, 50000]"));
        }
    }
    let producers = config.rate.map(steady::producers).unwrap_or(0) as u32;
    let scratch =
        ScratchDb::create(database_url, "transfer_worker_bench", config.workers as u32 * 2 + 30 + producers).await?;
    let result = measure(&scratch.pool, config).await;
    scratch.drop().await?;
    result
}

async fn measure(pool: &PgPool, config: &BenchConfig) -> Result<BenchReport> {
    transfer_worker::db::migrate(pool).await?;
    let (fsync, synchronous_commit): (String, String) =
        sqlx::query_as("SELECT current_setting('fsync'), current_setting('synchronous_commit')")
            .fetch_one(pool)
            .await?;
    let mut report = BenchReport {
        mode: config.mode,
        transfers: config.transfers,
        accounts: config.accounts,
        workers: config.workers,
        batch_size: config.batch_size,
        applied_per_s: 0.0,
        published_per_s: 0.0,
        latency_ms: Latency { p50: 0.0, p95: 0.0, p99: 0.0 },
        elapsed_ms: 0.0,
        invariants_ok: false,
        fsync,
        synchronous_commit,
        preload: config.preload,
        hot: config.hot,
        fifo: config.fifo,
        ceiling_per_s: None,
        ceiling_ratio: None,
        lock_wait_ms_per_1000: None,
        sqs_batch_per_s: None,
        relay_ratio: None,
        destinations: config.destinations,
        delivered_per_s: None,
        offered_per_s: None,
        received_latency_ms: None,
        accepted_per_s: None,
        accepted_latency_ms: None,
        floor_latency_ms: None,
        floor_sent_per_s: None,
        floor_alongside_latency_ms: None,
        batched_floor_latency_ms: None,
        batched_floor_sent_per_s: None,
        worker_cpu_ms_per_1000: None,
        floor_cpu_ms_per_1000: None,
        batched_floor_cpu_ms_per_1000: None,
        applied_latency_ms: None,
        backlog_max: None,
        enqueue_ms: None,
        preload_s: None,
        outbox_footprint: None,
        consume: None,
    };
    open_accounts(pool, config).await?;
    if config.preload > 0 {
        let started = Instant::now();
        preload(pool, config.preload, config.accounts as i64).await?;
        report.preload_s = Some(started.elapsed().as_secs_f64());
    }
    if config.mode == Mode::Apply && config.ceiling_seconds > 0.0 && config.rate.is_none() {
        report.ceiling_per_s = Some(ceiling::measure(pool, config.workers, config.ceiling_seconds).await?);
    }

    let started = Instant::now();
    if let Some(rate) = config.rate {
        let steady = steady::measure(
            pool,
            &steady::SteadyConfig {
                rate,
                seconds: config.seconds,
                fifo: config.fifo,
                accounts: config.accounts,
                hot: config.hot,
                relays: config.relays,
                prune_after: config.prune_after,
                floor_alongside: config.floor_alongside,
            },
        )
        .await?;
        report.transfers = steady.transfers;
        report.applied_per_s = steady.applied_per_s;
        report.published_per_s = steady.published_per_s;
        report.latency_ms = steady.applied_latency_ms.latency();
        report.offered_per_s = Some(steady.offered_per_s);
        report.received_latency_ms = Some(steady.received_latency_ms);
        report.accepted_per_s = Some(steady.accepted_per_s);
        report.accepted_latency_ms = Some(steady.accepted_latency_ms);
        report.floor_latency_ms = Some(steady.floor_latency_ms);
        report.floor_sent_per_s = Some(steady.floor_sent_per_s);
        report.floor_alongside_latency_ms = steady.floor_alongside_latency_ms;
        report.batched_floor_latency_ms = Some(steady.batched_floor_latency_ms);
        report.batched_floor_sent_per_s = Some(steady.batched_floor_sent_per_s);
        report.worker_cpu_ms_per_1000 = Some(steady.worker_cpu_ms_per_1000);
        report.floor_cpu_ms_per_1000 = Some(steady.floor_cpu_ms_per_1000);
        report.batched_floor_cpu_ms_per_1000 = Some(steady.batched_floor_cpu_ms_per_1000);
        report.applied_latency_ms = Some(steady.applied_latency_ms);
        report.backlog_max = Some(steady.backlog_max);
        report.outbox_footprint = Some(steady.outbox_footprint);
        report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        report.invariants_ok = invariants_hold(pool, config, true).await?;
        return Ok(report);
    }

    let apply = ApplyConfig { batch_size: config.batch_size, ..ApplyConfig::default() };
    let latency_sql = match config.mode {
        Mode::Consume => {
            // The queue is FIFO with --fifo; the events are standalone (no
            // transfers are applied), so the invariants are trivially those
            // of the untouched accounts.
            let c = consume::measure(pool, config.transfers, config.workers, config.fifo).await?;
            report.published_per_s = 0.0;
            report.consume = Some(c);
            report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            report.invariants_ok = invariants_hold(pool, config, false).await?;
            return Ok(report);
        }
        Mode::Enqueue => {
            report.enqueue_ms = Some(enqueue_latency(pool).await?);
            report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            report.invariants_ok = invariants_hold(pool, config, false).await?;
            return Ok(report);
        }
        Mode::Apply => {
            seed(pool, config).await?;
            let locks = locks::LockWaits::start(pool.clone());
            let started = Instant::now();
            drain_apply(pool, &apply, config.workers).await?;
            let s = started.elapsed().as_secs_f64();
            let waited = locks.stop().await;
            report.applied_per_s = config.transfers as f64 / s;
            report.lock_wait_ms_per_1000 = Some(waited / config.transfers as f64 * 1_000.0);
            report.ceiling_ratio = report.ceiling_per_s.map(|c| report.applied_per_s / c);
            "SELECT (extract(epoch FROM applied_at - created_at) * 1000)::float8 FROM transfers
              WHERE idempotency_key NOT LIKE 'preload-%'"
        }
        Mode::Relay => {
            seed(pool, config).await?;
            drain_apply(pool, &apply, config.workers).await?;
            let mut queues = Vec::new();
            for _ in 0..config.destinations.max(1) {
                queues.push(ScratchQueue::create(config.fifo, DEFAULT_CONCURRENCY).await?);
            }
            let body_len: i64 = sqlx::query_scalar(
                "SELECT COALESCE(avg(length(data::text)), 100)::bigint + 200 FROM outbox WHERE state = 'pending'",
            )
            .fetch_one(pool)
            .await?;
            // The bar: SQS taking the same deliveries in the same batches,
            // with as many calls in flight as all the relays together.
            let deliveries = config.transfers * queues.len();
            let baseline = sqs::batch_send_rate(
                config.fifo,
                deliveries.min(20_000 * queues.len()),
                config.workers * 8 * queues.len(),
                body_len as usize,
            )
            .await?;
            let routing =
                Routing::new(queues.iter().map(|q| Route::everything_to(q.publisher.target().clone())).collect());
            let started = Instant::now();
            drain_in_parallel(
                queues
                    .iter()
                    .flat_map(|q| {
                        (0..config.workers).map(|_| q.publisher.clone().with_calls_in_flight(DEFAULT_CONCURRENCY))
                    })
                    .map(|p| {
                        Relay::new(pool.clone(), p, RelayConfig::default(), Default::default())
                            .routed(&routing, Default::default())
                    })
                    .collect(),
            )
            .await?;
            let s = started.elapsed().as_secs_f64();
            for q in queues {
                q.delete().await;
            }
            report.published_per_s = config.transfers as f64 / s;
            report.delivered_per_s = Some(deliveries as f64 / s);
            report.sqs_batch_per_s = Some(baseline);
            report.relay_ratio = Some(deliveries as f64 / s / baseline);
            "SELECT (extract(epoch FROM published_at - occurred_at) * 1000)::float8 FROM outbox
              WHERE transfer_id IN (SELECT id FROM transfers WHERE idempotency_key NOT LIKE 'preload-%')"
        }
        Mode::Both => {
            seed(pool, config).await?;
            let queue = ScratchQueue::create(config.fifo, DEFAULT_CONCURRENCY).await?;
            let shutdown = CancellationToken::new();
            let worker_config = WorkerConfig {
                workers: config.workers,
                relays: config.workers,
                apply,
                poll_interval: Duration::from_millis(20),
                ..WorkerConfig::default()
            };
            let locks = locks::LockWaits::start(pool.clone());
            let running = tokio::spawn(worker::run(
                pool.clone(),
                queue.publisher.clone(),
                worker_config,
                Arc::new(Health::new(shutdown.clone())),
            ));
            loop {
                let (pending, unpublished) = unfinished(pool).await?;
                if pending + unpublished == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            shutdown.cancel();
            running.await.map_err(|e| Error::Failed(format!("worker failed: {e}")))??;
            let waited = locks.stop().await;
            queue.delete().await;
            let (applied_s, published_s): (f64, f64) = sqlx::query_as(
                "SELECT extract(epoch FROM (SELECT max(applied_at) FROM transfers) - (SELECT min(created_at) FROM transfers WHERE idempotency_key NOT LIKE 'preload-%'))::float8,
                        extract(epoch FROM (SELECT max(published_at) FROM outbox) - (SELECT min(created_at) FROM transfers WHERE idempotency_key NOT LIKE 'preload-%'))::float8",
            )
            .fetch_one(pool)
            .await?;
            report.applied_per_s = config.transfers as f64 / applied_s.max(1e-9);
            report.published_per_s = config.transfers as f64 / published_s.max(1e-9);
            report.lock_wait_ms_per_1000 = Some(waited / config.transfers as f64 * 1_000.0);
            "SELECT (extract(epoch FROM o.published_at - t.created_at) * 1000)::float8
               FROM outbox o JOIN transfers t ON t.id = o.transfer_id WHERE t.idempotency_key NOT LIKE 'preload-%'"
        }
    };
    report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let samples: Vec<f64> = sqlx::query_scalar(latency_sql).fetch_all(pool).await?;
    report.latency_ms = Dist::of(samples).latency();
    report.invariants_ok = invariants_hold(pool, config, config.mode != Mode::Apply).await?;
    Ok(report)
}

async fn drain_apply(pool: &PgPool, config: &ApplyConfig, workers: usize) -> Result<()> {
    drain_in_parallel((0..workers).map(|_| Applier::new(pool.clone(), config.clone())).collect()).await
}

/// Drains each service on a task of its own; waits for them all.
async fn drain_in_parallel<S: Service>(services: Vec<S>) -> Result<()> {
    let tasks: Vec<_> = services
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                s.drain().await?;
                Ok::<(), Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| Error::Failed(format!("{} task failed: {e}", S::NAME)))??;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[rank] * 1000.0).round() / 1000.0
}

//! Steady-rate mode (`bench --rate R --seconds S`): latency as users feel it.
//!
//! 1. The floor: SQS alone, `SendMessage` at R/s for S seconds, received by
//!    the same consumer; each message's send -> receive latency.
//! 2. The pipeline: a producer inserts transfers by plain SQL at R/s (as any
//!    producer may), the `run` loop (default configuration) applies and
//!    relays them, and the consumer stamps each event on receipt. Per
//!    transfer: enqueue (the producer's commit) -> applied (the apply
//!    transaction's commit) and enqueue -> received.
//!
//! Both halves share the consumer and the rate, so the difference between
//! them is what the worker adds. Beside them: SQS taking the same rate in
//! batches of 10 (the floor of a relay that batches: whether SQS alone keeps
//! up at that rate), and, on request, SQS's own latency measured while the
//! pipeline runs. The worker runs on a runtime of its own (two threads, as
//! `run` has on two cores) with its own pool and SQS client, so that its CPU
//! time is counted apart from the producer's, the consumer's and SQS's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::tools::bench::cpu::ThreadCpu;
use crate::tools::bench::sqs::{first_receipt_per_transfer, floor_latency, ms_between, Consumer, ScratchQueue};
use crate::tools::bench::{unfinished, Dist};
use transfer_worker::error::{Error, Result};
use transfer_worker::health::Health;
use transfer_worker::outbox::publisher::Publisher;
use transfer_worker::outbox::sqs::{client_from_env, SqsConfig, DEFAULT_CONCURRENCY};
use transfer_worker::transfer::apply::Committed;
use transfer_worker::worker::{self, WorkerConfig};

/// Producer tasks: enough that inserts (a commit each, waiting for the disk)
/// keep up with the rate.
pub fn producers(rate: f64) -> usize {
    ((rate / 25.0).ceil() as usize).clamp(16, 128)
}

#[derive(Debug, Clone)]
pub struct SteadyConfig {
    pub rate: f64,
    pub seconds: f64,
    pub fifo: bool,
    pub accounts: usize,
    pub hot: bool,
    /// Relay tasks of the `run` loop (its default if None).
    pub relays: Option<usize>,
    /// Prune events published longer ago than this, every second (retention
    /// under load); None: the run loop's default (7 days, so nothing here).
    pub prune_after: Option<Duration>,
    /// Also measure SQS's own latency at this rate while the pipeline runs.
    pub floor_alongside: Option<f64>,
}

/// One sample of the outbox's footprint.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Footprint {
    pub at_s: f64,
    pub mib: f64,
    pub live_tuples: i64,
    pub dead_tuples: i64,
}

#[derive(Debug, Clone)]
pub struct SteadyReport {
    pub offered_per_s: f64,
    pub applied_per_s: f64,
    pub published_per_s: f64,
    /// The rate SQS accepted the events at, by the relay's own record
    /// (`first_published_at`): the send side, as the floors' "SQS took".
    pub accepted_per_s: f64,
    pub applied_latency_ms: Dist,
    /// Enqueue -> accepted by SQS (the relay's record of its answer).
    pub accepted_latency_ms: Dist,
    pub received_latency_ms: Dist,
    pub floor_latency_ms: Dist,
    /// The rate SQS took the floor's messages at (below `offered_per_s`: SQS
    /// itself could not keep up).
    pub floor_sent_per_s: f64,
    /// SQS's own send -> receive measured while the pipeline ran, if asked.
    pub floor_alongside_latency_ms: Option<Dist>,
    /// SQS alone taking the rate in `SendMessageBatch` calls of 10.
    pub batched_floor_latency_ms: Dist,
    pub batched_floor_sent_per_s: f64,
    /// The worker's own CPU time (its runtime's threads) per 1,000 transfers,
    /// from the first enqueue until the last event was received.
    pub worker_cpu_ms_per_1000: f64,
    /// SQS alone's senders (the single-send floor, before the pipeline
    /// ran): CPU per 1,000 messages, their own threads. What the SDK costs
    /// per event sent with one call each, with `run`'s client.
    pub floor_cpu_ms_per_1000: f64,
    /// The same for the batched floor (`SendMessageBatch` of 10).
    pub batched_floor_cpu_ms_per_1000: f64,
    /// The most events waiting in the outbox at any sample (every 100 ms).
    pub backlog_max: i64,
    /// The outbox's size on disk (table and indexes, MiB) and its dead tuples,
    /// sampled every 5 s: with pruning on, both level off.
    pub outbox_footprint: Vec<Footprint>,
    pub transfers: usize,
}

pub async fn measure(pool: &PgPool, config: &SteadyConfig) -> Result<SteadyReport> {
    let single = floor_latency(config.fifo, config.rate, config.seconds, 1).await?;
    let (floor, floor_sent_per_s) = (Dist::of(single.latencies), single.sent_per_s);
    let batched = floor_latency(config.fifo, config.rate, config.seconds, 10).await?;
    let batched_floor_sent_per_s = batched.sent_per_s;

    let queue = ScratchQueue::create(config.fifo, DEFAULT_CONCURRENCY).await?;
    let consumer = Consumer::start(&queue);
    let (observer, mut commits) = tokio::sync::mpsc::unbounded_channel::<Committed>();
    let shutdown = CancellationToken::new();
    let defaults = WorkerConfig::default();
    let mut maintenance = defaults.maintenance;
    if let Some(age) = config.prune_after {
        maintenance.prune.published_older_than = Some(age);
        maintenance.prune_interval = Duration::from_secs(1);
    }
    let worker_config = WorkerConfig {
        observer: Some(observer),
        relays: config.relays.unwrap_or(defaults.relays),
        maintenance,
        ..defaults
    };
    let cpu = ThreadCpu::default();
    let running = spawn_worker(pool, &queue.url, config.fifo, worker_config, Health::new(shutdown.clone()), &cpu);
    let applied_at: Arc<Mutex<HashMap<i64, SystemTime>>> = Arc::new(Mutex::new(HashMap::new()));
    let collector = {
        let applied_at = applied_at.clone();
        tokio::spawn(async move {
            while let Some(c) = commits.recv().await {
                let mut map = applied_at.lock().expect("applied");
                for id in c.ids {
                    map.entry(id).or_insert(c.at);
                }
            }
        })
    };
    let backlog_max = Arc::new(AtomicU64::new(0));
    let footprint: Arc<Mutex<Vec<Footprint>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (pool, backlog_max, stop, footprint) =
            (pool.clone(), backlog_max.clone(), shutdown.clone(), footprint.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut next_footprint = started;
            while !stop.is_cancelled() {
                let n = unfinished(&pool).await.map(|(_, events)| events).unwrap_or(0);
                backlog_max.fetch_max(n.max(0) as u64, Ordering::Relaxed);
                if Instant::now() >= next_footprint {
                    next_footprint += Duration::from_secs(5);
                    let row: Option<(f64, i64, i64)> = sqlx::query_as(
                        "SELECT (pg_total_relation_size('outbox') / 1048576.0)::float8, COALESCE(n_live_tup, 0), COALESCE(n_dead_tup, 0)
                           FROM pg_stat_user_tables WHERE relname = 'outbox'",
                    )
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten();
                    if let Some((mib, live, dead)) = row {
                        let at_s = started.elapsed().as_secs_f64().round();
                        footprint.lock().expect("footprint").push(Footprint {
                            at_s,
                            mib,
                            live_tuples: live,
                            dead_tuples: dead,
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // SQS alone again, on its own queue and consumer, while the pipeline
    // runs: the floor above was measured on an otherwise idle machine.
    let alongside =
        config.floor_alongside.map(|rate| tokio::spawn(floor_latency(config.fifo, rate, config.seconds, 1)));
    let cpu_before = cpu.ms();
    let (enqueued, produce_s) = produce(pool, config).await?;
    let floor_alongside_latency_ms = match alongside {
        Some(task) => {
            let alongside = task.await.map_err(|e| Error::Failed(format!("floor alongside failed: {e}")))??;
            Some(Dist::of(alongside.latencies))
        }
        None => None,
    };
    let first_enqueue = enqueued.values().min().copied().unwrap_or_else(SystemTime::now);
    let all_received = consumer.wait_for(enqueued.len() as u64, Duration::from_secs(60)).await;
    let worker_cpu_ms = cpu.ms() - cpu_before;
    shutdown.cancel();
    tokio::task::spawn_blocking(move || running.join())
        .await
        .map_err(|e| Error::Failed(format!("worker failed: {e}")))?
        .map_err(|_| Error::Failed("the worker's thread panicked".into()))??;
    let _ = sampler.await;
    let _ = collector.await;
    let receipts = consumer.stop().await;
    queue.delete().await;
    if !all_received {
        return Err(Error::Failed(format!(
            "bench: {} of {} events received within 60 s of the end",
            receipts.len(),
            enqueued.len()
        )));
    }

    let received = first_receipt_per_transfer(&receipts);
    let accepted = first_acceptance_per_transfer(pool).await?;
    let applied_at = applied_at.lock().expect("applied");
    let mut applied_ms = Vec::with_capacity(enqueued.len());
    let mut received_ms = Vec::with_capacity(enqueued.len());
    let mut accepted_ms = Vec::with_capacity(enqueued.len());
    for (id, at) in &enqueued {
        if let Some(sent) = accepted.get(id) {
            accepted_ms.push(ms_between(*at, *sent));
        }
        if let Some(done) = applied_at.get(id) {
            applied_ms.push(ms_between(*at, *done));
        }
        if let Some(got) = received.get(id) {
            received_ms.push(ms_between(*at, *got));
        }
    }
    let span = |last: Option<&SystemTime>| {
        last.and_then(|l| l.duration_since(first_enqueue).ok()).map(|d| d.as_secs_f64()).unwrap_or(f64::INFINITY)
    };
    let n = enqueued.len() as f64;
    let outbox_footprint = std::mem::take(&mut *footprint.lock().expect("footprint"));
    Ok(SteadyReport {
        offered_per_s: n / produce_s,
        applied_per_s: n / span(applied_at.values().max()),
        published_per_s: n / span(received.values().max()),
        accepted_per_s: n / span(accepted.values().max()),
        accepted_latency_ms: Dist::of(accepted_ms),
        applied_latency_ms: Dist::of(applied_ms),
        received_latency_ms: Dist::of(received_ms),
        floor_latency_ms: floor,
        floor_sent_per_s,
        floor_alongside_latency_ms,
        batched_floor_latency_ms: Dist::of(batched.latencies),
        batched_floor_sent_per_s,
        worker_cpu_ms_per_1000: worker_cpu_ms / n * 1_000.0,
        floor_cpu_ms_per_1000: single.sender_cpu_ms_per_1000,
        batched_floor_cpu_ms_per_1000: batched.sender_cpu_ms_per_1000,
        backlog_max: backlog_max.load(Ordering::Relaxed) as i64,
        outbox_footprint,
        transfers: enqueued.len(),
    })
}

/// When SQS accepted each transfer's first event, as the relay recorded it
/// (`first_published_at`, set when SQS's answer is recorded: never before).
async fn first_acceptance_per_transfer(pool: &PgPool) -> Result<HashMap<i64, SystemTime>> {
    let rows: Vec<(i64, f64)> = sqlx::query_as(
        "SELECT transfer_id, extract(epoch FROM min(first_published_at))::float8
           FROM outbox WHERE first_published_at IS NOT NULL GROUP BY transfer_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, epoch)| (id, SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch))).collect())
}

/// Runs the worker as `run` does, on a runtime of its own whose threads
/// `cpu` counts: two workers (what `run` gets on two cores), its own pool to
/// `pool`'s database and its own SQS client (a connection's I/O is done by
/// the runtime that opened it).
fn spawn_worker(
    pool: &PgPool,
    queue_url: &str,
    fifo: bool,
    config: WorkerConfig,
    health: Health,
    cpu: &ThreadCpu,
) -> std::thread::JoinHandle<Result<worker::Stopped>> {
    let options = (*pool.connect_options()).clone();
    let connections = (config.workers + config.relays + 4) as u32;
    let queue_url = queue_url.to_owned();
    let cpu = cpu.clone();
    std::thread::spawn(move || {
        cpu.join();
        let runtime = cpu.runtime("bench-worker").map_err(|e| Error::Failed(format!("the worker's runtime: {e}")))?;
        runtime.block_on(async move {
            // The pool `run` makes (db::connect), to the bench's database.
            let pool = transfer_worker::db::pool_of(options, connections);
            let client = client_from_env(Duration::from_secs(10)).await;
            let sqs = SqsConfig { queue_url, call_timeout: Duration::from_secs(10), concurrency: DEFAULT_CONCURRENCY };
            let publisher = Publisher::new(client, &sqs).with_fifo(fifo);
            worker::run(pool, publisher, config, Arc::new(health)).await
        })
    })
}

/// Inserts transfers at the configured rate, each at its due time, from
/// several tasks; returns each transfer's commit time and how long it took.
async fn produce(pool: &PgPool, config: &SteadyConfig) -> Result<(HashMap<i64, SystemTime>, f64)> {
    let total = (config.rate * config.seconds).round() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for p in 0..producers(config.rate) {
        let (pool, next, config) = (pool.clone(), next.clone(), config.clone());
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1_000 + p as u64);
            let mut out = Vec::new();
            let accounts = config.accounts as i64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, Error>(out);
                }
                tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / config.rate)).into()).await;
                let a = rng.gen_range(1..=accounts);
                let b = (a + rng.gen_range(1..accounts) - 1) % accounts + 1;
                let (from, to) = if config.hot {
                    if i % 2 == 0 {
                        (1, b.max(2))
                    } else {
                        (b.max(2), 1)
                    }
                } else {
                    (a, b)
                };
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
                     VALUES ($1, $2, $3, $4) RETURNING id",
                )
                .bind(format!("steady-{i}"))
                .bind(from)
                .bind(to)
                .bind(rng.gen_range(1..=100i64))
                .fetch_one(&pool)
                .await?;
                out.push((id, SystemTime::now()));
            }
        });
    }
    let mut enqueued = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        enqueued.extend(r.map_err(|e| Error::Failed(format!("producer failed: {e}")))??);
    }
    Ok((enqueued, started.elapsed().as_secs_f64()))
}

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

//!
//! Its few queries are runtime-checked on purpose: they are measurement
//! plumbing over a scratch database (the latency query is chosen per mode),
//! not part of what the worker runs.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::outbox::relay::{Relay, RelayConfig};
use crate::outbox::sqs::{create_queue, Publisher, SqsConfig};
use crate::scratch::ScratchDb;
use crate::transfer::apply::{Applier, ApplyConfig};
use crate::worker::{self, WorkerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Apply,
    Relay,
    Both,
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub transfers: usize,
    pub accounts: usize,
    pub workers: usize,
    pub batch_size: i64,
    pub mode: Mode,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
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
    /// transfer, and (relay, both) every event published.
    pub invariants_ok: bool,
}

const OPENING_BALANCE: i64 = 1_000_000;

pub async fn run(database_url: &str, config: &BenchConfig) -> Result<BenchReport> {
    if config.accounts < 2 {
        return Err(Error::invalid("bench needs at least 2 accounts"));
    }
    let scratch = ScratchDb::create(database_url, "transfer_worker_bench", config.workers as u32 * 2 + 8).await?;
    let result = measure(&scratch.pool, config).await;
    scratch.drop().await?;
    result
}

async fn measure(pool: &PgPool, config: &BenchConfig) -> Result<BenchReport> {
    crate::db::migrate(pool).await?;
    seed(pool, config).await?;
    let apply = ApplyConfig { batch_size: config.batch_size, ..ApplyConfig::default() };
    let needs_sqs = config.mode != Mode::Apply;
    let queue = if needs_sqs { Some(ScratchQueue::create().await?) } else { None };

    let started = Instant::now();
    let (applied_per_s, published_per_s, latency_sql) = match config.mode {
        Mode::Apply => {
            drain_apply(pool, &apply, config.workers).await?;
            let s = started.elapsed().as_secs_f64();
            (
                Some(config.transfers as f64 / s),
                None,
                "SELECT (extract(epoch FROM applied_at - created_at) * 1000)::float8 FROM transfers",
            )
        }
        Mode::Relay => {
            drain_apply(pool, &apply, config.workers).await?;
            let queue = queue.as_ref().expect("relay mode has a queue");
            let started = Instant::now();
            let relays: Vec<_> = (0..config.workers)
                .map(|_| {
                    let relay =
                        Relay::new(pool.clone(), queue.publisher.clone(), RelayConfig::default(), Default::default());
                    tokio::spawn(async move {
                        while relay.run_once().await?.claimed > 0 {}
                        Ok::<(), Error>(())
                    })
                })
                .collect();
            for r in relays {
                r.await.map_err(|e| Error::Failed(format!("relay task failed: {e}")))??;
            }
            let s = started.elapsed().as_secs_f64();
            (
                None,
                Some(config.transfers as f64 / s),
                "SELECT (extract(epoch FROM published_at - occurred_at) * 1000)::float8 FROM outbox",
            )
        }
        Mode::Both => {
            let queue = queue.as_ref().expect("both mode has a queue");
            let shutdown = CancellationToken::new();
            let worker_config = WorkerConfig {
                workers: config.workers,
                relays: config.workers,
                apply,
                poll_interval: Duration::from_millis(20),
                ..WorkerConfig::default()
            };
            let running =
                tokio::spawn(worker::run(pool.clone(), queue.publisher.clone(), worker_config, shutdown.clone()));
            loop {
                let left: i64 = sqlx::query_scalar(
                    "SELECT (SELECT count(*) FROM transfers WHERE status = 'PENDING') + (SELECT count(*) FROM outbox WHERE state <> 'published')",
                )
                .fetch_one(pool)
                .await?;
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            shutdown.cancel();
            running.await.map_err(|e| Error::Failed(format!("worker failed: {e}")))??;
            let (applied_s, published_s): (f64, f64) = sqlx::query_as(
                "SELECT extract(epoch FROM (SELECT max(applied_at) FROM transfers) - (SELECT min(created_at) FROM transfers))::float8,
                        extract(epoch FROM (SELECT max(published_at) FROM outbox) - (SELECT min(created_at) FROM transfers))::float8",
            )
            .fetch_one(pool)
            .await?;
            (
                Some(config.transfers as f64 / applied_s.max(1e-9)),
                Some(config.transfers as f64 / published_s.max(1e-9)),
                "SELECT (extract(epoch FROM o.published_at - t.created_at) * 1000)::float8
                   FROM outbox o JOIN transfers t ON t.id = o.transfer_id",
            )
        }
    };
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut samples: Vec<f64> = sqlx::query_scalar(latency_sql).fetch_all(pool).await?;
    samples.sort_by(f64::total_cmp);
    let invariants_ok = invariants_hold(pool, config).await?;
    if let Some(q) = queue {
        q.delete().await;
    }
    Ok(BenchReport {
        mode: config.mode,
        transfers: config.transfers,
        accounts: config.accounts,
        workers: config.workers,
        batch_size: config.batch_size,
        applied_per_s: applied_per_s.unwrap_or(0.0),
        published_per_s: published_per_s.unwrap_or(0.0),
        latency_ms: Latency {
            p50: percentile(&samples, 0.50),
            p95: percentile(&samples, 0.95),
            p99: percentile(&samples, 0.99),
        },
        elapsed_ms,
        invariants_ok,
    })
}

async fn seed(pool: &PgPool, config: &BenchConfig) -> Result<()> {
    seed_random(pool, config.accounts as i64, OPENING_BALANCE, config.transfers, 1_000, 42).await
}

/// Opens accounts `1..=accounts` with `balance` each, then enqueues (by plain
/// SQL, as any producer may) `transfers` random transfers between them of
/// 1..=`max_amount` each, drawn from `rng_seed`. Shared by `bench` and the
/// integration tests.
pub async fn seed_random(
    pool: &PgPool,
    accounts: i64,
    balance: i64,
    transfers: usize,
    max_amount: i64,
    rng_seed: u64,
) -> Result<()> {
    if accounts < 2 {
        return Err(Error::invalid("at least 2 accounts are needed"));
    }
    sqlx::query("INSERT INTO accounts (id, balance) SELECT g, $2 FROM generate_series(1, $1::bigint) g")
        .bind(accounts)
        .bind(balance)
        .execute(pool)
        .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
    for chunk_start in (0..transfers).step_by(10_000) {
        let n = (transfers - chunk_start).min(10_000);
        let (mut keys, mut from, mut to, mut amount) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let f = rng.gen_range(1..=accounts);
            // Any other account: an offset of 1..accounts-1, wrapped.
            let t = (f + rng.gen_range(1..accounts) - 1) % accounts + 1;
            keys.push(format!("seed-{rng_seed}-{}", chunk_start + i));
            from.push(f);
            to.push(t);
            amount.push(rng.gen_range(1..=max_amount));
        }
        sqlx::query(
            "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])",
        )
        .bind(&keys)
        .bind(&from)
        .bind(&to)
        .bind(&amount)
        .execute(pool)
        .await?;
    }
    Ok(())
}

async fn drain_apply(pool: &PgPool, config: &ApplyConfig, workers: usize) -> Result<()> {
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let applier = Applier::new(pool.clone(), config.clone());
            tokio::spawn(async move {
                while applier.run_once().await?.claimed > 0 {}
                Ok::<(), Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| Error::Failed(format!("apply task failed: {e}")))??;
    }
    Ok(())
}

async fn invariants_hold(pool: &PgPool, config: &BenchConfig) -> Result<bool> {
    // Plain aggregates: linear scans, whatever the row counts.
    let (total, negative, pending): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(balance) FROM accounts)::bigint,
                (SELECT count(*) FROM accounts WHERE balance < 0),
                (SELECT count(*) FROM transfers WHERE status = 'PENDING')",
    )
    .fetch_one(pool)
    .await?;
    let (transfers, events, with_events, unpublished): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM transfers), (SELECT count(*) FROM outbox),
                (SELECT count(DISTINCT transfer_id) FROM outbox),
                (SELECT count(*) FROM outbox WHERE state <> 'published')",
    )
    .fetch_one(pool)
    .await?;
    let ok = total == config.accounts as i64 * OPENING_BALANCE
        && negative == 0
        && pending == 0
        && events == transfers
        && with_events == transfers
        && (config.mode == Mode::Apply || unpublished == 0);
    Ok(ok)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[rank] * 1000.0).round() / 1000.0
}

/// A standard queue of the bench's own, deleted afterwards.
struct ScratchQueue {
    publisher: Publisher,
    url: String,
}

impl ScratchQueue {
    async fn create() -> Result<ScratchQueue> {
        let config = |url: String| SqsConfig { queue_url: url, call_timeout: Duration::from_secs(10), concurrency: 8 };
        let probe = Publisher::from_env(&config(String::new())).await;
        let name = format!("transfer-worker-bench-{}-{:08x}", std::process::id(), rand::random::<u32>());
        let url = create_queue(probe.client(), &name).await?;
        Ok(ScratchQueue { publisher: Publisher::new(probe.client().clone(), &config(url.clone())), url })
    }

    async fn delete(self) {
        let _ = self.publisher.client().delete_queue().queue_url(&self.url).send().await;
    }
}

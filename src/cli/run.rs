//! `run`: the worker process. Every knob is a flag with an env-var twin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use transfer_worker::admin::access::MIN_TOKEN_LEN;
use transfer_worker::admin::{AdminConfig, Pools, Role};
use transfer_worker::db::SessionLimits;
use transfer_worker::error::{Error, Result};
use transfer_worker::health::Health;
use transfer_worker::maintenance::MaintenanceConfig;
use transfer_worker::outbox::relay::RelayConfig;
use transfer_worker::outbox::sqs::{client_from_env, Publisher, SqsConfig, DEFAULT_CONCURRENCY};
use transfer_worker::retention::PruneConfig;
use transfer_worker::retry::RetryPolicy;
use transfer_worker::transfer::apply::ApplyConfig;
use transfer_worker::worker::{self, WorkerConfig};

/// Claims and applies transfers, relays the outbox to SQS, until SIGINT or
/// SIGTERM; then finishes in-flight work and exits 0.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The events queue; a URL ending in `.fifo` is a FIFO queue.
    #[arg(long, env = "SQS_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// Apply tasks in this process.
    #[arg(long, env = "TRANSFER_WORKER_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: u32,
    /// Transfers claimed per transaction.
    #[arg(long, env = "TRANSFER_WORKER_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// Longest idle sleep before looking for work again (NOTIFY wakes sooner), in ms.
    #[arg(long, env = "TRANSFER_WORKER_POLL_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub poll_interval_ms: u64,
    /// Unexpected errors before a transfer FAILS with reason processing_error.
    #[arg(long, env = "TRANSFER_WORKER_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,
    /// Times a batch may leave a transfer for a later pass because another
    /// batch holds one of its accounts, before it waits for them in lock
    /// order (0: always wait).
    #[arg(long, env = "TRANSFER_WORKER_MAX_SKIPS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_skips: u32,
    /// Relay tasks in this process.
    #[arg(long, env = "TRANSFER_WORKER_RELAYS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub relays: u32,
    /// Outbox events claimed per relay pass.
    #[arg(long, env = "TRANSFER_WORKER_RELAY_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub relay_batch_size: u32,
    /// SendMessageBatch calls in flight per relay pass.
    #[arg(long, env = "TRANSFER_WORKER_RELAY_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY as u32, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub relay_concurrency: u32,
    /// Rejections by SQS (sender faults) before an event is dead. Outages never count.
    #[arg(long, env = "TRANSFER_WORKER_RELAY_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub relay_max_attempts: u32,
    /// First retry delay (transfer errors, rejected events, outages), in ms.
    #[arg(long, env = "TRANSFER_WORKER_BACKOFF_INITIAL_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub backoff_initial_ms: u64,
    /// Longest retry delay, in ms.
    #[arg(long, env = "TRANSFER_WORKER_BACKOFF_MAX_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub backoff_max_ms: u64,
    /// Bound on one SQS call, in ms.
    #[arg(long, env = "TRANSFER_WORKER_SQS_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub sqs_timeout_ms: u64,
    /// How long shutdown waits for in-flight work, in ms.
    #[arg(long, env = "TRANSFER_WORKER_SHUTDOWN_TIMEOUT_MS", default_value_t = 30_000)]
    pub shutdown_timeout_ms: u64,
    /// PostgreSQL `lock_timeout` of the worker's sessions, in ms (0 = none): a
    /// lock held elsewhere for longer shows up as a logged, retried timeout;
    /// the transfers it concerns are put off, never counted.
    #[arg(long, env = "TRANSFER_WORKER_LOCK_TIMEOUT_MS", default_value_t = 5_000)]
    pub lock_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` of the worker's sessions, in ms (0 = none);
    /// set by the worker whatever the database's default is.
    #[arg(long, env = "TRANSFER_WORKER_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub statement_timeout_ms: u64,
    /// PostgreSQL `idle_in_transaction_session_timeout` of the worker's
    /// sessions, in ms (0 = none): a transaction of ours stalled mid-way is
    /// ended by the server and its locks released.
    #[arg(long, env = "TRANSFER_WORKER_IDLE_IN_TRANSACTION_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_in_transaction_timeout_ms: u64,
    /// Prune events published longer ago than this (30s, 15m, 12h, 7d; `off`: never).
    #[arg(long, env = "TRANSFER_WORKER_PRUNE_PUBLISHED_OLDER_THAN", default_value = "7d", value_parser = parse_optional_age)]
    pub prune_published_older_than: OptionalAge,
    /// Also prune finished transfers applied longer ago than this whose events
    /// are gone (`off`, the default: transfers are the ledger).
    #[arg(long, env = "TRANSFER_WORKER_PRUNE_TRANSFERS_OLDER_THAN", default_value = "off", value_parser = parse_optional_age)]
    pub prune_transfers_older_than: OptionalAge,
    /// Forget the idempotency keys of pruned transfers created longer ago than
    /// this (`off`: never). Until then a retry with such a key gets the
    /// original answer. At least --prune-transfers-older-than.
    #[arg(long, env = "TRANSFER_WORKER_PRUNE_KEYS_OLDER_THAN", default_value = "90d", value_parser = parse_optional_age)]
    pub prune_keys_older_than: OptionalAge,
    /// How often to prune, in ms (one replica at a time).
    #[arg(long, env = "TRANSFER_WORKER_PRUNE_INTERVAL_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub prune_interval_ms: u64,
    /// Token the console's actions (requeue) require, as `Authorization:
    /// Bearer <token>` or the page's field; at least 16 characters. Without
    /// one, actions are open on a loopback address only, and a console on
    /// any other address is read-only. There is no default.
    #[arg(long, env = "TRANSFER_WORKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Host names the console answers to besides IP addresses and
    /// `localhost` (comma-separated): requests naming any other host are
    /// refused (DNS rebinding).
    #[arg(long, env = "TRANSFER_WORKER_ADMIN_ALLOWED_HOSTS", value_delimiter = ',')]
    pub admin_allowed_hosts: Vec<String>,
    /// Address of the admin HTTP server (/, /livez, /readyz, /healthz, /metrics).
    #[arg(long, env = "TRANSFER_WORKER_ADMIN_ADDR", default_value = "127.0.0.1:9187")]
    pub admin_addr: SocketAddr,
}

impl RunArgs {
    /// The library's configuration for these flags.
    pub fn worker_config(&self) -> Result<WorkerConfig> {
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(Error::invalid(format!(
                "--backoff-initial-ms ({}) must not exceed --backoff-max-ms ({})",
                self.backoff_initial_ms, self.backoff_max_ms
            )));
        }
        let retry = RetryPolicy {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            multiplier: 2.0,
        };
        let poll_interval = Duration::from_millis(self.poll_interval_ms);
        Ok(WorkerConfig {
            workers: self.workers as usize,
            relays: self.relays as usize,
            apply: ApplyConfig {
                batch_size: self.batch_size.into(),
                max_attempts: self.max_attempts as i32,
                retry,
                max_skips: self.max_skips,
            },
            relay: RelayConfig {
                batch_size: self.relay_batch_size.into(),
                max_attempts: self.relay_max_attempts as i32,
                rejection_retry: retry,
                outage_retry: retry,
                poll_interval,
                // Set from the SQS client's bounds once it exists (see `run`).
                ..RelayConfig::default()
            },
            poll_interval,
            db_retry: retry,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
            observer: None,
            maintenance: MaintenanceConfig {
                prune: {
                    let prune = PruneConfig {
                        published_older_than: self.prune_published_older_than.0,
                        transfers_older_than: self.prune_transfers_older_than.0,
                        keys_older_than: self.prune_keys_older_than.0,
                    };
                    prune.check().map_err(|e| Error::invalid(format!("--prune-keys-older-than: {e}")))?;
                    prune
                },
                prune_interval: Duration::from_millis(self.prune_interval_ms),
            },
        })
    }

    /// The limits every session of the worker sets for itself.
    pub fn session_limits(&self) -> SessionLimits {
        let ms = |v: u64| Some(Duration::from_millis(v));
        SessionLimits {
            statement_timeout: ms(self.statement_timeout_ms),
            lock_timeout: ms(self.lock_timeout_ms),
            idle_in_transaction_timeout: ms(self.idle_in_transaction_timeout_ms),
        }
    }

    /// The admin server's access settings; a token too short to protect
    /// anything is refused (an empty one is no token).
    pub fn admin_config(&self) -> Result<AdminConfig> {
        let token = self.admin_token.as_ref().map(|t| t.0.clone()).filter(|t| !t.is_empty());
        if let Some(t) = &token {
            if t.chars().count() < MIN_TOKEN_LEN {
                return Err(Error::invalid(format!(
                    "--admin-token (TRANSFER_WORKER_ADMIN_TOKEN) must be at least {MIN_TOKEN_LEN} characters, got {}: \
                     a guessable token protects nothing",
                    t.chars().count()
                )));
            }
        }
        let allowed_hosts: Vec<String> =
            self.admin_allowed_hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
        for h in &allowed_hosts {
            if h.contains(['/', ' ', '@']) || h.contains("://") {
                return Err(Error::invalid(format!("--admin-allowed-hosts: {h:?} is not a host name")));
            }
        }
        Ok(AdminConfig { role: Role::Worker, token, allowed_hosts })
    }

    pub fn sqs_config(&self) -> Result<SqsConfig> {
        let queue_url = self
            .queue_url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::invalid("SQS_QUEUE_URL is not set (set it, or pass --queue-url)"))?;
        if !queue_url.starts_with("http://") && !queue_url.starts_with("https://") {
            return Err(Error::invalid(format!("SQS_QUEUE_URL must be an http(s) URL, got {queue_url:?}")));
        }
        Ok(SqsConfig {
            queue_url,
            call_timeout: Duration::from_millis(self.sqs_timeout_ms),
            concurrency: self.relay_concurrency as usize,
        })
    }
}

/// A value never printed: `Debug` shows `***`.
#[derive(Clone)]
pub struct Secret(String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// An age, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAge(pub Option<Duration>);

pub fn parse_optional_age(text: &str) -> std::result::Result<OptionalAge, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(OptionalAge(None));
    }
    transfer_worker::retention::parse_age(text).map(|d| OptionalAge(Some(d))).map_err(|e| format!("{e}, or off"))
}

/// How long `run` waits at start for the queue to answer `GetQueueAttributes`.
const QUEUE_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(database_url: &Option<String>, args: RunArgs) -> Result<()> {
    let mut config = args.worker_config()?;
    let sqs = args.sqs_config()?;
    let admin_config = args.admin_config()?;
    // Signals first: a SIGTERM during start-up must stop it too.
    let shutdown = transfer_worker::shutdown::on_signals();
    let connections = (config.workers + config.relays + 4) as u32;
    let url = super::require_database_url(database_url)?;
    let pool = transfer_worker::db::connect(url, connections, args.session_limits()).await?;
    // A database without our schema (or with an older one) would have the
    // worker retry forever while looking ready: refuse to start instead.
    transfer_worker::db::check_schema(&pool).await?;
    // One SQS client, from the environment; a publisher for the events queue on it.
    let client = client_from_env(sqs.call_timeout).await;
    let mut publisher = Publisher::new(client, &sqs);
    // Whether the queue is FIFO, from SQS itself when it answers; from the
    // URL otherwise (an SQS outage at start is an outage, not a reason to
    // refuse to apply transfers).
    let queue_check = match tokio::time::timeout(QUEUE_CHECK_TIMEOUT, publisher.check_queue()).await {
        Ok(Ok(info)) => {
            tracing::info!(queue = %sqs.queue_url, fifo = info.fifo, "queue answered GetQueueAttributes");
            Ok(info)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("GetQueueAttributes on {}: no answer within {QUEUE_CHECK_TIMEOUT:?}", sqs.queue_url)),
    };
    if let Err(e) = &queue_check {
        tracing::warn!(
            error = %e, fifo = publisher.is_fifo(),
            "the queue did not answer; FIFO judged from its URL; events wait until SQS answers"
        );
    }
    // A claim must outlast the longest send of a pass, with room to spare.
    let worst = publisher.worst_case_duration(config.relay.batch_size as usize);
    config.relay.lease = worst + Duration::from_secs(5);
    let health = Arc::new(Health::new(shutdown));
    if let Ok(info) = &queue_check {
        health.sqs_answered(format!("queue answered GetQueueAttributes at start; FIFO: {}", info.fifo));
    }
    let admin_pools = Pools::new(transfer_worker::db::parse_url(url)?);
    let admin =
        tokio::spawn(transfer_worker::admin::serve(args.admin_addr, admin_pools.clone(), health.clone(), admin_config));
    let result = worker::run(pool.clone(), publisher, config, health).await;
    admin.abort();
    // Connections still busy (an abandoned query) are not waited for: the
    // process exit closes them, and PostgreSQL rolls back what they held.
    let _ =
        tokio::time::timeout(Duration::from_secs(1), async { tokio::join!(pool.close(), admin_pools.close()) }).await;
    result.map(|_| ())
}

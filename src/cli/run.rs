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
use transfer_worker::outbox::publisher::Publisher;
use transfer_worker::outbox::publisher::DEFAULT_EVENT_SOURCE;
use transfer_worker::outbox::relay::RelayConfig;
use transfer_worker::outbox::route::{self, EventFormat, Route, Routing, Target};
use transfer_worker::outbox::sqs::{aws_config_from_env, SqsConfig, DEFAULT_CONCURRENCY};
use transfer_worker::retention::PruneConfig;
use transfer_worker::retry::RetryPolicy;
use transfer_worker::transfer::apply::ApplyConfig;
use transfer_worker::worker::{self, Outlets, WorkerConfig};

/// Claims and applies transfers, relays the outbox to SQS, until SIGINT or
/// SIGTERM; then finishes in-flight work and exits 0.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The events queue when no --route is given; a URL ending in `.fifo`
    /// is a FIFO queue.
    #[arg(long, env = "SQS_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// Send the events matching PATTERN (an event-type glob: `transfer.*`,
    /// `refund.completed`, `*`) to DESTINATION (an SQS queue URL or an SNS
    /// topic ARN, FIFO ones included), optionally in FORMAT (`native` or
    /// `cloudevents`): `PATTERN=DESTINATION[;FORMAT]`. Repeatable (the env
    /// twin is comma-separated); an event goes to every destination that
    /// matches, each with its own delivery state. Without any, every event
    /// goes to SQS_QUEUE_URL.
    #[arg(
        long = "route",
        env = "TRANSFER_WORKER_ROUTES",
        value_delimiter = ',',
        value_name = "PATTERN=DESTINATION[;FORMAT]"
    )]
    pub routes: Vec<Route>,
    /// The body format of routes that do not name one: `native` (the
    /// contract's body) or `cloudevents` (CloudEvents 1.0 structured JSON
    /// whose data is the native body).
    #[arg(long, env = "TRANSFER_WORKER_EVENT_FORMAT", default_value = "native", value_parser = parse_format)]
    pub event_format: EventFormat,
    /// The `source` of CloudEvents bodies.
    #[arg(long, env = "TRANSFER_WORKER_EVENT_SOURCE", default_value = DEFAULT_EVENT_SOURCE)]
    pub event_source: String,
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
    /// Transfers a second above which an apply task woken for new transfers
    /// waits --gather-ms before it claims, so that one batch (one
    /// transaction, one SQS call) carries several, and the worker polls
    /// every --gather-ms instead of asking producers for a NOTIFY per insert
    /// (0: neither).
    #[arg(long, env = "TRANSFER_WORKER_GATHER_ABOVE", default_value_t = 200)]
    pub gather_above: u32,
    /// How long that wait is, and the polling tick, in ms (at most 1000).
    #[arg(long, env = "TRANSFER_WORKER_GATHER_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub gather_ms: u64,
    /// Relay tasks in this process.
    #[arg(long, env = "TRANSFER_WORKER_RELAYS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub relays: u32,
    /// Outbox events claimed per relay pass.
    #[arg(long, env = "TRANSFER_WORKER_RELAY_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub relay_batch_size: u32,
    /// SendMessageBatch calls in flight per relay task (a destination's
    /// relay tasks share `--relays` times as many).
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
                gather_above: self.gather_above,
                gather_wait: Duration::from_millis(self.gather_ms),
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

    /// The routes: those given, or every event to SQS_QUEUE_URL.
    pub fn routes(&self) -> Result<Vec<Route>> {
        if self.routes.is_empty() {
            let target: Target = self.sqs_config()?.queue_url.parse().map_err(Error::invalid)?;
            return Ok(vec![Route::everything_to(target)]);
        }
        route::check(&self.routes).map_err(Error::invalid)?;
        Ok(self.routes.clone())
    }

    pub fn sqs_config(&self) -> Result<SqsConfig> {
        let queue_url = match (&self.queue_url, self.routes.is_empty()) {
            (Some(u), _) if !u.is_empty() => u.clone(),
            // With routes, the queue URL is not needed.
            (_, false) => String::new(),
            _ => return Err(Error::invalid("SQS_QUEUE_URL is not set (set it, pass --queue-url, or give --route)")),
        };
        if self.routes.is_empty() && !queue_url.starts_with("http://") && !queue_url.starts_with("https://") {
            return Err(Error::invalid(format!("SQS_QUEUE_URL must be an http(s) URL, got {queue_url:?}")));
        }
        Ok(SqsConfig {
            queue_url,
            call_timeout: Duration::from_millis(self.sqs_timeout_ms),
            concurrency: self.relay_concurrency as usize,
        })
    }
}

fn parse_format(text: &str) -> std::result::Result<EventFormat, String> {
    text.parse()
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

/// How long `run` waits at start for each destination to answer
/// (`GetQueueAttributes` / `GetTopicAttributes`).
const QUEUE_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(database_url: &Option<String>, args: RunArgs) -> Result<()> {
    let mut config = args.worker_config()?;
    let sqs = args.sqs_config()?;
    let routes = args.routes()?;
    let admin_config = args.admin_config()?;
    // Signals first: a SIGTERM during start-up must stop it too.
    let shutdown = transfer_worker::shutdown::on_signals();
    let connections = (config.workers + config.relays * routes.len() + 4) as u32;
    let url = super::require_database_url(database_url)?;
    let pool = transfer_worker::db::connect(url, connections, args.session_limits()).await?;
    // A database without our schema (or with an older one) would have the
    // worker retry forever while looking ready: refuse to start instead.
    transfer_worker::db::check_schema(&pool).await?;
    // One AWS configuration from the environment; an SQS and an SNS client on it.
    let aws = aws_config_from_env(sqs.call_timeout).await;
    let (sqs_client, sns_client) = (aws_sdk_sqs::Client::new(&aws), aws_sdk_sns::Client::new(&aws));
    let health = Arc::new(Health::new(shutdown));
    let mut publishers = Vec::with_capacity(routes.len());
    for r in &routes {
        let format = r.format.unwrap_or(args.event_format);
        let mut publisher = Publisher::to(r.target.clone(), sqs_client.clone(), sns_client.clone(), &sqs)
            .with_format(format, &args.event_source);
        check_destination(&mut publisher, r, !args.routes.is_empty(), &health).await?;
        publishers.push(publisher);
    }
    // A claim must outlast the longest send of a pass, with room to spare;
    // a destination's sends in flight share its calls (see `worker::run`),
    // so a pass's calls may wait for those of all the others.
    let in_flight = config.relay.batch_size as usize * config.relay.passes_in_flight * config.relays;
    let worst = publishers
        .iter()
        .map(|p| p.clone().with_calls_in_flight(sqs.concurrency * config.relays).worst_case_duration(in_flight))
        .max();
    config.relay.lease = worst.unwrap_or_default() + Duration::from_secs(5);
    let outlets = Outlets { publishers, routing: Routing::new(routes) };
    let admin_pools = Pools::new(transfer_worker::db::parse_url(url)?);
    let admin =
        tokio::spawn(transfer_worker::admin::serve(args.admin_addr, admin_pools.clone(), health.clone(), admin_config));
    let result = worker::run(pool.clone(), outlets, config, health).await;
    admin.abort();
    // Connections still busy (an abandoned query) are not waited for: the
    // process exit closes them, and PostgreSQL rolls back what they held.
    let _ =
        tokio::time::timeout(Duration::from_secs(1), async { tokio::join!(pool.close(), admin_pools.close()) }).await;
    result.map(|_| ())
}

/// Asks a destination whether it exists and is FIFO. A route the service
/// answers about with an error (no such queue or topic, no permission) is
/// bad input: exit 2, naming the route. No answer at all is an outage, not a
/// reason to refuse to apply transfers: FIFO is judged from the name, and
/// events wait until it answers. (`SQS_QUEUE_URL` without routes keeps that
/// tolerance for every error: a queue deleted mid-run is an outage too.)
async fn check_destination(publisher: &mut Publisher, route: &Route, strict: bool, health: &Health) -> Result<()> {
    let target = route.target.to_string();
    match tokio::time::timeout(QUEUE_CHECK_TIMEOUT, publisher.check()).await {
        Ok(Ok(info)) => {
            tracing::info!(destination = %target, fifo = info.fifo, format = publisher.format().as_str(), "destination answered");
            let call = match route.target {
                Target::SqsQueue(_) => "GetQueueAttributes",
                Target::SnsTopic(_) => "GetTopicAttributes",
            };
            health.sqs_answered(format!("{target} answered {call} at start; FIFO: {}", info.fifo));
            Ok(())
        }
        Ok(Err(e)) if strict && e.code.is_some() => {
            Err(Error::invalid(format!("route {route}: the destination does not answer as one: {e}")))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, destination = %target, fifo = publisher.is_fifo(),
                "the destination did not answer; FIFO judged from its name; its events wait until it answers");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(destination = %target, fifo = publisher.is_fifo(),
                "the destination did not answer within {QUEUE_CHECK_TIMEOUT:?}; FIFO judged from its name");
            Ok(())
        }
    }
}

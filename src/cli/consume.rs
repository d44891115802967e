//! `consume --name N [--queue-url URL] [--database-url URL] [--exec CMD] [--print]`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::task::JoinSet;

use transfer_worker::admin::{AdminConfig, Pools, Role};
use transfer_worker::consumer::{inbox, Consumer, ConsumerConfig, Exec, Handler, Record, MAX_RECEIVE, MAX_WAIT};
use transfer_worker::db::SessionLimits;
use transfer_worker::error::{Error, Result};
use transfer_worker::health::Health;
use transfer_worker::retry::RetryPolicy;
use transfer_worker::service;

use super::run::{parse_optional_age, OptionalAge};

/// Lands each event once per consumer name in `consumed_events` (in the
/// consumer's database, created there if missing), deleting the SQS message
/// only after that commit; duplicates, redeliveries and replays are
/// dropped. Runs until SIGINT/SIGTERM.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The consumer's name: every name gets each event once.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_NAME", value_parser = non_empty)]
    name: String,
    /// The queue to consume (default: SQS_QUEUE_URL).
    #[arg(long, env = "SQS_QUEUE_URL")]
    queue_url: Option<String>,
    /// Run this shell command for each new event, with the event's JSON on
    /// stdin (and TRANSFER_WORKER_EVENT_ID, _EVENT_TYPE, _TRANSFER_ID in its
    /// environment), inside the inbox transaction: exit 0 commits and
    /// deletes the message; anything else rolls back and the event is
    /// retried later with backoff.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_EXEC")]
    exec: Option<String>,
    /// How long --exec may run before it is killed (a failure), in ms.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_EXEC_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    exec_timeout_ms: u64,
    /// Write each newly landed event as one JSON line on stdout.
    #[arg(long)]
    print: bool,
    /// Messages per ReceiveMessage (1-10).
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_BATCH_SIZE", default_value_t = MAX_RECEIVE as u32, value_parser = clap::value_parser!(u32).range(1..=10))]
    batch_size: u32,
    /// Long-polling wait of each receive, in seconds (0-20).
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_WAIT_S", default_value_t = MAX_WAIT.as_secs(), value_parser = clap::value_parser!(u64).range(0..=20))]
    wait_s: u64,
    /// How long a received message stays invisible to other consumers, in
    /// seconds (extended while its handler runs).
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_VISIBILITY_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=43_200))]
    visibility_timeout_s: u64,
    /// Messages (FIFO: message groups) handled at once per receiver.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_CONCURRENCY", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Receive loops in this process.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_RECEIVERS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    receivers: u32,
    /// First retry delay of an event whose handler failed, in ms.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_BACKOFF_INITIAL_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    backoff_initial_ms: u64,
    /// Longest retry delay, in ms.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_BACKOFF_MAX_MS", default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..))]
    backoff_max_ms: u64,
    /// Prune inbox rows received longer ago than this (`off`: never). At
    /// least SQS's longest retention (14 days), or a late redelivery could
    /// land twice.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_RETENTION", default_value = "15d", value_parser = parse_optional_age)]
    retention: OptionalAge,
    /// How often one replica prunes the inbox, in ms.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_PRUNE_INTERVAL_MS", default_value_t = 3_600_000, value_parser = clap::value_parser!(u64).range(1..))]
    prune_interval_ms: u64,
    /// How long SIGTERM waits for events being handled, in ms.
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_SHUTDOWN_TIMEOUT_MS", default_value_t = 30_000)]
    shutdown_timeout_ms: u64,
    /// Address of the consumer's admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "TRANSFER_WORKER_CONSUMER_ADMIN_ADDR", default_value = "127.0.0.1:9188")]
    admin_addr: SocketAddr,
}

fn non_empty(s: &str) -> std::result::Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

/// SQS's longest retention: an inbox kept shorter could let a message SQS
/// still delivers land twice.
const SQS_MAX_RETENTION: Duration = Duration::from_secs(14 * 86_400);

impl ConsumeArgs {
    fn config(&self) -> Result<ConsumerConfig> {
        let queue_url = self
            .queue_url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::invalid("no queue to consume: pass --queue-url or set SQS_QUEUE_URL"))?;
        if !queue_url.starts_with("http://") && !queue_url.starts_with("https://") {
            return Err(Error::invalid(format!("--queue-url must be an http(s) URL, got {queue_url:?}")));
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(Error::invalid("--backoff-initial-ms must not exceed --backoff-max-ms"));
        }
        if self.retention.0.is_some_and(|r| r < SQS_MAX_RETENTION) {
            return Err(Error::invalid(
                "--retention must be at least 14d (SQS's longest retention) or off: a message SQS still delivers must find its inbox row",
            ));
        }
        let mut config = ConsumerConfig::new(self.name.clone(), queue_url);
        config.batch_size = self.batch_size as i32;
        config.wait = Duration::from_secs(self.wait_s);
        config.visibility_timeout = Duration::from_secs(self.visibility_timeout_s);
        config.concurrency = self.concurrency as usize;
        config.retry = RetryPolicy {
            initial: Duration::from_millis(self.backoff_initial_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            multiplier: 2.0,
        };
        config.retention = self.retention.0;
        config.prune_interval = Duration::from_millis(self.prune_interval_ms);
        Ok(config)
    }
}

pub async fn run(database_url: &Option<String>, args: ConsumeArgs) -> Result<()> {
    let config = args.config()?;
    let handler: Arc<dyn Handler> = match &args.exec {
        Some(cmd) => Arc::new(Exec::new(cmd, Duration::from_millis(args.exec_timeout_ms)).map_err(Error::invalid)?),
        None => Arc::new(Record),
    };
    let shutdown = transfer_worker::shutdown::on_signals();
    let url = super::require_database_url(database_url)?;
    let connections = args.receivers * args.concurrency + 2;
    let pool = transfer_worker::db::connect(url, connections, SessionLimits::default()).await?;
    inbox::ensure_table(&pool).await?;
    // A long poll must end before the call's own deadline.
    let client = transfer_worker::outbox::sqs::client_from_env(config.wait + Duration::from_secs(10)).await;
    let mut consumer = Consumer::new(pool.clone(), client, config.clone(), handler).stopping_on(shutdown.clone());
    tokio::time::timeout(Duration::from_secs(10), consumer.check_queue())
        .await
        .map_err(|_| Error::Unavailable(format!("the queue {} did not answer within 10 s", config.queue_url)))??;
    if args.print {
        consumer = consumer.on_landed(Box::new(|d| {
            // Not println!: it panics when stdout's reader has gone away.
            let _ = writeln!(std::io::stdout(), "{}", d.json());
        }));
    }
    let consumer = Arc::new(consumer);
    let health = Arc::new(Health::new(shutdown.clone()));
    let admin_pools = Pools::new(transfer_worker::db::parse_url(url)?);
    let admin = tokio::spawn(transfer_worker::admin::serve(
        args.admin_addr,
        admin_pools.clone(),
        health,
        AdminConfig { role: Role::Consumer, ..AdminConfig::default() },
    ));
    tracing::info!(name = %config.name, queue = %config.queue_url, receivers = args.receivers, "consumer running");
    let mut receivers = JoinSet::new();
    for _ in 0..args.receivers {
        receivers.spawn(service::run(consumer.clone(), shutdown.clone()));
    }
    let died = service::watch(&shutdown, &mut [("a receiver", &mut receivers)]).await;
    let result = match died {
        Some(why) => {
            receivers.abort_all();
            Err(Error::Failed(format!("{why}; the consumer stopped")))
        }
        None => {
            // Finish the events being handled, within the bound; what is
            // abandoned rolls back and comes back after its visibility timeout.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(args.shutdown_timeout_ms);
            while let Ok(Some(_)) = tokio::time::timeout_at(deadline, receivers.join_next()).await {}
            if !receivers.is_empty() {
                tracing::warn!(
                    receivers = receivers.len(),
                    "shutdown deadline: abandoning events being handled; they roll back and come back"
                );
                receivers.abort_all();
            }
            // What was received and not handled yet: handled now, or handed back.
            consumer.finish(deadline.max(tokio::time::Instant::now() + Duration::from_millis(500))).await;
            Ok(())
        }
    };
    admin.abort();
    let _ =
        tokio::time::timeout(Duration::from_secs(1), async { tokio::join!(pool.close(), admin_pools.close()) }).await;
    result
}

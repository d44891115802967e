//! The command line: definitions (whose doc comments are the `--help` text)
//! and dispatch, one file per command. This is the edge where the library's
//! typed errors become messages and exit codes (0 done, 1 failure, 2 bad
//! input, 3 not applied).

mod account;
mod bench;
mod cancel;
mod consume;
mod demo;
mod enqueue;
mod lab;
mod outbox;
mod pause;
mod probe;
mod prune;
mod refund;
mod run;
mod status;
pub mod telemetry;
mod transfer;

use clap::{Parser, Subcommand};
use sqlx::PgPool;

use transfer_worker::db::SessionLimits;
use transfer_worker::error::{Error, Result};

/// Moves money between PostgreSQL accounts and publishes every state change to
/// SQS through a transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "transfer-worker", version, propagate_version = true)]
pub struct Cli {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Log lines as text (colour only on a terminal) or as JSON objects
    /// (level, target, message, fields), one per line, on stderr.
    #[arg(long, env = "TRANSFER_WORKER_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the embedded migrations (safe to run twice, and from several replicas at once).
    Migrate,
    /// Claim and apply transfers, relay the outbox to SQS, until SIGINT/SIGTERM.
    Run(run::RunArgs),
    /// Open or show an account.
    #[command(subcommand)]
    Account(account::AccountCommand),
    /// Enqueue one transfer, or many from JSON lines (--file).
    Enqueue(enqueue::EnqueueArgs),
    /// Request a refund of a SUCCEEDED transfer (the full amount by default).
    Refund(refund::RefundArgs),
    /// Cancel a transfer that is still PENDING.
    Cancel(cancel::CancelArgs),
    /// Consume the events: each lands once per consumer name in
    /// consumed_events (optionally running --exec), until SIGINT/SIGTERM.
    Consume(consume::ConsumeArgs),
    /// Pause a part of the worker (apply, relay, all) on every replica, until `resume`.
    Pause(pause::PauseArgs),
    /// Resume what `pause` paused, on every replica.
    Resume(pause::ResumeArgs),
    /// Operate the outbox.
    #[command(subcommand)]
    Outbox(outbox::OutboxCommand),
    /// Counts per state of transfers, refunds and outbox events.
    Status(status::StatusArgs),
    /// Inspect one transfer.
    #[command(subcommand)]
    Transfer(transfer::TransferCommand),
    /// Delete published events (and, only when asked, finished transfers) older than an age.
    Prune(prune::PruneArgs),
    /// Ask a running worker's admin server (/readyz by default); exit 0 on 200.
    Probe(probe::ProbeArgs),
    /// An end-to-end run on the local services that shows the whole flow.
    Demo(demo::DemoArgs),
    /// The concurrency-strategy experiment (lost updates, retries, throughput).
    Lab(lab::LabArgs),
    /// The benchmark: apply and relay throughput and latency, invariants checked.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Migrate => {
            let url = require_database_url(&cli.database_url)?;
            let pool = transfer_worker::db::connect(url, 2, SessionLimits::for_migrations()).await?;
            transfer_worker::db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Run(args) => run::run(&cli.database_url, args).await,
        Command::Account(cmd) => account::run(&connect(&cli.database_url, 2).await?, cmd).await,
        Command::Enqueue(args) => enqueue::run(&connect(&cli.database_url, 2).await?, args).await,
        Command::Refund(args) => refund::run(&connect(&cli.database_url, 2).await?, args).await,
        Command::Cancel(args) => cancel::run(&connect(&cli.database_url, 2).await?, args).await,
        Command::Consume(args) => consume::run(&cli.database_url, args).await,
        Command::Pause(args) => pause::pause(&connect(&cli.database_url, 2).await?, args).await,
        Command::Resume(args) => pause::resume(&connect(&cli.database_url, 2).await?, args).await,
        Command::Outbox(cmd) => outbox::run(&connect(&cli.database_url, 2).await?, cmd).await,
        Command::Status(args) => status::run(&connect(&cli.database_url, 2).await?, args).await,
        Command::Transfer(cmd) => transfer::run(&connect(&cli.database_url, 2).await?, cmd).await,
        Command::Prune(args) => prune::run(&connect(&cli.database_url, 2).await?, args).await,
        Command::Probe(args) => probe::run(args).await,
        Command::Demo(args) => demo::run(&cli.database_url, args).await,
        Command::Lab(args) => lab::run(&cli.database_url, args).await,
        Command::Bench(args) => bench::run(&cli.database_url, args).await,
    }
}

/// The database URL, with a clear error when it is missing.
pub(crate) fn require_database_url(database_url: &Option<String>) -> Result<&str> {
    database_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Error::invalid("DATABASE_URL is not set (set it, or pass --database-url)"))
}

/// Opens a pool with the default session limits, with a clear error when
/// DATABASE_URL is missing.
pub(crate) async fn connect(database_url: &Option<String>, max_connections: u32) -> Result<PgPool> {
    transfer_worker::db::connect(require_database_url(database_url)?, max_connections, SessionLimits::default()).await
}

/// Prints a value as one line of JSON on stdout. (Not `println!`, which
/// panics when stdout's reader has gone away, e.g. `| head -1`.)
pub(crate) fn print_json(value: &impl serde::Serialize) {
    use std::io::Write;
    let line = serde_json::to_string(value).expect("CLI output always serializes");
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Prints text on stdout, ignoring a reader that went away.
pub(crate) fn print_text(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}

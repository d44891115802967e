//! `lab [--workers W] [--increments M] [--json]`.

use clap::Args;

use crate::cli::print_json;
use crate::tools::fixtures::ScratchDb;
use transfer_worker::error::Result;

/// The concurrency-strategy experiment: W workers add 1 to one counter M times
/// each, with every strategy (naive, atomic, for_update, optimistic, advisory,
/// serializable), on a scratch database that is dropped afterwards.
#[derive(Debug, Args)]
pub struct LabArgs {
    /// Concurrent workers, each on its own connection.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=128))]
    workers: u32,
    /// Increments per worker.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    increments: u32,
    /// Print {"strategies":[{"name","expected","actual","lost","retries","elapsed_ms","ops_per_s"}, ...]}.
    #[arg(long)]
    json: bool,
}

pub async fn run(database_url: &Option<String>, args: LabArgs) -> Result<()> {
    let url = super::require_database_url(database_url)?;
    let scratch = ScratchDb::create(url, "transfer_worker_lab", args.workers + 2).await?;
    let results = crate::tools::lab::run(&scratch.pool, args.workers as usize, args.increments as usize).await;
    scratch.drop().await?;
    let results = results?;
    if args.json {
        print_json(&serde_json::json!({ "strategies": results }));
    } else {
        println!(
            "{:<13} {:>9} {:>9} {:>7} {:>8} {:>11} {:>10}",
            "strategy", "expected", "actual", "lost", "retries", "elapsed_ms", "ops/s"
        );
        for r in results {
            println!(
                "{:<13} {:>9} {:>9} {:>7} {:>8} {:>11.1} {:>10.0}",
                r.name, r.expected, r.actual, r.lost, r.retries, r.elapsed_ms, r.ops_per_s
            );
        }
    }
    Ok(())
}

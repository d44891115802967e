//! `lab [--scenario counter|refund|purchase] [--workers W] [--increments M] [--repeat N] [--json]`.

use clap::Args;

use crate::cli::{print_json, print_text};
use crate::tools::fixtures::ScratchDb;
use crate::tools::lab::{self, Scenario};
use transfer_worker::error::Result;

/// The concurrency experiment, on a scratch database next to DATABASE_URL's
/// (dropped afterwards): every strategy of a scenario, side by side, with
/// what each prevents (lost updates, duplicate refunds or purchases) and
/// what it costs (retries, refusals, time).
#[derive(Debug, Args)]
pub struct LabArgs {
    /// counter: W workers add 1 to one counter M times each; refund: W
    /// concurrent refunds of one payment; purchase: W concurrent purchases
    /// by one user with fresh keys, with and without a guard.
    #[arg(long, value_enum, default_value_t = Scenario::Counter)]
    scenario: Scenario,
    /// Concurrent workers, each on its own connection (default: 2 for
    /// counter, 8 for refund, 4 for purchase).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=128))]
    workers: Option<u32>,
    /// Increments per worker (counter).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    increments: u32,
    /// Runs of each strategy; the table shows min / median / max, the JSON
    /// every run's actual, lost and duplicates.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
    /// Print {"scenario","workers","strategies":[{"name","expected","actual","lost","duplicates",
    /// "refused","retries","elapsed_ms","ops_per_s"}, ...]}.
    #[arg(long)]
    json: bool,
}

pub async fn run(database_url: &Option<String>, args: LabArgs) -> Result<()> {
    let url = super::require_database_url(database_url)?;
    let workers = args.workers.map(|w| w as usize).unwrap_or(args.scenario.default_workers());
    let scratch = ScratchDb::create(url, "transfer_worker_lab", workers as u32 + 2).await?;
    let results = async {
        if args.scenario.needs_schema() {
            transfer_worker::db::migrate(&scratch.pool).await?;
        }
        lab::run(&scratch.pool, args.scenario, workers, args.increments as usize, args.repeat as usize).await
    }
    .await;
    scratch.drop().await?;
    let results = results?;
    let repeat = args.repeat as usize;
    if args.json {
        let mut out = serde_json::json!({
            "scenario": args.scenario,
            "workers": workers,
            "repeat": repeat,
            "strategies": results.iter().map(|r| r.to_json(repeat)).collect::<Vec<_>>(),
        });
        if args.scenario == Scenario::Counter {
            out["increments"] = args.increments.into();
        }
        print_json(&out);
        return Ok(());
    }
    print_text(&format!(
        "{:<13} {:>9} {:>12} {:>12} {:>12} {:>8} {:>8} {:>11} {:>10}",
        "strategy", "expected", "actual", "lost", "duplicates", "refused", "retries", "elapsed_ms", "ops/s"
    ));
    for r in &results {
        let j = r.to_json(repeat);
        let spread = |f: &dyn Fn(&lab::Run) -> i64| {
            let (lo, mid, hi) = r.spread(f);
            if repeat > 1 {
                format!("{lo}/{mid}/{hi}")
            } else {
                mid.to_string()
            }
        };
        print_text(&format!(
            "{:<13} {:>9} {:>12} {:>12} {:>12} {:>8} {:>8} {:>11.1} {:>10.0}",
            r.name,
            j["expected"].as_i64().unwrap_or(0),
            spread(&|run| run.actual),
            spread(&|run| run.lost()),
            spread(&|run| run.duplicates()),
            j["refused"].as_u64().unwrap_or(0),
            j["retries"].as_u64().unwrap_or(0),
            j["elapsed_ms"].as_f64().unwrap_or(0.0),
            j["ops_per_s"].as_f64().unwrap_or(0.0),
        ));
    }
    if repeat > 1 {
        print_text(&format!("(actual, lost, duplicates: min/median/max of {repeat} runs; the rest: the median run)"));
    }
    Ok(())
}

//! `bench [--transfers N] [--accounts A] [--workers K] [--mode apply|relay|both] [--json]`.

use clap::Args;

use crate::bench::{BenchConfig, Mode};
use crate::cli::print_json;
use crate::error::Result;

/// Measures the real apply and relay paths on a scratch database (and a
/// scratch SQS queue for relay/both), then checks the invariants.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Transfers to enqueue and apply.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    transfers: u32,
    /// Accounts the transfers move money between.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(2..=10_000_000))]
    accounts: u32,
    /// Apply tasks, and as many relay tasks (relay and both modes).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    workers: u32,
    /// Transfers claimed per transaction.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Print one JSON object (applied_per_s, published_per_s, latency_ms {p50, p95, p99}, invariants_ok, ...).
    #[arg(long)]
    json: bool,
}

pub async fn run(database_url: &Option<String>, args: BenchArgs) -> Result<()> {
    let url = super::require_database_url(database_url)?;
    let config = BenchConfig {
        transfers: args.transfers as usize,
        accounts: args.accounts as usize,
        workers: args.workers as usize,
        batch_size: args.batch_size.into(),
        mode: args.mode,
    };
    let report = crate::bench::run(url, &config).await?;
    if args.json {
        print_json(&report);
    } else {
        let rate = |r: f64| if r > 0.0 { format!("{r:.0}/s") } else { "-".into() };
        println!(
            "mode {:?}: {} transfers, {} accounts, {} workers, batch {}",
            report.mode, report.transfers, report.accounts, report.workers, report.batch_size
        );
        println!("applied   {}", rate(report.applied_per_s));
        println!("published {}", rate(report.published_per_s));
        let l = &report.latency_ms;
        println!("latency   p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms", l.p50, l.p95, l.p99);
        println!(
            "elapsed   {:.0} ms; invariants {}",
            report.elapsed_ms,
            if report.invariants_ok { "ok" } else { "VIOLATED" }
        );
    }
    if !report.invariants_ok {
        return Err(crate::Error::Failed("bench: invariants violated".into()));
    }
    Ok(())
}

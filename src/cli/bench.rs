//! `bench [--transfers N] [--accounts A] [--workers K] [--mode apply|relay|both|enqueue] [--json]`
//! and `bench --rate R --seconds S [--fifo] [--preload N] [--hot] [--json]`.

use clap::Args;

use crate::cli::print_json;
use crate::tools::bench::{BenchConfig, BenchReport, Dist, Mode};
use transfer_worker::error::Result;

/// Measures the real apply and relay paths on a scratch database (and a
/// scratch SQS queue), each next to its bar measured in the same run (the
/// PostgreSQL ceiling for the apply shape, SQS's own batch rate, SQS's own
/// send -> receive latency), then checks the invariants. Figures only count
/// with PostgreSQL at its durability defaults (fsync on); the report says
/// what the server runs with.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Transfers to enqueue and apply (apply, relay, both).
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
    /// What to measure (ignored with --rate).
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Steady-rate mode: a producer inserting this many transfers per second
    /// while the `run` loop works and a consumer receives the events.
    #[arg(long)]
    rate: Option<f64>,
    /// How long the steady producer runs.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Use a FIFO queue (groups = transfers).
    #[arg(long)]
    fifo: bool,
    /// Finished transfers and published events in the tables before the timed part.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=50_000_000))]
    preload: u32,
    /// Every transfer touches account 1.
    #[arg(long)]
    hot: bool,
    /// Relay tasks of the `run` loop in steady-rate mode (default: run's default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    relays: Option<u32>,
    /// Steady-rate mode: prune events published longer ago than this, every
    /// second (30s, 15m ...), to watch the outbox's footprint level off.
    #[arg(long, value_parser = transfer_worker::retention::parse_age)]
    prune_after: Option<std::time::Duration>,
    /// Steady-rate mode: also measure SQS's own send -> receive at this many
    /// messages/s on a queue and consumer of its own *while* the pipeline
    /// runs, to see how much slower SQS itself is under the run's load than
    /// in the floor measured alone (a diagnostic: it adds that load too).
    #[arg(long)]
    floor_alongside: Option<f64>,
    /// Relay mode: send every event to this many destinations (queues of
    /// their own, each with its own relays and delivery state); the bar is
    /// SQS taking as many deliveries with as many calls in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    destinations: u32,
    /// How long the apply mode measures the PostgreSQL ceiling first (0: skip).
    #[arg(long, default_value_t = 10.0)]
    ceiling_seconds: f64,
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
        rate: args.rate,
        seconds: args.seconds,
        fifo: args.fifo,
        preload: args.preload as usize,
        hot: args.hot,
        ceiling_seconds: args.ceiling_seconds.max(0.0),
        relays: args.relays.map(|r| r as usize),
        prune_after: args.prune_after,
        floor_alongside: args.floor_alongside,
        destinations: args.destinations as usize,
    };
    let report = crate::tools::bench::run(url, &config).await?;
    if args.json {
        print_json(&report);
    } else {
        print_text(&report);
    }
    if !report.invariants_ok {
        return Err(transfer_worker::Error::Failed("bench: invariants violated".into()));
    }
    Ok(())
}

fn print_text(r: &BenchReport) {
    let rate = |r: f64| if r > 0.0 { format!("{r:.0}/s") } else { "-".into() };
    let dist = |d: &Dist| format!("p50 {:.1}, p95 {:.1}, p99 {:.1}, max {:.1} ms", d.p50, d.p95, d.p99, d.max);
    let mode =
        if r.offered_per_s.is_some() { "steady rate (the run loop)".to_string() } else { format!("{:?}", r.mode) };
    println!(
        "mode {}: {} transfers, {} accounts, {} workers, batch {}{}{}{} (fsync {}, synchronous_commit {})",
        mode,
        r.transfers,
        r.accounts,
        r.workers,
        r.batch_size,
        if r.preload > 0 { format!(", {} preloaded", r.preload) } else { String::new() },
        if r.hot { ", hot account" } else { "" },
        if r.fifo { ", FIFO" } else { "" },
        r.fsync,
        r.synchronous_commit
    );
    if let Some(o) = r.offered_per_s {
        println!("offered   {}", rate(o));
    }
    println!("applied   {}", rate(r.applied_per_s));
    if let (Some(c), Some(x)) = (r.ceiling_per_s, r.ceiling_ratio) {
        println!("ceiling   {} (PostgreSQL, same shape, same run): applied = {x:.2} x ceiling", rate(c));
    }
    println!("published {}", rate(r.published_per_s));
    if let (Some(d), true) = (r.delivered_per_s, r.destinations > 1) {
        println!("delivered {} (every event to {} destinations)", rate(d), r.destinations);
    }
    if let (Some(b), Some(x)) = (r.sqs_batch_per_s, r.relay_ratio) {
        println!(
            "SQS alone {} (SendMessageBatch of 10, same client, as many calls in flight): relay = {x:.2} x SQS",
            rate(b)
        );
    }
    let l = &r.latency_ms;
    println!("latency   p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms", l.p50, l.p95, l.p99);
    if let Some(d) = &r.received_latency_ms {
        println!("received  {}  (enqueue -> consumer)", dist(d));
    }
    if let (Some(a), Some(d)) = (r.accepted_per_s, &r.accepted_latency_ms) {
        println!("accepted  {}  (enqueue -> SQS's answer, as the relay recorded it: {} by SQS)", dist(d), rate(a));
    }
    if let Some(d) = &r.floor_latency_ms {
        let took = r.floor_sent_per_s.map(|t| format!(", SQS took {}", rate(t))).unwrap_or_default();
        println!("floor     {}  (SQS alone: send -> consumer{took})", dist(d));
    }
    if let Some(d) = &r.batched_floor_latency_ms {
        let took = r.batched_floor_sent_per_s.map(|t| format!(", SQS took {}", rate(t))).unwrap_or_default();
        println!("batched   {}  (SQS alone, SendMessageBatch of 10 at the same rate{took})", dist(d));
    }
    if let Some(d) = &r.floor_alongside_latency_ms {
        println!("alongside {}  (SQS alone, measured while the pipeline ran)", dist(d));
    }
    if let Some(c) = r.worker_cpu_ms_per_1000 {
        println!("cpu       {c:.0} ms of the worker's CPU per 1,000 transfers (its own threads)");
        if let (Some(f), Some(b)) = (r.floor_cpu_ms_per_1000, r.batched_floor_cpu_ms_per_1000) {
            println!(
                "          SQS alone at the same rate, its senders' threads: {f:.0} ms per 1,000 single sends, \
                 {b:.0} in batches of 10"
            );
        }
    }
    if let Some(b) = r.backlog_max {
        println!("backlog   at most {b} events waiting");
    }
    if let Some(f) = &r.outbox_footprint {
        let line: Vec<String> = f
            .iter()
            .map(|s| format!("{:.0}s {:.1} MiB ({} live, {} dead)", s.at_s, s.mib, s.live_tuples, s.dead_tuples))
            .collect();
        println!("outbox    {}", line.join("; "));
    }
    if let Some(w) = r.lock_wait_ms_per_1000 {
        println!("locks     {w:.1} ms waited per 1,000 transfers");
    }
    if let Some(e) = &r.enqueue_ms {
        println!("enqueue   fresh account: {}", dist(&e.fresh_account));
        println!("enqueue   account with {} transfers today: {}", e.busy_transfers_today, dist(&e.busy_account));
    }
    if let Some(p) = r.preload_s {
        println!("preload   {} rows in {p:.1} s", r.preload);
    }
    if let Some(c) = &r.consume {
        println!(
            "consume   {} vs SQS alone receiving + deleting {}: {:.2} x (median of {} rounds; {:.0} ms CPU per 1,000 events)",
            rate(c.consumed_per_s),
            rate(c.sqs_receive_delete_per_s),
            c.consume_ratio,
            c.rounds.len(),
            c.consumer_cpu_ms_per_1000
        );
        for (i, round) in c.rounds.iter().enumerate() {
            println!(
                "  round {}: SQS alone {} / {}, consumer {} / {} ({} / {} loops): {:.2} x",
                i + 1,
                rate(round.bar_per_s[0]),
                rate(round.bar_per_s[1]),
                rate(round.consumed_per_s[0]),
                rate(round.consumed_per_s[1]),
                c.loops[0],
                c.loops[1],
                round.ratio
            );
        }
    }
    println!("elapsed   {:.0} ms; invariants {}", r.elapsed_ms, if r.invariants_ok { "ok" } else { "VIOLATED" });
}

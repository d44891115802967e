//! `status [--json]`.

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::error::Result;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object: {"transfers":{..},"refunds":{..},"outbox":{..},"oldest_unpublished_age_s":x}.
    #[arg(long)]
    json: bool,
}

pub async fn run(pool: &PgPool, args: StatusArgs) -> Result<()> {
    // Fold the counters' deltas first, so that the read stays small even
    // when no worker has been running to do it.
    transfer_worker::status::compact_counts(pool).await?;
    let status = transfer_worker::status::read(pool).await?;
    if args.json {
        print_json(&status);
    } else {
        println!("{status}");
    }
    Ok(())
}

//! `demo`: the whole flow, end to end, on a scratch database and queue (see
//! [`crate::tools::demo`]).

use std::time::Duration;

use clap::Args;

use transfer_worker::error::Result;

/// An end-to-end run on the local services that shows the whole flow, on a
/// scratch database it creates and drops (never the one DATABASE_URL names).
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Give up waiting for the worker or SQS after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

pub async fn run(database_url: &Option<String>, args: DemoArgs) -> Result<()> {
    let url = super::require_database_url(database_url)?;
    crate::tools::demo::run(url, Duration::from_secs(args.timeout_s)).await
}

//! `prune [--published-older-than D] [--transfers-older-than D] [--keys-older-than D]`.

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::error::{Error, Result};
use transfer_worker::retention::{parse_age, prune, Cursors, PruneConfig};

/// Deletes published events older than an age, and, only when asked,
/// finished transfers older than an age whose events are all gone, in small
/// batches; a pruned transfer's idempotency key is kept (see
/// --keys-older-than). Prints {"published_events":n,"transfers":n,"retired_keys":n}.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Delete events published longer ago than this (30s, 15m, 12h, 7d).
    #[arg(long, value_parser = parse_age)]
    published_older_than: Option<std::time::Duration>,
    /// Also delete finished transfers (SUCCEEDED, FAILED, CANCELLED, no refund
    /// under way) applied longer ago than this whose events are all gone.
    /// Transfers are the ledger: never deleted unless asked.
    #[arg(long, value_parser = parse_age)]
    transfers_older_than: Option<std::time::Duration>,
    /// Forget the idempotency keys of pruned transfers created longer ago
    /// than this (until then a retry with such a key gets the original
    /// answer, never a second transfer). At least --transfers-older-than.
    #[arg(long, value_parser = parse_age)]
    keys_older_than: Option<std::time::Duration>,
}

pub async fn run(pool: &PgPool, args: PruneArgs) -> Result<()> {
    if args.published_older_than.is_none() && args.transfers_older_than.is_none() && args.keys_older_than.is_none() {
        return Err(Error::invalid(
            "prune needs --published-older-than, --transfers-older-than and/or --keys-older-than",
        ));
    }
    let config = PruneConfig {
        published_older_than: args.published_older_than,
        transfers_older_than: args.transfers_older_than,
        keys_older_than: args.keys_older_than,
    };
    config.check().map_err(|e| Error::invalid(format!("--keys-older-than: {e}")))?;
    let pruned = prune(pool, config, &mut Cursors::default()).await?;
    print_json(&pruned);
    Ok(())
}

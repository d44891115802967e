//! `cancel TRANSFER_ID`.

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::error::Result;
use transfer_worker::transfer::cancel::cancel;
use transfer_worker::transfer::TransferId;

/// Cancels a transfer that is still PENDING. Prints
/// {"transfer_id":..,"status":"CANCELLED"}. Exit 3 (nothing written) if it is
/// no longer PENDING; exit 2 if it does not exist.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The transfer to cancel.
    transfer_id: TransferId,
}

pub async fn run(pool: &PgPool, args: CancelArgs) -> Result<()> {
    print_json(&cancel(pool, args.transfer_id).await?);
    Ok(())
}

//! `cancel TRANSFER_ID [--guard G]`.

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::concurrency::advisory::Guard;
use transfer_worker::error::Result;
use transfer_worker::transfer::cancel::cancel_guarded;
use transfer_worker::transfer::TransferId;

/// Cancels a transfer that is still PENDING. Prints
/// {"transfer_id":..,"status":"CANCELLED"}. Exit 3 (nothing written) if it is
/// no longer PENDING; exit 2 if it does not exist.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The transfer to cancel.
    transfer_id: TransferId,
    /// A duplicate-request guard: while another request holding the same
    /// guard is in progress, this one is refused at once (exit 3, nothing
    /// written). SQL producers take it with
    /// `SELECT pg_advisory_xact_lock(transfer_worker_lock_key('guard', G))`.
    #[arg(long)]
    guard: Option<Guard>,
}

pub async fn run(pool: &PgPool, args: CancelArgs) -> Result<()> {
    print_json(&cancel_guarded(pool, args.transfer_id, args.guard.as_ref()).await?);
    Ok(())
}

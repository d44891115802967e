//! `refund TRANSFER_ID [--amount N] [--guard G]`.

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::concurrency::advisory::Guard;
use transfer_worker::error::Result;
use transfer_worker::transfer::refund::request_refund_guarded;
use transfer_worker::transfer::{Amount, TransferId};

/// Requests a refund of a SUCCEEDED transfer; the worker moves the money back.
/// Prints {"transfer_id":..,"refund_status":"REQUESTED","refund_amount":..}.
/// Exit 3 (nothing written) if the transfer is not SUCCEEDED or already has a
/// refund; exit 2 if it does not exist or the amount is out of range.
#[derive(Debug, Args)]
pub struct RefundArgs {
    /// The transfer to refund.
    transfer_id: TransferId,
    /// How much to refund (0 < N <= the transfer's amount); the full amount if omitted.
    #[arg(long, allow_negative_numbers = true)]
    amount: Option<Amount>,
    /// A duplicate-request guard: while another request holding the same
    /// guard is in progress, this one is refused at once (exit 3, nothing
    /// written). SQL producers take it with
    /// `SELECT pg_advisory_xact_lock(transfer_worker_lock_key('guard', G))`.
    #[arg(long)]
    guard: Option<Guard>,
}

pub async fn run(pool: &PgPool, args: RefundArgs) -> Result<()> {
    print_json(&request_refund_guarded(pool, args.transfer_id, args.amount, args.guard.as_ref()).await?);
    Ok(())
}

//! `refund TRANSFER_ID [--amount N]`.

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::error::Result;
use transfer_worker::transfer::refund::request_refund;
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
}

pub async fn run(pool: &PgPool, args: RefundArgs) -> Result<()> {
    print_json(&request_refund(pool, args.transfer_id, args.amount).await?);
    Ok(())
}

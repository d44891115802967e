//! `enqueue --from A --to B --amount N [--key K] [--guard G]` and `enqueue --file F [--guard G]`.

use std::io::Read;
use std::path::PathBuf;

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::account::AccountId;
use transfer_worker::concurrency::advisory::Guard;
use transfer_worker::error::{Error, Result};
use transfer_worker::transfer::enqueue::{self, NewTransfer};
use transfer_worker::transfer::{Amount, IdempotencyKey, TraceParent};

/// Prints `{"transfer_id":..,"status":..,"created":true|false}` per transfer.
/// The same --key with the same parameters returns the existing transfer
/// (created: false); with other parameters it exits 3 and writes nothing.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Source account.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    from: Option<AccountId>,
    /// Destination account (not the source).
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    to: Option<AccountId>,
    /// Amount in minor units (> 0).
    #[arg(long, required_unless_present = "file", conflicts_with = "file", allow_negative_numbers = true)]
    amount: Option<Amount>,
    /// Idempotency key (1 character to 2 KiB); a random one if omitted.
    #[arg(long, conflicts_with = "file")]
    key: Option<IdempotencyKey>,
    /// The producer's W3C trace context (00-<32 hex>-<16 hex>-<2 hex>); every
    /// event of the transfer carries it as the SQS attribute `traceparent`.
    #[arg(long, conflicts_with = "file")]
    traceparent: Option<TraceParent>,
    /// A duplicate-request guard (with --file: for the whole file): while
    /// another request holding the same guard is in progress, this one is
    /// refused at once (exit 3, nothing written). SQL producers take it with
    /// `SELECT pg_advisory_xact_lock(transfer_worker_lock_key('guard', G))`.
    #[arg(long)]
    guard: Option<Guard>,
    /// Enqueue every line of this JSON-lines file (`-` = stdin), all or
    /// nothing: {"from":..,"to":..,"amount":..,"key":..,"traceparent":..}
    /// ("key" and "traceparent" optional).
    #[arg(long)]
    file: Option<PathBuf>,
}

pub async fn run(pool: &PgPool, args: EnqueueArgs) -> Result<()> {
    if let Some(path) = &args.file {
        return run_bulk(pool, path, args.guard.as_ref()).await;
    }
    let (Some(from), Some(to), Some(amount)) = (args.from, args.to, args.amount) else {
        return Err(Error::invalid("enqueue needs --from, --to and --amount, or --file"));
    };
    let transfer =
        NewTransfer::new(from, to, amount, args.key)?.with_traceparent(args.traceparent).with_guard(args.guard);
    print_json(&enqueue::enqueue(pool, &transfer).await?);
    Ok(())
}

async fn run_bulk(pool: &PgPool, path: &PathBuf, guard: Option<&Guard>) -> Result<()> {
    let mut input = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut input).map_err(|e| Error::invalid(format!("cannot read stdin: {e}")))?;
    } else {
        input = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", path.display())))?;
    }
    let lines = enqueue::parse_bulk(&input)?;
    let mut tx = pool.begin().await?;
    if let Some(guard) = guard {
        if let Err(refused) = guard.take(&mut tx).await {
            tx.rollback().await?;
            return Err(refused);
        }
    }
    let results = match enqueue::enqueue_bulk(&mut tx, &lines).await {
        Ok(r) => r,
        Err(e) => {
            tx.rollback().await?;
            return Err(e);
        }
    };
    tx.commit().await?;
    let created = results.iter().filter(|r| r.created).count();
    for r in &results {
        print_json(r);
    }
    eprintln!("enqueued {} transfers ({created} new, {} already there)", results.len(), results.len() - created);
    Ok(())
}

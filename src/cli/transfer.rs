//! `transfer show ID` / `transfer show --key K`.

use clap::Subcommand;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::error::{Error, Result};
use transfer_worker::transfer::show::{show, Lookup};
use transfer_worker::transfer::{IdempotencyKey, TransferId};

#[derive(Debug, Subcommand)]
pub enum TransferCommand {
    /// One transfer with its refund and its events (state, attempts, last
    /// error), as JSON. Exit 2 if there is none.
    Show {
        /// The transfer's id.
        #[arg(required_unless_present = "key", conflicts_with = "key")]
        id: Option<TransferId>,
        /// Find it by its idempotency key instead.
        #[arg(long)]
        key: Option<IdempotencyKey>,
    },
}

pub async fn run(pool: &PgPool, cmd: TransferCommand) -> Result<()> {
    match cmd {
        TransferCommand::Show { id, key } => {
            let lookup = match (id, key) {
                (Some(id), None) => Lookup::Id(id),
                (None, Some(key)) => Lookup::Key(key),
                _ => return Err(Error::invalid("transfer show needs an ID or --key, not both")),
            };
            print_json(&show(pool, &lookup).await?);
        }
    }
    Ok(())
}

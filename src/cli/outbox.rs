//! `outbox requeue [--event ID]`.

use clap::Subcommand;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::error::Result;
use transfer_worker::outbox::requeue::{requeue, EventRef};

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Put dead events back to pending (all, or one), once the cause is fixed.
    /// Prints {"requeued":n}. With --event: exit 2 if it does not exist, exit 3
    /// if it is not dead.
    Requeue {
        /// The event: its outbox id or its event_id (UUID).
        #[arg(long)]
        event: Option<EventRef>,
    },
}

pub async fn run(pool: &PgPool, cmd: OutboxCommand) -> Result<()> {
    match cmd {
        OutboxCommand::Requeue { event } => print_json(&requeue(pool, event.as_ref()).await?),
    }
    Ok(())
}

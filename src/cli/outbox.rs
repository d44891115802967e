//! `outbox requeue [--event ID]` and `outbox replay (--transfer ID | --since T [--until T]) [--type GLOB] [--dry-run]`.

use clap::Subcommand;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::error::{Error, Result};
use transfer_worker::outbox::glob;
use transfer_worker::outbox::replay::{replay, Moment, Selection};
use transfer_worker::outbox::requeue::{requeue, EventRef};
use transfer_worker::outbox::EventType;
use transfer_worker::transfer::TransferId;

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Put dead events back to pending (all, or one), once the cause is fixed.
    /// Prints {"requeued":n}. With --event: exit 2 if it does not exist, exit 3
    /// if it is not dead.
    Requeue {
        /// The event: its outbox id or its event_id (UUID).
        #[arg(long)]
        event: Option<EventRef>,
        /// Only its deliveries to this destination (a queue URL or topic ARN).
        #[arg(long)]
        destination: Option<String>,
    },
    /// Publish already-published events again, with their original event_id,
    /// body and attributes, per transfer in their original order, through the
    /// relay (for a consumer that lost its data, or a new one that needs
    /// history; consumers deduplicate by event_id). Prints
    /// {"replayed":n,"transfers":n,"transfers_without_events":n,"pruned_transfers":n,"dry_run":b}.
    /// Exit 2 for an unknown transfer, a time in the future, --until before
    /// --since, or a --type that matches no event type (nothing queued).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["transfer", "since"])))]
    Replay {
        /// One transfer's events.
        #[arg(long, conflicts_with_all = ["since", "until"])]
        transfer: Option<TransferId>,
        /// Events that occurred at or after T: RFC 3339 (2026-12-02T06:00:00Z)
        /// or an age (30s, 15m, 12h, 7d: that long ago).
        #[arg(long, value_name = "T")]
        since: Option<Moment>,
        /// Events that occurred before T (default now).
        #[arg(long, value_name = "T", requires = "since")]
        until: Option<Moment>,
        /// Only event types matching GLOB (`*` any run, `?` one character):
        /// transfer.*, refund.completed, *.failed.
        #[arg(long = "type", value_name = "GLOB")]
        event_type: Option<String>,
        /// Only the deliveries to this destination (a queue URL or topic
        /// ARN); by default every destination gets its events again.
        #[arg(long)]
        destination: Option<String>,
        /// Count what would be replayed; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(pool: &PgPool, cmd: OutboxCommand) -> Result<()> {
    match cmd {
        OutboxCommand::Requeue { event, destination } => {
            print_json(&requeue(pool, event.as_ref(), destination.as_deref()).await?)
        }
        OutboxCommand::Replay { transfer, since, until, event_type, destination, dry_run } => {
            let types = match event_type {
                Some(pattern) => Some(event_types(&pattern)?),
                None => None,
            };
            let selection = Selection { transfer, since, until, types, destination };
            print_json(&replay(pool, &selection, dry_run).await?)
        }
    }
    Ok(())
}

/// The event types a `--type` glob matches; bad input if none.
fn event_types(pattern: &str) -> Result<Vec<EventType>> {
    let types = glob::event_types(pattern);
    if types.is_empty() {
        let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        return Err(Error::invalid(format!(
            "--type {pattern:?} matches no event type (they are: {}); nothing replayed",
            known.join(", ")
        )));
    }
    Ok(types)
}

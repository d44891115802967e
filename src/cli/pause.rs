//! `pause apply|relay|all [--reason TEXT]` and `resume apply|relay|all`.

use clap::Args;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::controls::{self, Part, PauseState};
use transfer_worker::error::Result;

/// Which part of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Claiming and applying transfers and refunds (producers can still enqueue).
    Apply,
    /// Publishing outbox events (they wait in the outbox).
    Relay,
    /// Both.
    All,
}

impl Which {
    fn parts(self) -> &'static [Part] {
        match self {
            Which::Apply => &[Part::Apply],
            Which::Relay => &[Part::Relay],
            Which::All => &Part::ALL,
        }
    }
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    #[arg(value_enum)]
    part: Which,
    /// Why, and who: shown by `status` and the console (one line, up to 500 characters).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[arg(value_enum)]
    part: Which,
}

/// Prints the new state as {"paused":{"apply":b,"relay":b,"reason":..,"since":..}}.
pub async fn pause(pool: &PgPool, args: PauseArgs) -> Result<()> {
    let state = controls::set(pool, args.part.parts(), true, args.reason.as_deref()).await?;
    print_json(&Paused { paused: &state });
    Ok(())
}

/// Prints the new state, as `pause` does.
pub async fn resume(pool: &PgPool, args: ResumeArgs) -> Result<()> {
    let state = controls::set(pool, args.part.parts(), false, None).await?;
    print_json(&Paused { paused: &state });
    Ok(())
}

/// What `pause` and `resume` print (`status --json`'s "paused" member).
#[derive(serde::Serialize)]
struct Paused<'a> {
    paused: &'a PauseState,
}

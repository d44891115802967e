//! `account open ID --balance N [--daily-limit L]` and `account show ID`.

use clap::Subcommand;
use sqlx::PgPool;

use crate::cli::print_json;
use transfer_worker::account::{self, AccountId};
use transfer_worker::error::Result;

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Open an account; prints it as JSON. Exit 3 if the id is taken.
    Open {
        /// The new account's id.
        id: AccountId,
        /// Opening balance in minor units (>= 0).
        #[arg(long, allow_negative_numbers = true)]
        balance: i64,
        /// Most that may be transferred out on one UTC day (> 0); none if omitted.
        #[arg(long, allow_negative_numbers = true)]
        daily_limit: Option<i64>,
    },
    /// Show an account as JSON. Exit 2 if it does not exist.
    Show {
        /// The account's id.
        id: AccountId,
    },
}

pub async fn run(pool: &PgPool, cmd: AccountCommand) -> Result<()> {
    let account = match cmd {
        AccountCommand::Open { id, balance, daily_limit } => account::open(pool, id, balance, daily_limit).await?,
        AccountCommand::Show { id } => account::show(pool, id).await?,
    };
    print_json(&account);
    Ok(())
}

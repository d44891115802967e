//! Opening an account and reading one back.

use sqlx::PgExecutor;

use super::{Account, AccountId};
use crate::db;
use crate::error::{Error, Refusal, Result};

/// Opens an account. An id that is taken is [`Refusal::AccountExists`] (exit 3);
/// a negative balance or a non-positive limit is [`Error::Invalid`] (exit 2).
pub async fn open<'e>(
    db: impl PgExecutor<'e>,
    id: AccountId,
    balance: i64,
    daily_limit: Option<i64>,
) -> Result<Account> {
    if balance < 0 {
        return Err(Error::invalid(format!("balance must be >= 0, got {balance}")));
    }
    if let Some(limit) = daily_limit {
        if limit <= 0 {
            return Err(Error::invalid(format!("daily limit must be > 0, got {limit}")));
        }
    }
    sqlx::query_as!(
        Account,
        "INSERT INTO accounts (id, balance, daily_limit) VALUES ($1, $2, $3)
         RETURNING id, balance, daily_limit",
        id.0,
        balance,
        daily_limit
    )
    .fetch_one(db)
    .await
    .map_err(|e| match db::violated_constraint(&e) {
        Some("accounts_pkey") => Refusal::AccountExists { account: id }.into(),
        _ => e.into(),
    })
}

/// Reads an account; an unknown id is [`Error::NotFound`] (exit 2).
pub async fn show<'e>(db: impl PgExecutor<'e>, id: AccountId) -> Result<Account> {
    sqlx::query_as!(Account, "SELECT id, balance, daily_limit FROM accounts WHERE id = $1", id.0)
        .fetch_optional(db)
        .await?
        .ok_or(Error::NotFound { what: "account", id: id.0 })
}

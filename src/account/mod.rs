//! Accounts: their id, and (`store`) opening one and reading one back.
//!
//! Balances only ever move inside the worker's transactions (see
//! `transfer::apply`); an account is created with its opening balance and
//! optional daily limit.

mod store;

pub use store::{open, show};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An account's id, as chosen by whoever opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct AccountId(pub i64);

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for AccountId {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        s.trim().parse::<i64>().map(AccountId).map_err(|_| format!("account id must be an integer, got {s:?}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub id: i64,
    pub balance: i64,
    pub daily_limit: Option<i64>,
}

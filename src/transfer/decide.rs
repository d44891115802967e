//! Step 3 of a batch: which claimed rows succeed and which fail, decided in
//! memory, in id order, against running balances and, for transfers, the
//! source's daily limit. Pure: the rules are unit-tested without a database.

use std::collections::HashMap;

use crate::account::AccountId;
use crate::error::{Error, Result};
use crate::transfer::step::{Claimed, LockedAccount, Outcome};
use crate::transfer::{FailureReason, TransferId};

/// What a batch will write.
#[derive(Debug)]
pub struct Plan {
    pub outcomes: Vec<(TransferId, Outcome)>,
    /// Per account that changes: its net balance change and what it sent by
    /// transfer (for the day's total), in account order.
    pub changes: Vec<AccountChange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountChange {
    pub account: AccountId,
    pub delta: i64,
    pub spent: i64,
}

/// Decides each row in id order against running balances, and, for
/// transfers (`limited`), against the source's daily limit: what it sent
/// today (read under its lock) plus what this batch already took from it.
pub fn decide(claimed: &[Claimed], accounts: &[LockedAccount], limited: bool) -> Result<Plan> {
    let mut balance: HashMap<AccountId, i64> = accounts.iter().map(|a| (a.id, a.balance)).collect();
    let mut spent: HashMap<AccountId, i64> = accounts.iter().map(|a| (a.id, a.spent_today)).collect();
    let limits: HashMap<AccountId, Option<i64>> = accounts.iter().map(|a| (a.id, a.daily_limit)).collect();
    let mut changes: HashMap<AccountId, AccountChange> = HashMap::new();
    let mut outcomes = Vec::with_capacity(claimed.len());
    for t in claimed {
        let (debit, credit) = (t.debit_account, t.credit_account);
        let from = *balance.get(&debit).ok_or(Error::NotFound { what: "account", id: debit.0 })?;
        let to = *balance.get(&credit).ok_or(Error::NotFound { what: "account", id: credit.0 })?;
        let over_limit = limited && limits[&debit].is_some_and(|limit| spent[&debit].saturating_add(t.amount) > limit);
        let outcome = if from < t.amount {
            Outcome::Failed(FailureReason::InsufficientFunds)
        } else if over_limit {
            Outcome::Failed(FailureReason::DailyLimitExceeded)
        } else {
            let credited = to
                .checked_add(t.amount)
                .ok_or_else(|| Error::invalid(format!("balance of account {credit} would overflow")))?;
            balance.insert(debit, from - t.amount);
            balance.insert(credit, credited);
            let change = |account| AccountChange { account, delta: 0, spent: 0 };
            let d = changes.entry(debit).or_insert_with(|| change(debit));
            d.delta -= t.amount;
            if limited {
                // Saturating: an unlimited account may send more than
                // i64::MAX in a day; that is just "over any limit".
                d.spent = d.spent.saturating_add(t.amount);
                let total = spent.get_mut(&debit).expect("every claimed account was read");
                *total = total.saturating_add(t.amount);
            }
            changes.entry(credit).or_insert_with(|| change(credit)).delta += t.amount;
            Outcome::Succeeded
        };
        outcomes.push((t.id, outcome));
    }
    let mut changes: Vec<AccountChange> = changes.into_values().filter(|c| c.delta != 0 || c.spent != 0).collect();
    changes.sort_unstable_by_key(|c| c.account);
    Ok(Plan { outcomes, changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: i64, from: i64, to: i64, amount: i64) -> Claimed {
        Claimed {
            id: TransferId(id),
            debit_account: AccountId(from),
            credit_account: AccountId(to),
            amount,
            created_epoch: 0.0,
            traceparent: None,
        }
    }

    fn acct(id: i64, balance: i64, daily_limit: Option<i64>, spent_today: i64) -> LockedAccount {
        LockedAccount { id: AccountId(id), balance, daily_limit, spent_today }
    }

    fn change(account: i64, delta: i64, spent: i64) -> AccountChange {
        AccountChange { account: AccountId(account), delta, spent }
    }

    fn ok(id: i64) -> (TransferId, Outcome) {
        (TransferId(id), Outcome::Succeeded)
    }

    fn failed(id: i64, reason: FailureReason) -> (TransferId, Outcome) {
        (TransferId(id), Outcome::Failed(reason))
    }

    #[test]
    fn later_transfers_see_the_balances_left_by_earlier_ones() {
        let claimed = [t(1, 1, 2, 60), t(2, 1, 2, 60), t(3, 2, 1, 100)];
        let plan = decide(&claimed, &[acct(1, 100, None, 0), acct(2, 50, None, 0)], true).unwrap();
        assert_eq!(plan.outcomes, vec![ok(1), failed(2, FailureReason::InsufficientFunds), ok(3)]);
        // 1 -> 2: 60, 2 -> 1: 100; net +40 / -40; each sent what it sent.
        assert_eq!(plan.changes, vec![change(1, 40, 60), change(2, -40, 100)]);
    }

    #[test]
    fn daily_limit_counts_what_already_left_the_account_that_day() {
        let claimed = [t(1, 1, 2, 30), t(2, 1, 2, 30)];
        let accounts = [acct(1, 1000, Some(100), 50), acct(2, 0, None, 0)];
        let plan = decide(&claimed, &accounts, true).unwrap();
        assert_eq!(plan.outcomes, vec![ok(1), failed(2, FailureReason::DailyLimitExceeded)]);
        assert_eq!(plan.changes, vec![change(1, -30, 30), change(2, 30, 0)]);
        // Refunds are not limited, and not counted as sent.
        let plan = decide(&claimed, &accounts, false).unwrap();
        assert_eq!(plan.outcomes, vec![ok(1), ok(2)]);
        assert_eq!(plan.changes, vec![change(1, -60, 0), change(2, 60, 0)]);
    }

    #[test]
    fn an_account_that_sends_and_receives_as_much_still_counts_what_it_sent() {
        let claimed = [t(1, 1, 2, 10), t(2, 2, 1, 10)];
        let plan = decide(&claimed, &[acct(1, 10, None, 0), acct(2, 0, None, 0)], true).unwrap();
        assert_eq!(plan.changes, vec![change(1, 0, 10), change(2, 0, 10)]);
    }

    #[test]
    fn a_days_total_saturates_instead_of_overflowing() {
        let claimed = [t(1, 1, 2, 10)];
        let plan = decide(&claimed, &[acct(1, 10, Some(100), i64::MAX - 5), acct(2, 0, None, 0)], true).unwrap();
        assert_eq!(plan.outcomes, vec![failed(1, FailureReason::DailyLimitExceeded)]);
        let plan = decide(&claimed, &[acct(1, 10, None, i64::MAX - 5), acct(2, 0, None, 0)], true).unwrap();
        assert_eq!(plan.outcomes, vec![ok(1)]);
    }

    #[test]
    fn an_overflowing_credit_is_an_error_not_a_wrap() {
        let claimed = [t(1, 1, 2, 10)];
        assert!(decide(&claimed, &[acct(1, 10, None, 0), acct(2, i64::MAX - 5, None, 0)], true).is_err());
    }
}

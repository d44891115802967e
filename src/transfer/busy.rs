//! Accounts held elsewhere: what keeps a lock taken outside the worker from
//! delaying the transfers that do not need it.
//!
//! Another session may hold an account's row lock for any time (an
//! operator's `SELECT ... FOR UPDATE` in an open psql, a slow batch job, a
//! producer that locks accounts itself). A batch never waits for such a lock
//! if it can skip it (`SKIP LOCKED`), but the transfers on that account would
//! still be claimed into every batch, taking the slots of the transfers that
//! could go through, and a transfer skipped often enough waits its turn for
//! the lock. So:
//!
//! - a turn is waited for at most [`TURN_WAIT`] (a savepoint and a local
//!   `lock_timeout`): our own batches hold an account for milliseconds, so a
//!   lock still held after that is someone else's;
//! - the accounts found held that long are remembered here as busy, and
//!   claims leave their transfers alone (`NOT (from_account = ANY(busy) OR
//!   to_account = ANY(busy))`) until a short, growing back-off ends: then one
//!   claim tries again; found held again, they are busy again at once,
//!   without a wait; found free, they are forgotten.
//!
//! So while the lock lasts, its account's transfers cost one batch's slots
//! about once a [`MAX_BACKOFF`], no batch waits more than once per account,
//! and the other transfers are applied as usual; once the lock goes they are
//! applied within about [`MAX_BACKOFF`]. One `BusyAccounts` is shared by the
//! apply tasks of a process; each replica learns on its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::account::AccountId;

/// The longest a batch waits for the accounts of a transfer whose turn came
/// (it was skipped `max_skips` times). Our own batches hold an account for a
/// few milliseconds (a commit with fsync included).
pub const TURN_WAIT: Duration = Duration::from_millis(250);

/// How long an account found held stays out of claims the first time.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// The longest an account stays out of claims before one claim tries again
/// (so its transfers go at most about this long after the lock is released).
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// At most this many accounts are left out of claims at once (the list is a
/// claim parameter); beyond it, the longest-known ones are kept.
const MAX_BUSY: usize = 1_000;

#[derive(Debug, Clone, Copy)]
struct Busy {
    until: Instant,
    strikes: u32,
}

/// Accounts another session holds (see the module docs).
#[derive(Debug, Default)]
pub struct BusyAccounts {
    accounts: Mutex<HashMap<AccountId, Busy>>,
}

impl BusyAccounts {
    /// The accounts claims must leave out now.
    pub fn current(&self) -> Vec<AccountId> {
        let accounts = self.accounts.lock().expect("busy accounts lock");
        if accounts.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        accounts.iter().filter(|(_, b)| b.until > now).map(|(id, _)| *id).collect()
    }

    /// Whether `account` is left out of claims now.
    pub fn is_busy(&self, account: AccountId) -> bool {
        let accounts = self.accounts.lock().expect("busy accounts lock");
        accounts.get(&account).is_some_and(|b| b.until > Instant::now())
    }

    /// `held` were found held by someone else after a wait of [`TURN_WAIT`]:
    /// leave them out of claims for a while, longer each time in a row.
    pub fn held(&self, held: &[AccountId]) {
        if held.is_empty() {
            return;
        }
        let mut accounts = self.accounts.lock().expect("busy accounts lock");
        let now = Instant::now();
        for id in held {
            let b = accounts.entry(*id).or_insert(Busy { until: now, strikes: 0 });
            b.strikes = b.strikes.saturating_add(1);
            b.until = now + backoff(b.strikes);
        }
        if accounts.len() > MAX_BUSY {
            let mut by_strikes: Vec<(AccountId, u32)> = accounts.iter().map(|(id, b)| (*id, b.strikes)).collect();
            by_strikes.sort_unstable_by_key(|(_, s)| std::cmp::Reverse(*s));
            for (id, _) in by_strikes.split_off(MAX_BUSY) {
                accounts.remove(&id);
            }
        }
    }

    /// A batch could not take `skipped` without waiting. Those already known
    /// to be held elsewhere are busy again at once (no wait needed to tell);
    /// the others are probably another batch's, for milliseconds.
    pub fn skipped(&self, skipped: &[AccountId]) {
        let again: Vec<AccountId> = {
            let accounts = self.accounts.lock().expect("busy accounts lock");
            if accounts.is_empty() {
                return;
            }
            skipped.iter().copied().filter(|id| accounts.contains_key(id)).collect()
        };
        self.held(&again);
    }

    /// A batch took `taken`: whatever held them let go.
    pub fn taken(&self, taken: impl IntoIterator<Item = AccountId>) {
        let mut accounts = self.accounts.lock().expect("busy accounts lock");
        if accounts.is_empty() {
            return;
        }
        for id in taken {
            accounts.remove(&id);
        }
    }
}

fn backoff(strikes: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1u32 << strikes.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_account_is_left_out_until_its_backoff_ends_and_forgotten_once_taken() {
        let busy = BusyAccounts::default();
        let (a7, a8) = (AccountId(7), AccountId(8));
        assert!(busy.current().is_empty());
        busy.held(&[a7]);
        assert_eq!(busy.current(), vec![a7]);
        assert!(busy.is_busy(a7) && !busy.is_busy(a8));
        // Skipped again while known: busy again; an unknown skipped account is not.
        busy.skipped(&[a7, a8]);
        assert!(busy.is_busy(a7) && !busy.is_busy(a8));
        busy.taken([a7]);
        assert!(busy.current().is_empty());
    }

    #[test]
    fn the_backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(100), MAX_BACKOFF);
    }
}

//! Step 2 of a batch: the row locks on the claimed rows' accounts, and what
//! the batch learns about accounts someone else holds.
//!
//! FOR NO KEY UPDATE, not FOR UPDATE: a producer whose transaction inserted
//! a transfer holds a KEY SHARE lock on both accounts (the foreign-key check)
//! until it commits, and FOR UPDATE would wait for it; a balance change never
//! touches the key, so the weaker lock suffices.
//!
//! Deadlock freedom: every lock a transaction *waits* for is taken in
//! ascending id order, in one statement, before it takes any lock with SKIP
//! LOCKED (which never waits). So no transaction ever waits while holding a
//! lock with a higher id than the one it waits for.

use std::collections::HashSet;

use sqlx::PgConnection;

use crate::account::AccountId;
use crate::db::{self, Fault};
use crate::error::Result;
use crate::transfer::step::{Claimed, LockedAccount};
use crate::transfer::TransferId;

/// How a batch takes its accounts' row locks.
#[derive(Debug)]
pub enum Locking<'a> {
    /// Already taken by the claim's own statement, with SKIP LOCKED
    /// (`store::begin_and_claim`): these are the ones it got.
    Taken(Vec<LockedAccount>),
    /// Wait for every account, in ascending id order, with the session's
    /// `lock_timeout` (`--max-skips 0`).
    Wait,
    /// Take the accounts nobody holds (`SKIP LOCKED`) and apply only the rows
    /// whose accounts were all taken; the others stay PENDING for a later
    /// pass. Rows in `must_wait` (skipped too often already) wait their turn
    /// instead, so that a hot account cannot starve them, but at most
    /// [`TURN_WAIT`](crate::transfer::busy::TURN_WAIT) (see [`wait_turn`]).
    SkipLocked { must_wait: &'a HashSet<TransferId> },
}

/// The account locks a batch took, and what it learnt about the others.
#[derive(Debug, Default)]
pub struct Locks {
    /// The accounts it holds now, with what it read of them under the lock.
    pub accounts: Vec<LockedAccount>,
    /// Their ids.
    pub taken: Vec<AccountId>,
    /// Still held by someone else after a wait of `TURN_WAIT`.
    pub held_elsewhere: Vec<AccountId>,
    /// Held by someone else when asked with `SKIP LOCKED` (never waited for).
    pub not_taken: Vec<AccountId>,
    /// The SQLSTATE of a turn's wait that timed out (a retried contention,
    /// for the metrics).
    pub waited_out: Option<String>,
}

impl Locks {
    /// Whether both of a row's accounts are held by this batch.
    pub fn covers(&self, row: &Claimed) -> bool {
        row.accounts().iter().all(|a| self.taken.contains(a))
    }
}

fn accounts_of<'a>(rows: impl Iterator<Item = &'a Claimed>) -> Vec<AccountId> {
    let mut ids: Vec<AccountId> = rows.flat_map(Claimed::accounts).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Locks the accounts of `claimed` as `locking` says (see the module docs).
pub async fn lock_accounts(conn: &mut PgConnection, claimed: &[Claimed], locking: Locking<'_>) -> Result<Locks> {
    let mut locks = Locks::default();
    let rest = match locking {
        Locking::Taken(taken) => return Ok(taken_with_claim(claimed, taken)),
        Locking::Wait => {
            locks.accounts = lock_waiting(conn, &accounts_of(claimed.iter())).await?;
            Vec::new()
        }
        Locking::SkipLocked { must_wait } => {
            let turn = accounts_of(claimed.iter().filter(|t| must_wait.contains(&t.id)));
            if !turn.is_empty() {
                let (taken, held, waited_out) = wait_turn(conn, &turn).await?;
                locks.accounts = taken;
                locks.held_elsewhere = held;
                locks.waited_out = waited_out;
            }
            accounts_of(claimed.iter()).into_iter().filter(|a| turn.binary_search(a).is_err()).collect()
        }
    };
    if !rest.is_empty() {
        let taken = lock_skipping(conn, &rest).await?;
        locks.skipped_for(rest, taken);
    }
    locks.taken = locks.accounts.iter().map(|a| a.id).collect();
    Ok(locks)
}

/// The locks of a batch whose claim took its accounts itself, with SKIP
/// LOCKED (`store::begin_and_claim`): `taken` is what it got.
fn taken_with_claim(claimed: &[Claimed], taken: Vec<LockedAccount>) -> Locks {
    let mut locks = Locks::default();
    locks.skipped_for(accounts_of(claimed.iter()), taken);
    locks.taken = locks.accounts.iter().map(|a| a.id).collect();
    locks
}

impl Locks {
    /// Notes what asking for `asked` with SKIP LOCKED gave: `got`.
    fn skipped_for(&mut self, asked: Vec<AccountId>, got: Vec<LockedAccount>) {
        let ids: HashSet<AccountId> = got.iter().map(|a| a.id).collect();
        self.not_taken.extend(asked.into_iter().filter(|a| !ids.contains(a)));
        self.accounts.extend(got);
    }
}

fn raw(ids: &[AccountId]) -> Vec<i64> {
    ids.iter().map(|a| a.0).collect()
}

async fn lock_waiting(conn: &mut PgConnection, ids: &[AccountId]) -> sqlx::Result<Vec<LockedAccount>> {
    sqlx::query_as!(
        LockedAccount,
        r#"SELECT id AS "id: AccountId", balance, daily_limit,
                  CASE WHEN spent_day = (now() AT TIME ZONE 'UTC')::date THEN spent_today ELSE 0 END AS "spent_today!"
             FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"#,
        &raw(ids)
    )
    .fetch_all(&mut *conn)
    .await
}

async fn lock_skipping(conn: &mut PgConnection, ids: &[AccountId]) -> sqlx::Result<Vec<LockedAccount>> {
    sqlx::query_as!(
        LockedAccount,
        r#"SELECT id AS "id: AccountId", balance, daily_limit,
                  CASE WHEN spent_day = (now() AT TIME ZONE 'UTC')::date THEN spent_today ELSE 0 END AS "spent_today!"
             FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED"#,
        &raw(ids)
    )
    .fetch_all(&mut *conn)
    .await
}

/// Opens a savepoint and lowers `lock_timeout` to `TURN_WAIT` inside it
/// (both undone by a rollback to the savepoint).
pub const TURN_BEGIN: &str = "SAVEPOINT turn; SET LOCAL lock_timeout = '250ms'";
/// Keeps what the wait took; the rest of the batch runs with the session's
/// own `lock_timeout` again.
const TURN_TAKEN: &str = "RELEASE SAVEPOINT turn; SET LOCAL lock_timeout TO DEFAULT";
const TURN_HELD: &str = "ROLLBACK TO SAVEPOINT turn";

/// Waits for `ids` in lock order, but at most `TURN_WAIT`: our own
/// batches hold an account for milliseconds, so one still held after that is
/// held by another session, for who knows how long. Then it takes what it
/// can without waiting and returns the others as held elsewhere; the batch
/// goes on without them, and the timeout's SQLSTATE is reported.
async fn wait_turn(
    conn: &mut PgConnection,
    ids: &[AccountId],
) -> Result<(Vec<LockedAccount>, Vec<AccountId>, Option<String>)> {
    sqlx::raw_sql(TURN_BEGIN).execute(&mut *conn).await?;
    match lock_waiting(conn, ids).await {
        Ok(taken) => {
            sqlx::raw_sql(TURN_TAKEN).execute(&mut *conn).await?;
            Ok((taken, Vec::new(), None))
        }
        Err(e) if db::fault(&e) == Fault::Contention => {
            sqlx::raw_sql(TURN_HELD).execute(&mut *conn).await?;
            let taken = lock_skipping(conn, ids).await?;
            let held = ids.iter().copied().filter(|id| !taken.iter().any(|a| a.id == *id)).collect();
            Ok((taken, held, db::sqlstate(&e)))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::transfer::busy::TURN_WAIT;

    #[test]
    fn a_turn_waits_as_long_as_documented() {
        assert!(TURN_BEGIN.contains(&format!("'{}ms'", TURN_WAIT.as_millis())), "{TURN_BEGIN}");
    }
}

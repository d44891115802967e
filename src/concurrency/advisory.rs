//! Advisory locks: PostgreSQL's application-defined locks, on 64-bit keys.
//!
//! Keys come in the two forms PostgreSQL has: one `bigint`, here usually a
//! string hashed in a namespace ([`LockKey::hashed`]), or a pair of `int4`
//! ([`LockKey::pair`]; PostgreSQL keeps the two forms apart, so a pair never
//! collides with a hashed key).
//!
//! The hash is the first 8 bytes (big-endian, as a signed `bigint`) of
//! SHA-256 over `<byte length of namespace>:<namespace><key>` (UTF-8; the
//! length prefix makes `("ab", "c")` and `("a", "bc")` different keys).
//! SHA-256 rather than PostgreSQL's internal `hashtextextended`: it is a
//! standard every PostgreSQL-compatible engine and every client language has
//! (PostgreSQL 11+ `sha256()`, CockroachDB, YugabyteDB, Aurora, AlloyDB), so
//! a producer in any language, or plain SQL through the migration's
//! `transfer_worker_lock_key(namespace, key)`, computes exactly the key this
//! library does. Two different strings share a key with probability 2^-64;
//! with k keys held at once, a false conflict somewhere has probability about
//! k² / 2^65 (1e-8 for a million keys held at the same instant), and its only
//! effect is that two unrelated requests wait for (or refuse) each other.
//!
//! Locks:
//! - [`xact_lock`] / [`try_xact_lock`]: held by the current transaction until
//!   it ends (commit or rollback): nothing to forget. Inside a savepoint they
//!   still belong to the whole transaction.
//! - [`SessionLock`]: held by one pooled connection until [`SessionLock::release`];
//!   if it is dropped instead (an early return, a panic), the connection is
//!   closed rather than returned to the pool, and closing the session
//!   releases the lock: a pooled connection never goes back holding one.
//!
//! Values are always bound parameters, never formatted into SQL.
//!
//! # Example
//!
//! ```rust,ignore
//! let guard = Guard::new("user-42:purchase")?;
//! let mut tx = pool.begin().await?;
//! guard.take(&mut tx).await?; // Err(Refusal::GuardHeld) at once if another request holds it
//! // ... the request's work; the guard is released when `tx` ends ...
//! tx.commit().await?;
//!
//! let lock = SessionLock::try_acquire(&pool, LockKey::hashed("jobs", "nightly")).await?;
//! if let Some(lock) = lock {
//!     // ... only one process gets here ...
//!     lock.release().await?; // dropped instead: its connection is closed, never pooled holding the lock
//! }
//! ```
//!
//! (`examples/guard.rs` runs it.)

use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

use crate::error::{Error, Result};

/// An advisory lock's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockKey {
    /// The one-`bigint` form.
    Int(i64),
    /// The two-`int4` form.
    Pair(i32, i32),
}

impl LockKey {
    /// A string key in a namespace, hashed to 64 bits (see the module docs);
    /// SQL: `transfer_worker_lock_key(namespace, key)`.
    pub fn hashed(namespace: &str, key: &str) -> LockKey {
        LockKey::Int(hash_key(namespace, key))
    }

    /// The `(int4, int4)` form, e.g. (table or kind, row id).
    pub fn pair(a: i32, b: i32) -> LockKey {
        LockKey::Pair(a, b)
    }
}

/// The 64-bit key of `key` in `namespace` (see the module docs).
pub fn hash_key(namespace: &str, key: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(format!("{}:", namespace.len()).as_bytes());
    h.update(namespace.as_bytes());
    h.update(key.as_bytes());
    let digest = h.finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// Waits for the lock, then holds it until the current transaction ends.
/// (Outside a transaction it would be released at once: call it on a
/// transaction.)
pub async fn xact_lock(conn: &mut PgConnection, key: LockKey) -> sqlx::Result<()> {
    match key {
        LockKey::Int(k) => {
            sqlx::query!(r#"SELECT 1 AS "locked!" FROM pg_advisory_xact_lock($1)"#, k).fetch_one(conn).await?;
        }
        LockKey::Pair(a, b) => {
            sqlx::query!(r#"SELECT 1 AS "locked!" FROM pg_advisory_xact_lock($1, $2)"#, a, b).fetch_one(conn).await?;
        }
    }
    Ok(())
}

/// Waits for every lock, in the order given (callers sort by a global
/// order, so that two transactions taking overlapping sets cannot
/// deadlock), in one round trip; held until the transaction ends.
pub async fn xact_lock_all(conn: &mut PgConnection, keys: &[i64]) -> sqlx::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        r#"SELECT count(pg_advisory_xact_lock(k)) AS "locked!"
             FROM (SELECT k FROM unnest($1::bigint[]) WITH ORDINALITY AS u(k, i) ORDER BY i) ordered"#,
        keys
    )
    .fetch_one(conn)
    .await?;
    Ok(())
}

/// Takes the lock if nobody holds it, without waiting; true if taken (then
/// held until the current transaction ends).
pub async fn try_xact_lock(conn: &mut PgConnection, key: LockKey) -> sqlx::Result<bool> {
    match key {
        LockKey::Int(k) => {
            sqlx::query_scalar!(r#"SELECT pg_try_advisory_xact_lock($1) AS "taken!""#, k).fetch_one(conn).await
        }
        LockKey::Pair(a, b) => {
            sqlx::query_scalar!(r#"SELECT pg_try_advisory_xact_lock($1, $2) AS "taken!""#, a, b).fetch_one(conn).await
        }
    }
}

/// A session-scoped advisory lock, held by the pooled connection inside
/// this value. Release it with [`SessionLock::release`]; dropped without
/// that, the connection is closed (which releases the lock) instead of
/// going back to the pool still holding it.
pub struct SessionLock {
    conn: Option<PoolConnection<Postgres>>,
    key: LockKey,
}

impl SessionLock {
    /// Waits for the lock.
    pub async fn acquire(pool: &PgPool, key: LockKey) -> Result<SessionLock> {
        let mut conn = pool.acquire().await?;
        match key {
            LockKey::Int(k) => {
                sqlx::query!(r#"SELECT 1 AS "locked!" FROM pg_advisory_lock($1)"#, k).fetch_one(&mut *conn).await?;
            }
            LockKey::Pair(a, b) => {
                sqlx::query!(r#"SELECT 1 AS "locked!" FROM pg_advisory_lock($1, $2)"#, a, b)
                    .fetch_one(&mut *conn)
                    .await?;
            }
        }
        Ok(SessionLock { conn: Some(conn), key })
    }

    /// Takes the lock if nobody holds it; None if someone does.
    pub async fn try_acquire(pool: &PgPool, key: LockKey) -> Result<Option<SessionLock>> {
        let mut conn = pool.acquire().await?;
        let taken = match key {
            LockKey::Int(k) => {
                sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1) AS "taken!""#, k).fetch_one(&mut *conn).await?
            }
            LockKey::Pair(a, b) => {
                sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1, $2) AS "taken!""#, a, b)
                    .fetch_one(&mut *conn)
                    .await?
            }
        };
        Ok(taken.then_some(SessionLock { conn: Some(conn), key }))
    }

    pub fn key(&self) -> LockKey {
        self.key
    }

    /// The connection holding the lock, to work on while holding it.
    pub fn connection(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("present until released or dropped")
    }

    /// Releases the lock and gives the connection back to the pool. If the
    /// unlock cannot be confirmed, the connection is closed instead (which
    /// releases it all the same).
    pub async fn release(mut self) -> Result<()> {
        let mut conn = self.conn.take().expect("present until released or dropped");
        let unlocked = match self.key {
            LockKey::Int(k) => {
                sqlx::query_scalar!(r#"SELECT pg_advisory_unlock($1) AS "released!""#, k).fetch_one(&mut *conn).await
            }
            LockKey::Pair(a, b) => {
                sqlx::query_scalar!(r#"SELECT pg_advisory_unlock($1, $2) AS "released!""#, a, b)
                    .fetch_one(&mut *conn)
                    .await
            }
        };
        match unlocked {
            Ok(true) => Ok(()),
            Ok(false) => {
                drop(conn.detach());
                Err(Error::Inconsistent(format!("advisory lock {:?} was not held by its session", self.key)))
            }
            Err(e) => {
                drop(conn.detach());
                Err(e.into())
            }
        }
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Not released: out of the pool, and closed (dropping the
            // connection closes its socket; the server then ends the
            // session and its locks).
            drop(conn.detach());
        }
    }
}

/// A duplicate-request guard: a string naming what must not run twice at
/// once (`user-42:purchase`, `refund:order-7`). A request made with a guard
/// takes `pg_try_advisory_xact_lock(transfer_worker_lock_key('guard', G))`
/// in its transaction and is refused at once while another holds it. Unlike
/// an idempotency key (one request retried), a guard stops two *different*
/// requests from racing (two clicks, each with a fresh key). Any text of 1
/// byte to 2 KiB; quotes and SQL in it are just part of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Guard(String);

impl Guard {
    /// The namespace of guards' lock keys.
    pub const NAMESPACE: &'static str = "guard";
    /// The longest guard accepted, in bytes.
    pub const MAX_BYTES: usize = 2048;

    pub fn new(guard: impl Into<String>) -> std::result::Result<Self, String> {
        let guard = guard.into();
        if guard.is_empty() {
            return Err("a guard must not be empty".into());
        }
        if guard.len() > Self::MAX_BYTES {
            return Err(format!("a guard must be at most {} bytes, got {}", Self::MAX_BYTES, guard.len()));
        }
        Ok(Guard(guard))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn key(&self) -> LockKey {
        LockKey::hashed(Self::NAMESPACE, &self.0)
    }

    /// Takes the guard for the current transaction, or refuses (exit 3,
    /// naming the guard) if another transaction holds it.
    pub async fn take(&self, conn: &mut PgConnection) -> Result<()> {
        if try_xact_lock(conn, self.key()).await? {
            Ok(())
        } else {
            Err(crate::error::Refusal::GuardHeld { guard: self.0.clone() }.into())
        }
    }
}

impl std::str::FromStr for Guard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Guard::new(s)
    }
}

impl std::fmt::Display for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_keys_depend_on_both_parts_and_where_they_split() {
        assert_ne!(hash_key("ab", "c"), hash_key("a", "bc"));
        assert_ne!(hash_key("guard", "x"), hash_key("other", "x"));
        assert_eq!(hash_key("guard", "x"), hash_key("guard", "x"));
        // Pinned: the SQL function must give the same (tested against it too).
        assert_eq!(hash_key("", ""), -5010664483709227796, "the first 8 bytes of SHA-256(\"0:\")");
    }

    #[test]
    fn a_guard_is_any_text_from_one_byte_to_2_kib() {
        assert!(Guard::new("").is_err());
        assert!(Guard::new("x".repeat(2049)).is_err());
        assert!(Guard::new("x".repeat(2048)).is_ok());
        assert!(Guard::new("'; DROP TABLE transfers; --").is_ok());
        assert!(Guard::new("ユーザー42:購入").is_ok());
    }
}

//! Connections kept out of a pool between passes.
//!
//! sqlx returns a connection to its pool with a check: a `Sync` round trip
//! to the server (`ping`), on a task spawned for it. That is one more round
//! trip and one more task wake-up per checkout, on top of the pass's own
//! statements; at 100 transfers a second, where every transfer is a pass of
//! its own, the worker paid three of them per transfer (its apply
//! transaction, its relay claim, its relay record), a quarter of its round
//! trips and of its CPU.
//!
//! A [`Kept`] holds the connections of a loop's passes instead: a pass takes
//! one ([`Kept::take`]), and gives it back ([`KeptConn::give_back`]) only
//! when what it ran there finished cleanly (committed, rolled back, or a
//! single statement answered). A connection whose pass failed, or was
//! dropped mid-statement (a shutdown deadline, a timeout), is not given
//! back: it goes back to the pool the usual way, checked, and closed if
//! broken. So a kept connection is always one whose last exchange completed.
//!
//! A pass may open a transaction by SQL text (`BEGIN` in one message with
//! its first statement, see [`super::literal`]), which sqlx does not track:
//! it says so ([`KeptConn::transaction_opened`]) and, once the transaction
//! is over, [`KeptConn::transaction_ended`]. A connection dropped in
//! between (the pass failed or was cut short) is closed, never returned to
//! the pool, where its next user would find the transaction still open.
//!
//! Kept connections count against the pool's size, as they did while their
//! passes held them; [`Kept::clear`] hands the idle ones back (before the
//! pool is closed, which waits for every connection).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

type Idle = Arc<Mutex<Vec<PoolConnection<Postgres>>>>;

/// A pool, and the connections its users keep out of it between passes.
#[derive(Clone, Debug)]
pub struct Kept {
    pool: PgPool,
    idle: Idle,
}

impl Kept {
    pub fn new(pool: PgPool) -> Kept {
        Kept { pool, idle: Arc::default() }
    }

    /// The pool underneath (for what is not worth keeping a connection for).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection kept from an earlier pass, or a new one from the pool.
    pub async fn take(&self) -> Result<KeptConn, sqlx::Error> {
        let kept = self.idle.lock().expect("kept connections").pop();
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(KeptConn { conn: Some(conn), home: self.idle.clone(), in_own_transaction: false })
    }

    /// Hands the idle connections back to the pool.
    pub fn clear(&self) {
        self.idle.lock().expect("kept connections").clear();
    }

    /// Idle connections kept now.
    pub fn idle(&self) -> usize {
        self.idle.lock().expect("kept connections").len()
    }
}

/// A connection taken from a [`Kept`]; dropped without
/// [`KeptConn::give_back`], it goes back to the pool, checked.
#[derive(Debug)]
pub struct KeptConn {
    conn: Option<PoolConnection<Postgres>>,
    home: Idle,
    /// A transaction opened by SQL text is open on it (see the module docs).
    in_own_transaction: bool,
}

impl KeptConn {
    /// Keeps the connection for the next pass: call it only when the last
    /// exchange on it completed (see the module docs).
    pub fn give_back(mut self) {
        if self.in_own_transaction {
            return; // closed on drop: see the module docs
        }
        if let Some(conn) = self.conn.take() {
            self.home.lock().expect("kept connections").push(conn);
        }
    }

    /// The pass is about to open a transaction by SQL text: until
    /// [`KeptConn::transaction_ended`], dropping the connection closes it.
    pub fn transaction_opened(&mut self) {
        self.in_own_transaction = true;
    }

    /// The transaction opened by SQL text is over (its COMMIT or ROLLBACK
    /// was answered).
    pub fn transaction_ended(&mut self) {
        self.in_own_transaction = false;
    }
}

impl Drop for KeptConn {
    fn drop(&mut self) {
        if let (true, Some(conn)) = (self.in_own_transaction, self.conn.as_mut()) {
            // The server rolls the transaction back when the connection
            // closes; the pool opens another in its place.
            conn.close_on_drop();
        }
    }
}

impl Deref for KeptConn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("a kept connection is present until given back")
    }
}

impl DerefMut for KeptConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a kept connection is present until given back")
    }
}

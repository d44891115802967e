//! Connecting to PostgreSQL, the embedded migrations, and the classification
//! of database errors (the database's trouble, lock contention, or the row's
//! fault), with named constraint violations turned into domain errors where
//! the queries run.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::error::{Error, Result};

mod kept;
pub mod literal;
pub use kept::{Kept, KeptConn};

/// The migrations under `migrations/`, embedded in the binary.
/// How the worker's claiming transactions begin: `BEGIN`, and no explicit
/// sorts in this transaction, in the same round trip.
///
/// A claim takes the lowest waiting ids (`ORDER BY id LIMIT n`) from a
/// partial index that is already in id order. When the statistics predate a
/// burst (the index looked almost empty when last analyzed: a quiet table,
/// or a new one), the planner expects fewer rows than the limit and prefers
/// to fetch them all and sort: with a backlog of 200,000 that is a 14 MB
/// on-disk sort per claim, 0.5 to 0.9 s each (seen at the start of every
/// bench run until autovacuum analyzed the table). Without sorts to choose,
/// the claim walks the index in order and stops after `n` rows, whatever the
/// statistics say. Sorts are allowed again right after the claim (by the
/// claim itself: see `transfer::store::begin_and_claim`): the account locks that
/// follow need one (PostgreSQL 15 cannot return `id = ANY(..)` in index
/// order).
///
/// JIT is off too: a claim is a few hundred rows, and a plan that had to
/// sort anyway would carry the disabled sort's cost, far above
/// `jit_above_cost`, into half a second of compiling (seen: 455 ms of JIT
/// for a 1 ms claim).
pub(crate) const BEGIN_CLAIM: &str = "BEGIN; SET LOCAL enable_sort = off; SET LOCAL jit = off";

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Limits every session of ours sets for itself, whatever the database or
/// role defaults are. A lock someone else holds for too long then shows up as
/// a logged, retried `lock_timeout` (55P03) instead of an endless wait, and a
/// transaction of ours that stalls mid-way is ended by the server, releasing
/// its locks. `None` leaves the server's setting alone; `Some(ZERO)` disables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub statement_timeout: Option<Duration>,
    pub lock_timeout: Option<Duration>,
    pub idle_in_transaction_timeout: Option<Duration>,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            statement_timeout: Some(Duration::from_secs(30)),
            lock_timeout: Some(Duration::from_secs(5)),
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
        }
    }
}

impl SessionLimits {
    /// For `migrate`: a migration may legitimately scan a large table, and a
    /// DBA's `statement_timeout` must not abort it half-way.
    pub fn for_migrations() -> Self {
        SessionLimits { statement_timeout: Some(Duration::ZERO), ..SessionLimits::default() }
    }

    /// These limits as connection options (sent at connect, so they hold for
    /// every session of a pool).
    pub fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut settings = Vec::new();
        if let Some(d) = self.statement_timeout {
            settings.push(("statement_timeout", ms(d)));
        }
        if let Some(d) = self.lock_timeout {
            settings.push(("lock_timeout", ms(d)));
        }
        if let Some(d) = self.idle_in_transaction_timeout {
            settings.push(("idle_in_transaction_session_timeout", ms(d)));
        }
        options.options(settings)
    }
}

/// Parses a connection string, with an error that says what is wrong (and
/// never echoes the URL, which may hold a password).
pub fn parse_url(database_url: &str) -> Result<PgConnectOptions> {
    database_url.parse().map_err(|e| Error::invalid(format!("DATABASE_URL is not a valid PostgreSQL URL: {e}")))
}

/// Where a connection goes, for messages: `host:port/database`, no secrets.
pub fn describe(options: &PgConnectOptions) -> String {
    format!("{}:{}/{}", options.get_host(), options.get_port(), options.get_database().unwrap_or("(default)"))
}

/// How long the first connection of a command may take before we say so.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a pool of at most `max_connections` to `database_url`, every session
/// with `limits`. One connection is made first, directly, so that a refused
/// port, a bad password or an unknown database is reported as such, naming
/// the server, instead of as a pool timeout.
pub async fn connect(database_url: &str, max_connections: u32, limits: SessionLimits) -> Result<PgPool> {
    let options = limits.apply(parse_url(database_url)?.application_name("transfer-worker"));
    check_reachable(&options).await?;
    Ok(pool_of(options, max_connections))
}

/// A pool of at most `max_connections` with `options`, connecting lazily:
/// how every pool of the worker is made.
pub fn pool_of(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // No ping before each use: it is a round trip per transaction, and a
        // connection that died is found by the first statement anyway, whose
        // error every caller already retries as transient. (The check sqlx
        // makes when a connection comes back is avoided by keeping it: see
        // `Kept`.)
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// The relay's pool: to the same database as `pool`, with the same session
/// settings and two of its own.
///
/// Its commits do not wait for the WAL to reach disk
/// (`synchronous_commit = off`): the relay writes only what a crash may lose
/// without harm, its leases and outcomes. A lost "published" mark or lease
/// means an event is sent once more, which consumers already deduplicate by
/// `event_id`; per-transfer order still holds, since a transfer's next event
/// is claimed only after the previous one was marked published. Never for
/// money: every transfer, refund and cancel commits synchronously.
///
/// And its sessions run with the settings of a claim's transaction (`BEGIN_CLAIM`:
/// no sorts, no JIT),
/// which none of the relay's statements needs otherwise: its claim is one
/// statement, one round trip, instead of three.
pub fn for_relay(pool: &PgPool, max_connections: u32) -> PgPool {
    let options = (*pool.connect_options()).clone().options([
        ("synchronous_commit", "off"),
        ("enable_sort", "off"),
        ("jit", "off"),
    ]);
    pool_of(options, max_connections)
}

/// Opens (and closes) one connection, with a clear error if that fails.
pub async fn check_reachable(options: &PgConnectOptions) -> Result<()> {
    let unreachable =
        |cause: String| Error::Unavailable(format!("cannot connect to PostgreSQL at {}: {cause}", describe(options)));
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(unreachable(cause(&e))),
        Err(_) => Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// The innermost useful description of a connection error (e.g. "Connection
/// refused (os error 111)" rather than "error communicating with database").
fn cause(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// Applies the embedded migrations. sqlx takes an advisory lock around them,
/// so several replicas may run this at once, and running it twice is a no-op.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Refuses to work on a database whose schema is not the one this binary was
/// built for: a missing migration (never migrated, or migrated by an older
/// version) or one whose text differs from the embedded one. Migrations newer
/// than this binary's are fine (a rolling deploy migrates before the last old
/// replica stops; migrations only ever add).
pub async fn check_schema(pool: &PgPool) -> Result<()> {
    let run_migrate = "run `transfer-worker migrate` first";
    let table = sqlx::query_scalar!(r#"SELECT to_regclass('_sqlx_migrations')::text AS "t""#).fetch_one(pool).await?;
    if table.is_none() {
        return Err(Error::SchemaMismatch(format!("the database has no transfer-worker schema: {run_migrate}")));
    }
    // Runtime query: `_sqlx_migrations` is sqlx's table, not part of our schema.
    let applied: Vec<(i64, Vec<u8>, bool)> =
        sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations").fetch_all(pool).await?;
    for m in MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration()) {
        match applied.iter().find(|(v, _, _)| *v == m.version) {
            None => {
                return Err(Error::SchemaMismatch(format!(
                    "migration {} ({}) is not applied: {run_migrate}",
                    m.version, m.description
                )))
            }
            Some((_, _, false)) => {
                return Err(Error::SchemaMismatch(format!(
                    "migration {} ({}) failed half-way; fix the database, then {run_migrate}",
                    m.version, m.description
                )))
            }
            Some((_, checksum, _)) if checksum.as_slice() != &*m.checksum => {
                return Err(Error::SchemaMismatch(format!(
                    "migration {} ({}) was applied from a different text than this binary's",
                    m.version, m.description
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// The name of the violated constraint, if the error is a constraint violation.
pub fn violated_constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// Whose fault a database error is, which decides what a caller does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The database cannot be used right now: the connection broke, the
    /// server is shutting down, restarting or out of resources (I/O errors,
    /// pool timeouts, SQLSTATE classes 08, 53, 57P, 58; 25P03, the session
    /// ended for idling in a transaction). Retry the whole pass, later.
    Unavailable,
    /// Another transaction is in the way: a lock not granted in time
    /// (55P03), a statement cancelled or timed out (57014), a deadlock
    /// (40P01) or a serialization failure (40001). Not the row's fault
    /// either, but possibly specific to some rows (the ones whose locks are
    /// held): retry those later, let the others through.
    Contention,
    /// Anything else (a constraint, an overflow, bad data): the row's fault.
    /// Counted against it.
    Row,
}

/// Classifies a database error (see [`Fault`]). Only [`Fault::Row`] ever
/// counts against a transfer or an event.
pub fn fault(err: &sqlx::Error) -> Fault {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => Fault::Unavailable,
        sqlx::Error::Database(_) => {
            let code = sqlstate(err).unwrap_or_default();
            match code.as_str() {
                "40001" | "40P01" | "55P03" | "57014" => Fault::Contention,
                "25P03" => Fault::Unavailable,
                c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c.starts_with("58") => {
                    Fault::Unavailable
                }
                _ => Fault::Row,
            }
        }
        _ => Fault::Row,
    }
}

/// True when the error says nothing about the rows involved (see [`Fault`]).
pub fn is_transient(err: &sqlx::Error) -> bool {
    fault(err) != Fault::Row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migrations released before this rule existed; changing them now would
    /// change their checksums and fail `migrate` on every deployed database.
    const GRANDFATHERED: i64 = 20261122000003;

    /// A CHECK added to an existing (possibly large) table must be added `NOT
    /// VALID` and validated in a later migration: otherwise the deploy holds
    /// an ACCESS EXCLUSIVE lock on the table for a full scan. (Both in one
    /// migration would not help: it runs in one transaction, which keeps the
    /// exclusive lock until the VALIDATE is done.)
    #[test]
    fn checks_on_existing_tables_are_added_not_valid_and_validated_later() {
        for m in MIGRATOR.iter().filter(|m| m.version > GRANDFATHERED) {
            let sql = m.sql.as_str().to_uppercase();
            for statement in sql.split(';') {
                let statement = statement.split_whitespace().collect::<Vec<_>>().join(" ");
                if statement.contains("ALTER TABLE")
                    && statement.contains("ADD CONSTRAINT")
                    && statement.contains(" CHECK")
                {
                    assert!(statement.contains("NOT VALID"), "migration {}: {statement}", m.version);
                }
                if statement.contains("VALIDATE CONSTRAINT") {
                    assert!(!sql.contains("NOT VALID"), "migration {}: validate in a later migration", m.version);
                }
            }
        }
    }
}

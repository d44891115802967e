//! Connecting to PostgreSQL, the embedded migrations, and the classification
//! of database errors (retryable or the row's fault, and named constraint
//! violations turned into domain errors).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::error::{Error, Result};

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool of at most `max_connections` to `database_url`.
pub async fn connect(database_url: &str, max_connections: u32) -> Result<PgPool> {
    let options: PgConnectOptions =
        database_url.parse().map_err(|e| Error::invalid(format!("DATABASE_URL is not a valid PostgreSQL URL: {e}")))?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.application_name("transfer-worker"))
        .await?;
    Ok(pool)
}

/// Applies the embedded migrations. sqlx takes an advisory lock around them,
/// so several replicas may run this at once, and running it twice is a no-op.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
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

/// True when the error says nothing about the rows involved: the connection
/// broke, the server is restarting or overloaded, or PostgreSQL aborted the
/// transaction for a concurrency reason (serialization failure 40001, deadlock
/// 40P01). Such a failure is retried and never counts against a transfer or
/// an event. Anything else (a constraint, an overflow, bad data) is the row's
/// fault and does count.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(_) => {
            let code = sqlstate(err).unwrap_or_default();
            // 08: connection exception; 40001/40P01: serialization/deadlock;
            // 53: insufficient resources; 57P01..57P03: admin/crash shutdown,
            // cannot connect now; 55P03: lock not available.
            code.starts_with("08")
                || code == "40001"
                || code == "40P01"
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "55P03"
        }
        _ => false,
    }
}

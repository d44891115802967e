//! A throw-away database on the same server as DATABASE_URL, for `lab`,
//! `bench` and `demo`: they create, measure and drop their own tables and rows without
//! touching the real ones.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::error::{Error, Result};

pub struct ScratchDb {
    pub pool: PgPool,
    admin: PgConnectOptions,
    name: String,
}

impl ScratchDb {
    /// Creates `<prefix>_<pid>_<random>` and opens a pool of `max_connections` to it.
    pub async fn create(database_url: &str, prefix: &str, max_connections: u32) -> Result<ScratchDb> {
        let admin: PgConnectOptions = database_url
            .parse()
            .map_err(|e| Error::invalid(format!("DATABASE_URL is not a valid PostgreSQL URL: {e}")))?;
        let name = format!("{prefix}_{}_{:08x}", std::process::id(), rand::random::<u32>());
        let mut conn = admin.connect().await?;
        // Names are ours (prefix, digits, hex): safe to splice into DDL.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .test_before_acquire(false)
            .connect_with(admin.clone().database(&name))
            .await?;
        Ok(ScratchDb { pool, admin, name })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database.
    pub async fn drop(self) -> Result<()> {
        self.pool.close().await;
        let mut conn = self.admin.connect().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

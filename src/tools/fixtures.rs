//! Fixtures shared by the tools and the integration tests (which include this
//! file as a module of their own): a throw-away database on the same server
//! as DATABASE_URL that drops itself, and seeding.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use rand::{Rng, SeedableRng};
use transfer_worker::error::{Error, Result};

/// A database of its own, next to the one a URL names, dropped when done:
/// by [`ScratchDb::drop`] (the tools, which wait for it), or else when the
/// value goes out of scope (a test that ends, even by panicking).
pub struct ScratchDb {
    pub pool: PgPool,
    /// A connection string for it (for child processes).
    #[allow(dead_code)] // the integration tests'
    pub url: String,
    admin: PgConnectOptions,
    name: String,
    dropped: bool,
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
        let url = match database_url.rsplit_once('/') {
            Some((server, _)) if !server.ends_with('/') => format!("{server}/{name}"),
            _ => format!("{}/{name}", database_url.trim_end_matches('/')),
        };
        Ok(ScratchDb { pool, url, admin, name, dropped: false })
    }

    /// The database's name.
    #[allow(dead_code)] // the tools'
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database.
    #[allow(dead_code)] // the tools' (the tests let it drop itself)
    pub async fn drop(mut self) -> Result<()> {
        self.dropped = true;
        self.pool.close().await;
        drop_database(&self.admin, &self.name).await
    }
}

async fn drop_database(admin: &PgConnectOptions, name: &str) -> Result<()> {
    let mut conn = admin.connect().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&mut conn).await?;
    Ok(())
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop cannot await: a thread of its own with a small runtime does it.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                let _ = rt.block_on(drop_database(&admin, &name));
            }
        });
        let _ = dropper.join();
    }
}

/// Opens accounts `1..=accounts` with `balance` each, then enqueues (by plain
/// SQL, as any producer may) `transfers` random transfers between them of
/// 1..=`max_amount` each, drawn from `rng_seed`. Shared by `bench` and the
/// integration tests.
#[allow(dead_code)] // the integration tests' (this file is one of their modules too)
pub async fn seed_random(
    pool: &PgPool,
    accounts: i64,
    balance: i64,
    transfers: usize,
    max_amount: i64,
    rng_seed: u64,
) -> Result<()> {
    if accounts < 2 {
        return Err(Error::invalid("at least 2 accounts are needed"));
    }
    open_accounts(pool, accounts, balance).await?;
    insert_random_transfers(pool, accounts, transfers, max_amount, rng_seed).await
}

pub async fn insert_random_transfers(
    pool: &PgPool,
    accounts: i64,
    transfers: usize,
    max_amount: i64,
    rng_seed: u64,
) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
    for chunk_start in (0..transfers).step_by(10_000) {
        let n = (transfers - chunk_start).min(10_000);
        let (mut keys, mut from, mut to, mut amount) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let f = rng.gen_range(1..=accounts);
            // Any other account: an offset of 1..accounts-1, wrapped.
            let t = (f + rng.gen_range(1..accounts) - 1) % accounts + 1;
            keys.push(format!("seed-{rng_seed}-{}", chunk_start + i));
            from.push(f);
            to.push(t);
            amount.push(rng.gen_range(1..=max_amount));
        }
        sqlx::query(
            "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])",
        )
        .bind(&keys)
        .bind(&from)
        .bind(&to)
        .bind(&amount)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Opens accounts `1..=accounts` with `balance` each.
pub async fn open_accounts(pool: &PgPool, accounts: i64, balance: i64) -> Result<()> {
    sqlx::query("INSERT INTO accounts (id, balance) SELECT g, $2 FROM generate_series(1, $1::bigint) g")
        .bind(accounts)
        .bind(balance)
        .execute(pool)
        .await?;
    Ok(())
}

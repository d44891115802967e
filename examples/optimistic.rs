//! Optimistic versions: read with a version, write only if it is unchanged,
//! retry with backoff when another writer got there first. No lock is held
//! between the read and the write.
//!
//!     DATABASE_URL=postgres://... cargo run --example optimistic
//!
//! It creates and drops a table of its own (`tw_example_counter_<pid>`).

use transfer_worker::concurrency::optimistic::{retry, Attempt};
use transfer_worker::concurrency::Retries;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&std::env::var("DATABASE_URL")?).await?;
    let table = format!("tw_example_counter_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, value BIGINT NOT NULL, version BIGINT NOT NULL);
         INSERT INTO {table} VALUES (1, 0, 0)"
    )))
    .execute(&pool)
    .await?;
    let patient = Retries { max_attempts: 1_000, ..Retries::default() };
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (pool, table) = (pool.clone(), table.clone());
        tasks.push(tokio::spawn(async move {
            let mut retries = 0;
            for _ in 0..50 {
                let done = retry(&patient, || async {
                    let (value, version): (i64, i64) =
                        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT value, version FROM {table} WHERE id = 1")))
                            .fetch_one(&pool)
                            .await?;
                    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET value = $1, version = version + 1 WHERE id = 1 AND version = $2"
                    )))
                    .bind(value + 1)
                    .bind(version)
                    .execute(&pool)
                    .await?
                    .rows_affected();
                    Ok(Attempt::from_rows_affected(rows))
                })
                .await?;
                retries += done.attempts - 1;
            }
            Ok::<u32, transfer_worker::concurrency::RetryError>(retries)
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await??;
    }
    let value: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT value FROM {table} WHERE id = 1")))
        .fetch_one(&pool)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pool).await?;
    assert_eq!(value, 200);
    println!("4 writers x 50 increments = {value}, with {retries} retries after a version changed");
    Ok(())
}

//! SERIALIZABLE from the pool you already have, retried on serialization
//! failures: the classic write skew (two doctors each go off call because
//! the other is still on) cannot happen.
//!
//!     DATABASE_URL=postgres://... cargo run --example serializable
//!
//! It creates and drops a table of its own (`tw_example_on_call_<pid>`).

use transfer_worker::concurrency::isolation::{run_in, Isolation};
use transfer_worker::concurrency::Retries;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    let table = format!("tw_example_on_call_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (doctor TEXT PRIMARY KEY, on_call BOOLEAN NOT NULL);
         INSERT INTO {table} VALUES ('alice', true), ('bob', true)"
    )))
    .execute(&pool)
    .await?;
    let go_off_call = |doctor: &'static str| {
        let (pool, table) = (pool.clone(), table.clone());
        async move {
            run_in(&pool, Isolation::Serializable, &Retries::default(), move |conn| {
                let table = table.clone();
                Box::pin(async move {
                    let on_call: i64 =
                        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE on_call")))
                            .fetch_one(&mut *conn)
                            .await?;
                    // Both read 2 at the same time; only one may leave.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    if on_call < 2 {
                        return Ok(false);
                    }
                    sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE {table} SET on_call = false WHERE doctor = $1")))
                        .bind(doctor)
                        .execute(&mut *conn)
                        .await?;
                    Ok(true)
                })
            })
            .await
        }
    };
    let (a, b) = tokio::join!(go_off_call("alice"), go_off_call("bob"));
    let (a, b) = (a?, b?);
    println!("alice went off call: {} (attempts {}); bob: {} (attempts {})", a.value, a.attempts, b.value, b.attempts);
    let on_call: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE on_call")))
        .fetch_one(&pool)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pool).await?;
    assert_eq!(on_call, 1, "exactly one doctor stays on call");
    println!("doctors still on call: {on_call}");
    Ok(())
}

//! A duplicate-request guard: two requests for the same thing at once, the
//! second refused at once; and a session lock that cannot leak.
//!
//!     DATABASE_URL=postgres://... cargo run --example guard
//!
//! It touches no table.

use transfer_worker::concurrency::advisory::{self, Guard, LockKey, SessionLock};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    let guard = Guard::new("user-42:purchase")?;

    // Request 1 takes the guard for its transaction ...
    let mut first = pool.begin().await?;
    assert!(advisory::try_xact_lock(&mut first, guard.key()).await?);
    println!("request 1 holds guard {guard}");
    // ... so request 2, arriving meanwhile, is refused without waiting.
    let mut second = pool.begin().await?;
    let refused = guard.take(&mut second).await.unwrap_err();
    println!("request 2 refused: {refused}");
    second.rollback().await?;
    // Once request 1 commits, the guard is free again.
    first.commit().await?;
    let mut third = pool.begin().await?;
    guard.take(&mut third).await?;
    println!("request 3, after request 1 committed, holds it");
    third.commit().await?;

    // The same key in plain SQL (the migrations install it as
    // transfer_worker_lock_key(namespace, key)).
    let in_sql: i64 = sqlx::query_scalar(
        "SELECT ('x' || left(encode(sha256(convert_to(octet_length(convert_to($1, 'UTF8')) || ':' || $1 || $2, 'UTF8')), 'hex'), 16))::bit(64)::bigint",
    )
    .bind(Guard::NAMESPACE)
    .bind(guard.as_str())
    .fetch_one(&pool)
    .await?;
    assert_eq!(LockKey::Int(in_sql), guard.key());
    println!("the key in SQL is the key in Rust: {in_sql}");

    // A session lock: released explicitly, or its connection closed if the
    // value is dropped (an early return, a panic): never back in the pool
    // still holding the lock.
    let key = LockKey::hashed("example", "nightly-report");
    let lock = SessionLock::acquire(&pool, key).await?;
    assert!(SessionLock::try_acquire(&pool, key).await?.is_none());
    lock.release().await?;
    assert!(SessionLock::try_acquire(&pool, key).await?.is_some());
    println!("session lock taken, refused to a second session, released");
    Ok(())
}

//! Connections kept between passes (`db::Kept`): reused as they are only
//! after a clean exchange, never after one that failed or was cut short,
//! and handed back so the pool can close.

use std::time::Duration;

use transfer_worker::db::Kept;

use crate::helpers::TestDb;

async fn backend_pid(conn: &mut sqlx::PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(conn).await.unwrap()
}

#[tokio::test]
async fn a_kept_connection_is_reused_only_after_a_clean_exchange() {
    let db = TestDb::new().await;
    let pool = transfer_worker::db::pool_of((*db.pool.connect_options()).clone(), 3);
    let kept = Kept::new(pool.clone());

    // Given back after a clean statement: the next pass gets the same session.
    let mut conn = kept.take().await.unwrap();
    let first = backend_pid(&mut conn).await;
    conn.give_back();
    assert_eq!(kept.idle(), 1);
    let mut conn = kept.take().await.unwrap();
    assert_eq!(backend_pid(&mut conn).await, first, "a kept connection is reused");

    // A transaction left open (a pass that failed before its commit) is not
    // kept: the connection goes back to the pool, which rolls it back.
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::query("CREATE TEMP TABLE half_done (x int)").execute(&mut *tx).await.unwrap();
    drop(tx);
    drop(conn);
    assert_eq!(kept.idle(), 0, "a connection not given back is not kept");

    // A statement cut short (a deadline, a timeout) is not kept either, and
    // the next pass still gets a working connection, outside any transaction.
    let mut conn = kept.take().await.unwrap();
    let cut =
        tokio::time::timeout(Duration::from_millis(200), sqlx::query("SELECT pg_sleep(5)").execute(&mut *conn)).await;
    assert!(cut.is_err(), "the statement was cut short");
    drop(conn);
    assert_eq!(kept.idle(), 0);
    let mut conn = kept.take().await.unwrap();
    let in_tx: bool = sqlx::query_scalar(
        "SELECT pg_current_xact_id_if_assigned() IS NOT NULL OR to_regclass('half_done') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(!in_tx, "no transaction or its effects carried over");
    conn.give_back();

    // Handed back, the pool closes at once.
    kept.clear();
    assert_eq!(kept.idle(), 0);
    tokio::time::timeout(Duration::from_secs(5), pool.close())
        .await
        .expect("the pool closes once kept connections are handed back");
}

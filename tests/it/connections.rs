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

/// A pass that opens its transaction by SQL text (the apply's batch: `BEGIN`
/// and its claim in one message) and is cut short before its COMMIT must not
/// hand the pool a connection still inside that transaction.
#[tokio::test]
async fn a_connection_dropped_inside_a_transaction_opened_by_text_is_closed_and_its_writes_rolled_back() {
    let db = TestDb::new().await;
    let pool = transfer_worker::db::pool_of((*db.pool.connect_options()).clone(), 2);
    let kept = Kept::new(pool.clone());
    sqlx::query("CREATE TABLE scratch (x int)").execute(&db.pool).await.unwrap();

    for give_back in [false, true] {
        let mut conn = kept.take().await.unwrap();
        let pid = backend_pid(&mut conn).await;
        conn.transaction_opened();
        sqlx::raw_sql("BEGIN; INSERT INTO scratch VALUES (1)").execute(&mut *conn).await.unwrap();
        // Cut short: dropped, or (a bug) given back, before the COMMIT.
        if give_back {
            conn.give_back();
        } else {
            drop(conn);
        }
        assert_eq!(kept.idle(), 0, "not kept");
        let mut next = kept.take().await.unwrap();
        assert_ne!(backend_pid(&mut next).await, pid, "the session inside the transaction is not reused");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch").fetch_one(&mut *next).await.unwrap();
        assert_eq!(rows, 0, "the insert was rolled back");
        next.give_back();
        // The server ended the session (so its locks are gone, too).
        let gone = async {
            loop {
                let alive: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)")
                    .bind(pid)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
                if !alive {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), gone).await.expect("the session was closed");
    }

    // Ended cleanly, it is kept like any other.
    let mut conn = kept.take().await.unwrap();
    let pid = backend_pid(&mut conn).await;
    conn.transaction_opened();
    sqlx::raw_sql("BEGIN; INSERT INTO scratch VALUES (2); COMMIT").execute(&mut *conn).await.unwrap();
    conn.transaction_ended();
    conn.give_back();
    let mut conn = kept.take().await.unwrap();
    assert_eq!(backend_pid(&mut conn).await, pid);
    conn.give_back();
    kept.clear();
    pool.close().await;
}

/// The check the apply's write makes on itself before its COMMIT (which
/// travels in the same message) stops that COMMIT: here it was to move money
/// on an account that does not exist.
#[tokio::test]
async fn a_statement_that_fails_its_own_check_stops_the_commit_sent_with_it() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE scratch (x int)").execute(&db.pool).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let err = sqlx::raw_sql(
        "BEGIN; INSERT INTO scratch VALUES (1);
         SELECT * FROM transfer_worker_finish_transfers('{}', '{}', '{}', '{}', '{}', '{42}', '{1}', '{0}');
         COMMIT",
    )
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("inconsistent: updated 0 of 1 accounts"), "{err}");
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch").fetch_one(&mut *conn).await.unwrap();
    assert_eq!(rows, 0, "nothing committed");
}

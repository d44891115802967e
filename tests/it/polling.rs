//! Polling (`transfer::polling`): above the gathering rate the worker claims
//! on a tick of its own and producers' inserts stop sending a NOTIFY (whose
//! lock serialized their commits); below it, and once a poller's lease has
//! ended, they notify again. Nothing committed in between is left behind.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::admin::{free_port, http};
use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

/// Notifications on the worker's channel, counted as they come.
async fn listen(db: &TestDb) -> PgListener {
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(transfer_worker::wake::CHANNEL).await.unwrap();
    listener
}

/// Runs one statement on the test database.
async fn execute(db: &TestDb, sql: &'static str) {
    sqlx::query(sql).execute(&db.pool).await.unwrap();
}

/// How many notifications arrive within `within`.
async fn notifications(listener: &mut PgListener, within: Duration) -> usize {
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(_)) = tokio::time::timeout_at(deadline, listener.recv()).await {
        n += 1;
    }
    n
}

#[tokio::test]
async fn an_insert_notifies_unless_a_polling_lease_holds() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 100).await;
    let mut listener = listen(&db).await;

    db.enqueue_sql("no-lease", 1, 2, 1).await;
    assert_eq!(notifications(&mut listener, Duration::from_millis(500)).await, 1, "no lease: one NOTIFY");

    execute(&db, "INSERT INTO apply_polling (until) VALUES (clock_timestamp() + interval '1 hour')").await;
    db.enqueue_sql("leased", 1, 2, 1).await;
    assert_eq!(notifications(&mut listener, Duration::from_millis(500)).await, 0, "a live lease: no NOTIFY");

    // A poller that died: its lease ends, and inserts notify again.
    execute(&db, "UPDATE apply_polling SET until = clock_timestamp() - interval '1 second'").await;
    db.enqueue_sql("ended", 1, 2, 1).await;
    assert_eq!(notifications(&mut listener, Duration::from_millis(500)).await, 1, "an ended lease: NOTIFY again");
}

#[tokio::test]
async fn above_the_rate_the_worker_polls_producers_stop_notifying_and_below_it_they_notify_again() {
    let db = TestDb::new().await;
    for id in 1..=4 {
        db.open_account(id, 1_000_000).await;
    }
    let queue = TestQueue::new(false).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let _worker =
        KillOnDrop(db.spawn_worker(&queue.url, &["--gather-above", "50", "--gather-ms", "20", "--admin-addr", &addr]));
    wait_for("the admin server", Duration::from_secs(20), || async { http(&addr, "GET", "/readyz").await.is_some() })
        .await;
    let polling = || async {
        let (_, metrics) = http(&addr, "GET", "/metrics").await.unwrap();
        metrics.lines().any(|l| l == "transfer_worker_apply_polling 1")
    };
    assert!(!polling().await, "idle: no polling");
    let mut listener = listen(&db).await;

    // About 200 single inserts a second for 2 s, then 2 s more, counting the
    // NOTIFYs of the second part (the worker polls by then).
    db.enqueue_steadily("p", 0..400).await;
    let lease_ahead = db
        .scalar(
            "SELECT COALESCE(extract(epoch FROM max(until) - clock_timestamp()) * 1000, 0)::bigint FROM apply_polling",
        )
        .await;
    assert!(lease_ahead > 0, "polling at about 200 a second, the worker holds a lease ({lease_ahead} ms ahead)");
    assert!(polling().await, "/metrics says it polls");
    while tokio::time::timeout(Duration::from_millis(1), listener.recv()).await.is_ok() {}
    let mut notified = 0;
    for i in 400..800 {
        db.enqueue_among_four("p", i).await;
        notified += notifications(&mut listener, Duration::from_millis(5)).await;
    }
    assert!(notified < 40, "{notified} NOTIFYs for 400 inserts while the worker polls");

    wait_for("every transfer applied and published", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await == 800
    })
    .await;
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await, 800);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 800, "one event per transfer");
    assert_eq!(db.total_balance().await, 4_000_000);

    // The rate has fallen: the lease ends (3 s, plus the second before its
    // last renewal) and a single insert notifies again.
    wait_for("the lease ended", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM apply_polling WHERE until > clock_timestamp()").await == 0
    })
    .await;
    while tokio::time::timeout(Duration::from_millis(1), listener.recv()).await.is_ok() {}
    db.enqueue_among_four("p", 800).await;
    assert_eq!(notifications(&mut listener, Duration::from_millis(500)).await, 1, "a trickle notifies again");
    wait_for("/metrics says it stopped polling", Duration::from_secs(5), || async { !polling().await }).await;
    wait_for("the trickle applied", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await == 801
    })
    .await;
}

#[tokio::test]
async fn a_transaction_that_inserted_under_a_lease_and_committed_after_it_is_still_applied() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 100).await;
    let queue = TestQueue::new(false).await;
    let _worker = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    wait_for("the worker up", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND datname = current_database()")
            .await
            > 0
    })
    .await;

    // Another replica's lease, about to end; this worker itself is idle.
    execute(&db, "INSERT INTO apply_polling (until) VALUES (clock_timestamp() + interval '300 milliseconds')").await;
    let mut producer = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('held', 1, 2, 7)")
        .execute(&mut *producer)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    producer.commit().await.unwrap();

    // No NOTIFY came for it: the apply tasks' poll finds it.
    wait_for("the held transfer applied", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await == 1
    })
    .await;
    wait_for("its event published", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await == 1
    })
    .await;
    assert_eq!(db.total_balance().await, 200);
}

#[tokio::test]
async fn a_producer_role_with_only_the_grants_it_needed_before_still_inserts() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 100).await;
    let role = format!("producer_{}", db.scalar("SELECT (random() * 1e9)::int8").await);
    for sql in [
        format!("CREATE ROLE {role}"),
        format!("GRANT INSERT ON transfers TO {role}"),
        format!("GRANT INSERT ON state_count_deltas TO {role}"),
        format!("GRANT SELECT ON retired_keys TO {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    }
    let mut listener = listen(&db).await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SET ROLE {role}"))).execute(&mut *conn).await.unwrap();
    let inserted = sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('least', 1, 2, 5)",
    )
    .execute(&mut *conn)
    .await;
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    drop(conn);
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    }
    inserted.expect("the insert trigger reads apply_polling, which every role may read");
    assert_eq!(notifications(&mut listener, Duration::from_millis(500)).await, 1);
}

#[tokio::test]
async fn a_worker_that_stops_ends_its_lease_at_once() {
    let db = TestDb::new().await;
    for id in 1..=4 {
        db.open_account(id, 1_000_000).await;
    }
    let queue = TestQueue::new(false).await;
    let mut worker = KillOnDrop(db.spawn_worker(&queue.url, &["--gather-above", "50", "--gather-ms", "20"]));
    let live = "SELECT count(*) FROM apply_polling WHERE until > clock_timestamp()";
    db.enqueue_steadily("s", 0..300).await;
    assert_eq!(db.scalar(live).await, 1, "polling at about 200 a second");
    signal(&worker.0, "TERM");
    assert!(wait_exit(&mut worker.0, Duration::from_secs(20)).await.success());
    // Its lease ran 2-3 s ahead: ended by the worker, not by the clock.
    assert_eq!(db.scalar(live).await, 0, "the stopped worker handed its lease back");
    let mut listener = listen(&db).await;
    db.enqueue_sql("after", 1, 2, 1).await;
    assert_eq!(notifications(&mut listener, Duration::from_millis(500)).await, 1, "inserts notify the other replicas");
}

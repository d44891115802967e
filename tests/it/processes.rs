//! `transfer-worker run` as real processes: several replicas, SIGTERM, SIGKILL.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

async fn finished(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM transfers WHERE status <> 'PENDING'").await
}

/// Checks the queue holds exactly one event per finished transfer, of the
/// right type.
async fn assert_one_event_per_transfer(db: &TestDb, queue: &TestQueue, transfers: usize) {
    let received = queue.receive(transfers, Duration::from_secs(2)).await;
    let distinct: HashSet<&str> = received.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(received.len(), distinct.len(), "FIFO: no event twice");
    let statuses: HashMap<i64, String> = sqlx::query_as::<_, (i64, String)>("SELECT id, status FROM transfers")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut per_transfer: HashMap<i64, Vec<&str>> = HashMap::new();
    for e in &received {
        per_transfer.entry(e.transfer_id.0).or_default().push(e.event_type.as_str());
    }
    assert_eq!(per_transfer.len(), transfers, "every transfer has its event on SQS");
    for (id, types) in per_transfer {
        let want = format!("transfer.{}", statuses[&id].to_lowercase());
        assert_eq!(types, vec![want.as_str()], "transfer {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_of_four_tasks_apply_1500_transfers_exactly_once() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(20, 1_000, 1_500, 11).await;
    let args = ["--workers", "4", "--batch-size", "20"];
    let mut a = KillOnDrop(db.spawn_worker(&queue.url, &args));
    let mut b = KillOnDrop(db.spawn_worker(&queue.url, &args));
    wait_for("all 1,500 transfers applied and published", Duration::from_secs(120), || db.settled()).await;
    // Both replicas did work: each process's connections show up in the claims.
    signal(&a.0, "TERM");
    signal(&b.0, "TERM");
    assert!(wait_exit(&mut a.0, Duration::from_secs(30)).await.success());
    assert!(wait_exit(&mut b.0, Duration::from_secs(30)).await.success());

    db.assert_invariants(20_000, &opening).await;
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 1_500);
    assert!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'FAILED'").await > 0);
    assert_one_event_per_transfer(&db, &queue, 1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_work_exits_zero_with_nothing_half_done() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(20, 1_000, 4_000, 12).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--workers", "4", "--batch-size", "5"]));
    wait_for("the worker to be under way", Duration::from_secs(60), || async { finished(&db).await >= 100 }).await;
    signal(&w.0, "TERM");
    let status = wait_exit(&mut w.0, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");

    db.assert_invariants(20_000, &opening).await;
    // The relay drained what the last batches wrote before exiting.
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE state <> 'published'").await, 0);
    let done = finished(&db).await;
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_work_then_restart_loses_nothing_and_applies_nothing_twice() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(20, 1_000, 3_000, 13).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--workers", "4", "--batch-size", "5"]));
    wait_for("the worker to be under way", Duration::from_secs(60), || async { finished(&db).await >= 100 }).await;
    signal(&w.0, "KILL");
    wait_exit(&mut w.0, Duration::from_secs(10)).await;
    // Only committed work is visible: the invariants hold mid-way.
    db.assert_invariants(20_000, &opening).await;

    let mut again = KillOnDrop(db.spawn_worker(&queue.url, &["--workers", "4", "--batch-size", "50"]));
    wait_for("everything applied and published after the restart", Duration::from_secs(120), || db.settled()).await;
    signal(&again.0, "TERM");
    assert!(wait_exit(&mut again.0, Duration::from_secs(30)).await.success());
    db.assert_invariants(20_000, &opening).await;
    assert_one_event_per_transfer(&db, &queue, 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_2000_transfers_with_refunds_and_cancels_on_two_processes_match_the_fifo_queue_exactly() {
    use rand::{Rng, SeedableRng};
    use transfer_worker::transfer::cancel::cancel;
    use transfer_worker::transfer::refund::request_refund;
    use transfer_worker::transfer::{Amount, TransferId};

    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(20, 1_000, 2_000, 21).await;
    let (first, last): (i64, i64) =
        sqlx::query_as("SELECT min(id), max(id) FROM transfers").fetch_one(&db.pool).await.unwrap();
    let args = ["--workers", "4", "--batch-size", "20"];
    let mut a = KillOnDrop(db.spawn_worker(&queue.url, &args));
    let mut b = KillOnDrop(db.spawn_worker(&queue.url, &args));

    // Four clients cancel and refund random transfers while the workers run:
    // many requests come too late, or twice, and must not apply.
    let clients: Vec<_> = (0..4u64)
        .map(|c| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + c);
                let (mut applied, mut refused) = (0, 0);
                for _ in 0..150 {
                    let id = TransferId(rng.gen_range(first..=last));
                    let result = if rng.gen_bool(0.3) {
                        cancel(&pool, id).await.map(|_| ())
                    } else {
                        let amount = if rng.gen_bool(0.5) { None } else { Some(Amount::new(1).unwrap()) };
                        request_refund(&pool, id, amount).await.map(|_| ())
                    };
                    match result {
                        Ok(()) => applied += 1,
                        Err(transfer_worker::Error::Refused(_)) => refused += 1,
                        Err(e) => panic!("unexpected error: {e:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..5))).await;
                }
                (applied, refused)
            })
        })
        .collect();
    let (mut applied, mut refused) = (0, 0);
    for c in clients {
        let (a, r) = c.await.unwrap();
        applied += a;
        refused += r;
    }
    assert!(applied > 0 && refused > 0, "both outcomes happened: {applied} applied, {refused} refused");

    wait_for("everything applied and published", Duration::from_secs(180), || db.settled()).await;
    signal(&a.0, "TERM");
    signal(&b.0, "TERM");
    assert!(wait_exit(&mut a.0, Duration::from_secs(30)).await.success());
    assert!(wait_exit(&mut b.0, Duration::from_secs(30)).await.success());

    db.assert_invariants(20_000, &opening).await;
    assert!(db.scalar("SELECT count(*) FROM transfers WHERE refund_status = 'COMPLETED'").await > 0);
    assert!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'CANCELLED'").await > 0);

    // The FIFO queue holds exactly the outbox, each transfer's events in order.
    let outbox: Vec<(i64, String)> =
        sqlx::query_as("SELECT transfer_id, event_id::text FROM outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    let mut want: HashMap<i64, Vec<String>> = HashMap::new();
    for (t, e) in outbox.iter().cloned() {
        want.entry(t).or_default().push(e);
    }
    let received = queue.receive(outbox.len(), Duration::from_secs(2)).await;
    assert_eq!(received.len(), outbox.len(), "exactly once");
    let mut got: HashMap<i64, Vec<String>> = HashMap::new();
    for e in received {
        got.entry(e.transfer_id.0).or_default().push(e.event_id);
    }
    assert_eq!(got, want, "per-transfer order on SQS is the order written");

    // The maintained counters behind `status` agree with a full count.
    let status = db.cli(&["status", "--json"]).await.json();
    for (status_name, column) in [("transfers", "status"), ("refunds", "refund_status")] {
        let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {column}, count(*) FROM transfers WHERE {column} <> 'NONE' GROUP BY 1"
        )))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        for (state, n) in rows {
            assert_eq!(status[status_name][&state], n, "{status_name} {state}: {status}");
        }
    }
    assert_eq!(status["outbox"]["published"], db.scalar("SELECT count(*) FROM outbox").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_its_database_connections_being_killed_mid_work() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(20, 1_000, 3_000, 31).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--workers", "4", "--batch-size", "5"]));
    wait_for("the worker to be under way", Duration::from_secs(60), || async { finished(&db).await >= 100 }).await;
    // What a PostgreSQL restart or failover does to the worker: every one of
    // its connections dies mid-transaction (SQLSTATE 57P01 or an I/O error).
    for _ in 0..3 {
        let killed = db
            .scalar(
                // With a timeout, pg_terminate_backend waits until the backend
                // is gone, so the reconnect check below sees only new ones.
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name = 'transfer-worker'",
            )
            .await;
        assert!(killed > 0, "the worker's connections were found");
        wait_for("the worker to reconnect", Duration::from_secs(30), || async {
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name = 'transfer-worker'",
            )
            .await
                > 0
        })
        .await;
    }
    wait_for("everything applied and published after the kills", Duration::from_secs(120), || db.settled()).await;
    assert!(w.0.try_wait().unwrap().is_none(), "the worker kept running");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    db.assert_invariants(20_000, &opening).await;
    assert_one_event_per_transfer(&db, &queue, 3_000).await;
}

/// A TCP endpoint that accepts connections and never answers: SQS hung.
async fn black_hole_endpoint() -> String {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_sqs_hangs_stops_within_the_shutdown_timeout_and_loses_nothing() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(10, 1_000, 50, 41).await;
    let hole = black_hole_endpoint().await;
    let mut cmd = db.worker_command(&queue.url, &["--sqs-timeout-ms", "20000", "--shutdown-timeout-ms", "2000"]);
    cmd.env("AWS_ENDPOINT_URL", &hole).env("RUST_LOG", "info");
    let mut w = KillOnDrop(cmd.spawn().unwrap());
    wait_for("transfers applied and the relay inside its SQS call", Duration::from_secs(30), || async {
        finished(&db).await == 50 && db.scalar("SELECT count(*) FROM outbox WHERE claimed_until > now()").await > 0
    })
    .await;
    let asked = std::time::Instant::now();
    signal(&w.0, "TERM");
    let status = wait_exit(&mut w.0, Duration::from_secs(15)).await;
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0), "a graceful stop, nothing lost");
    assert!(took < Duration::from_millis(3_500), "stopped within about a second of the 2 s bound: {took:?}");
    db.assert_invariants(10_000, &opening).await;
    assert_eq!(
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0 AND claimed_until IS NULL")
            .await,
        50,
        "the abandoned events are pending, uncounted, and their leases given back"
    );
    // The next worker (SQS healthy again) publishes them at once.
    let mut again = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    wait_for("everything published by the next worker", Duration::from_secs(30), || db.settled()).await;
    signal(&again.0, "TERM");
    assert!(wait_exit(&mut again.0, Duration::from_secs(30)).await.success());
    assert_one_event_per_transfer(&db, &queue, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_the_worker_at_once() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.seed(10, 1_000, 20, 42).await;
    let hole = black_hole_endpoint().await;
    let mut cmd = db.worker_command(&queue.url, &["--sqs-timeout-ms", "60000", "--shutdown-timeout-ms", "60000"]);
    cmd.env("AWS_ENDPOINT_URL", &hole);
    let mut w = KillOnDrop(cmd.spawn().unwrap());
    wait_for("the relay inside its SQS call", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE claimed_until > now()").await > 0
    })
    .await;
    signal(&w.0, "TERM");
    // The first signal waits for the hung call (up to its 60 s bound) ...
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < deadline {
        assert!(w.0.try_wait().unwrap().is_none(), "the first signal waits for in-flight work");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... the second means now.
    let asked = std::time::Instant::now();
    signal(&w.0, "TERM");
    let status = wait_exit(&mut w.0, Duration::from_secs(10)).await;
    assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_batch_waits_on_a_lock_abandons_it_in_time_and_it_is_applied_later() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(10, 1_000, 30, 43).await;
    // Another writer holds every account: the worker's batch waits on it
    // (no lock or statement timeout for this worker).
    let mut other_writer = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts FOR UPDATE").execute(&mut *other_writer).await.unwrap();
    let args = ["--lock-timeout-ms", "0", "--statement-timeout-ms", "0", "--shutdown-timeout-ms", "1500"];
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &args));
    wait_for("the worker's batch to wait on the lock", Duration::from_secs(30), || async {
        db.scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'transfer-worker' AND wait_event_type = 'Lock'",
        )
        .await
            > 0
    })
    .await;
    let asked = std::time::Instant::now();
    signal(&w.0, "TERM");
    let status = wait_exit(&mut w.0, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert!(asked.elapsed() < Duration::from_millis(3_000), "{:?}", asked.elapsed());
    other_writer.rollback().await.unwrap();
    assert_eq!(finished(&db).await, 0, "the abandoned batch rolled back");
    db.assert_invariants(10_000, &opening).await;

    let mut again = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    wait_for("the transfers applied by the next worker", Duration::from_secs(30), || db.settled()).await;
    signal(&again.0, "TERM");
    assert!(wait_exit(&mut again.0, Duration::from_secs(30)).await.success());
    db.assert_invariants(10_000, &opening).await;
    assert_one_event_per_transfer(&db, &queue, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_log_reader_went_away_keeps_working_and_still_stops_on_sigterm() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let opening = db.seed(10, 1_000, 300, 44).await;
    let mut cmd = db.worker_command(&queue.url, &["--batch-size", "5"]);
    // Debug logs every batch: plenty of writes to a pipe nobody reads.
    cmd.env("RUST_LOG", "debug").stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stderr.take());
    let mut w = KillOnDrop(child);
    wait_for("everything applied and published", Duration::from_secs(60), || db.settled()).await;
    assert!(w.0.try_wait().unwrap().is_none(), "still running");
    signal(&w.0, "TERM");
    assert_eq!(wait_exit(&mut w.0, Duration::from_secs(10)).await.code(), Some(0));
    db.assert_invariants(10_000, &opening).await;
}

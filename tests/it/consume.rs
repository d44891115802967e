//! The consuming half (`consume`, the consumer library and the projection
//! example) against real PostgreSQL and LocalStack: each event lands once
//! per consumer name whatever SQS does (duplicates, redeliveries) and
//! whatever happens to the consumers (SIGKILL, several replicas).

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue, BIN};
use transfer_worker::outbox::EventBody;
use transfer_worker::transfer::TransferId;

/// Every event in `db`'s outbox, as the relay sends it.
async fn outbox_bodies(db: &TestDb) -> Vec<String> {
    let rows: Vec<(String, String, i64, String, serde_json::Value)> = sqlx::query_as(
        "SELECT event_id::text, event_type, transfer_id,
                to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), data
           FROM outbox ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(event_id, event_type, transfer_id, occurred_at, data)| {
            let body = EventBody {
                event_id,
                event_type: event_type.parse().unwrap(),
                transfer_id: TransferId(transfer_id),
                occurred_at,
                schema_version: 1,
                data: serde_json::from_value(data).unwrap(),
            };
            serde_json::to_string(&body).unwrap()
        })
        .collect()
}

/// Sends each body straight to the queue (a duplicate of what the relay sent).
async fn send_all(queue: &TestQueue, bodies: &[String]) {
    for (n, chunk) in bodies.chunks(10).enumerate() {
        let entries: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut e = SendMessageBatchRequestEntry::builder().id(format!("{n}-{i}")).message_body(b);
                if queue.url.ends_with(".fifo") {
                    let v: serde_json::Value = serde_json::from_str(b).unwrap();
                    e = e
                        .message_group_id(v["transfer_id"].to_string())
                        .message_deduplication_id(format!("dup-{n}-{i}"));
                }
                e.build().unwrap()
            })
            .collect();
        queue.client.send_message_batch().queue_url(&queue.url).set_entries(Some(entries)).send().await.unwrap();
    }
}

fn consume(consumer_db: &TestDb, queue: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("consume")
        .args(["--wait-s", "1", "--admin-addr", "127.0.0.1:0"])
        .args(args)
        .env("DATABASE_URL", &consumer_db.url)
        .env("SQS_QUEUE_URL", queue)
        .env("RUST_LOG", crate::helpers::log_filter())
        .stderr(Stdio::inherit());
    cmd
}

async fn queue_empty(queue: &TestQueue) -> bool {
    queue.messages().await == 0
}

/// The worker publishes 200 transfers' events; every one is sent a second
/// time straight to the queue; `consume --print` lands each once, prints
/// each once, and empties the queue; a second consumer name gets them all too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_lands_once_per_consumer_name_duplicates_dropped() {
    let db = TestDb::new().await;
    let consumer_db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.seed(10, 1_000, 200, 7).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    wait_for("everything published", Duration::from_secs(60), || db.settled()).await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    let bodies = outbox_bodies(&db).await;
    send_all(&queue, &bodies).await;

    let mut ledger = consume(&consumer_db, &queue.url, &["--name", "ledger", "--print"]);
    let mut ledger = KillOnDrop(ledger.stdout(Stdio::piped()).spawn().unwrap());
    let mut stdout = ledger.0.stdout.take().unwrap();
    let printed = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    wait_for("every event landed for ledger", Duration::from_secs(60), || async {
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events WHERE consumer = 'ledger'").await == 200
    })
    .await;
    wait_for("the queue emptied (duplicates deleted too)", Duration::from_secs(30), || queue_empty(&queue)).await;
    signal(&ledger.0, "TERM");
    assert!(wait_exit(&mut ledger.0, Duration::from_secs(30)).await.success(), "exits 0 on SIGTERM");
    let printed: Vec<serde_json::Value> =
        printed.join().unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: HashSet<String> = printed.iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!((printed.len(), ids.len()), (200, 200), "each newly landed event printed once");
    let rows: Vec<(String, String, i64, serde_json::Value)> = sqlx::query_as(
        "SELECT event_id::text, event_type, transfer_id, body FROM consumed_events WHERE consumer = 'ledger'",
    )
    .fetch_all(&consumer_db.pool)
    .await
    .unwrap();
    let sent: HashMap<String, serde_json::Value> = bodies
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            (v["event_id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    for (event_id, event_type, transfer_id, body) in rows {
        let original = &sent[&event_id];
        assert_eq!(&body, original, "the body as published");
        assert_eq!(
            (event_type.as_str(), transfer_id),
            (original["event_type"].as_str().unwrap(), original["transfer_id"].as_i64().unwrap())
        );
    }

    // Another name gets every event too (the duplicates are long deleted:
    // replay them as the relay would).
    send_all(&queue, &bodies).await;
    let _fraud = KillOnDrop(consume(&consumer_db, &queue.url, &["--name", "fraud"]).spawn().unwrap());
    wait_for("every event landed for fraud", Duration::from_secs(60), || async {
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events WHERE consumer = 'fraud'").await == 200
    })
    .await;
    assert_eq!(consumer_db.count_or_zero("SELECT count(*) FROM consumed_events WHERE consumer = 'ledger'").await, 200);
}

/// `--exec` runs inside the inbox transaction: a command that fails for one
/// transfer rolls that event back and it is retried with backoff (not in a
/// hot loop) while every other event lands; once the command succeeds, it
/// lands too. A body that is not one of our events is left alone and never
/// stops the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_exec_is_retried_with_backoff_and_blocks_no_other_event() {
    let db = TestDb::new().await;
    let consumer_db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.seed(5, 1_000, 20, 3).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    wait_for("everything published", Duration::from_secs(60), || db.settled()).await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    queue.client.send_message().queue_url(&queue.url).message_body("hello, not an event").send().await.unwrap();

    let dir = tempdir();
    let tries = format!("{dir}/tries");
    // Fails for transfer 1 until the file `ok` exists; logs every call.
    let script = format!(
        "echo \"$TRANSFER_WORKER_TRANSFER_ID\" >> {tries}; \
         [ \"$TRANSFER_WORKER_TRANSFER_ID\" != 1 ] || [ -e {dir}/ok ] || exit 7; cat > /dev/null"
    );
    let args = ["--name", "n", "--exec", &script, "--backoff-initial-ms", "1000", "--backoff-max-ms", "2000"];
    let _c = KillOnDrop(consume(&consumer_db, &queue.url, &args).spawn().unwrap());
    wait_for("every other event landed", Duration::from_secs(60), || async {
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events WHERE transfer_id <> 1").await == 19
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events WHERE transfer_id = 1").await,
        0,
        "rolled back"
    );
    let tries_of_1 = std::fs::read_to_string(&tries).unwrap().lines().filter(|l| *l == "1").count();
    assert!((1..=4).contains(&tries_of_1), "retried with backoff, not in a loop: {tries_of_1} tries in ~4 s");
    std::fs::write(format!("{dir}/ok"), "").unwrap();
    wait_for("the failing event to land once the command succeeds", Duration::from_secs(30), || async {
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events WHERE transfer_id = 1").await == 1
    })
    .await;
    let calls = std::fs::read_to_string(&tries).unwrap();
    assert_eq!(calls.lines().filter(|l| *l != "1").count(), 19, "each other event ran the command once");
}

fn tempdir() -> String {
    let dir = std::env::temp_dir().join(format!("tw-consume-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.to_string_lossy().into_owned()
}

#[tokio::test]
async fn consume_refuses_bad_input_before_receiving_anything() {
    let consumer_db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    let run = |args: Vec<String>, queue_url: String| {
        let url = consumer_db.url.clone();
        async move {
            let mut cmd = tokio::process::Command::new(BIN);
            cmd.arg("consume").args(&args).env("DATABASE_URL", url).env("SQS_QUEUE_URL", &queue_url);
            if queue_url.contains("127.0.0.1:1/") {
                // Nothing listens there: SQS unreachable.
                cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:1");
            }
            cmd.output().await.unwrap()
        }
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let missing = queue.url.replace("tw-test-", "no-such-queue-");
    for (args, url, code, needle) in [
        (s(&["--name", ""]), queue.url.clone(), 2, "--name"),
        (s(&["--name", "x", "--exec", "no-such-command-tw --flag"]), queue.url.clone(), 2, "no-such-command-tw"),
        (s(&["--name", "x"]), missing.clone(), 2, "does not exist"),
        (s(&["--name", "x", "--retention", "1d"]), queue.url.clone(), 2, "--retention"),
        (s(&["--name", "x"]), "http://127.0.0.1:1/queue/us-east-1/000000000000/q".into(), 1, "cannot reach the queue"),
    ] {
        let out = run(args.clone(), url.clone()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        if needle == "does not exist" || needle.contains("reach") {
            assert!(stderr.contains(&url), "names the URL: {stderr}");
        }
    }
    let tables = consumer_db.scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'consumed_events'").await;
    assert!(tables <= 1);
}

fn projection(consumer_db: &TestDb, queue: &str) -> Child {
    let exe = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("examples/projection");
    Command::new(exe)
        .args(["--name", "projection", "--visibility-timeout-s", "2"])
        .env("DATABASE_URL", &consumer_db.url)
        .env("SQS_QUEUE_URL", queue)
        .env("RUST_LOG", crate::helpers::log_filter())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cargo test builds the examples")
}

/// The proof: the worker moves money for 2,000 transfers with
/// cancels and refunds; every event also arrives a second time; two
/// replicas of the projection example consume, and are SIGKILLed again and
/// again mid-batch. At the end the projection equals the worker's balances
/// exactly, and each event is in the inbox once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_from_events_alone_equals_the_balances_across_duplicates_kills_and_replicas() {
    use transfer_worker::transfer::cancel::cancel;
    use transfer_worker::transfer::refund::request_refund;

    let db = TestDb::new().await;
    let consumer_db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    let opening = db.seed(50, 10_000, 2_000, 11).await;
    for id in (1..=2_000).step_by(20) {
        let _ = cancel(&db.pool, TransferId(id)).await;
    }
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    let mut replicas =
        [KillOnDrop(projection(&consumer_db, &queue.url)), KillOnDrop(projection(&consumer_db, &queue.url))];
    wait_for("transfers applied", Duration::from_secs(60), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await == 0
    })
    .await;
    let succeeded: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM transfers WHERE status = 'SUCCEEDED' ORDER BY id LIMIT 300")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for id in succeeded.iter().step_by(2) {
        let _ = request_refund(&db.pool, TransferId(*id), None).await;
    }
    // Kill a replica every 700 ms, mid-batch, and start it again.
    for round in 0..14 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = &mut replicas[round % 2];
        let _ = r.0.kill();
        let _ = r.0.wait();
        r.0 = projection(&consumer_db, &queue.url);
    }
    wait_for("everything published", Duration::from_secs(60), || db.settled()).await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    send_all(&queue, &outbox_bodies(&db).await).await;
    let events = db.scalar("SELECT count(*) FROM outbox").await;
    wait_for("every event in the projection's inbox", Duration::from_secs(120), || async {
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events").await == events
    })
    .await;
    wait_for("the duplicates dropped and deleted", Duration::from_secs(60), || queue_empty(&queue)).await;
    for r in &mut replicas {
        signal(&r.0, "TERM");
        assert!(wait_exit(&mut r.0, Duration::from_secs(30)).await.success());
    }

    assert_eq!(
        consumer_db.scalar("SELECT count(DISTINCT event_id) FROM consumed_events").await,
        events,
        "each event once"
    );
    let balances: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, balance FROM accounts").fetch_all(&db.pool).await.unwrap();
    let projected: HashMap<i64, i64> = sqlx::query_as("SELECT account_id, delta FROM projected_balances")
        .fetch_all(&consumer_db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for (id, balance) in balances {
        assert_eq!(opening[&id] + projected.get(&id).copied().unwrap_or(0), balance, "account {id}");
    }
    assert!(
        db.scalar("SELECT count(*) FROM transfers WHERE refund_status = 'COMPLETED'").await > 0,
        "refunds were part of it"
    );
}

/// On a FIFO queue the events of one transfer (one message group) land in
/// the order they happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_fifo_queue_each_transfers_events_land_in_order() {
    use transfer_worker::transfer::refund::request_refund;
    let db = TestDb::new().await;
    let consumer_db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.seed(5, 100_000, 40, 5).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    wait_for("applied", Duration::from_secs(60), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await == 0
    })
    .await;
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM transfers WHERE status = 'SUCCEEDED'").fetch_all(&db.pool).await.unwrap();
    for id in &ids {
        let _ = request_refund(&db.pool, TransferId(*id), None).await;
    }
    wait_for("everything published", Duration::from_secs(60), || db.settled()).await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    let events = db.scalar("SELECT count(*) FROM outbox").await;
    let _c =
        KillOnDrop(consume(&consumer_db, &queue.url, &["--name", "ordered", "--concurrency", "8"]).spawn().unwrap());
    wait_for("every event landed", Duration::from_secs(60), || async {
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events").await == events
    })
    .await;
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT transfer_id, event_type FROM consumed_events ORDER BY received_at, event_id")
            .fetch_all(&consumer_db.pool)
            .await
            .unwrap();
    let mut last: HashMap<i64, u8> = HashMap::new();
    for (transfer, event_type) in rows {
        let seq = event_type.parse::<transfer_worker::outbox::EventType>().unwrap().sequence();
        let before = last.insert(transfer, seq).unwrap_or(0);
        assert!(seq > before, "transfer {transfer}: {event_type} landed after a later event");
    }
}

/// Two copies of one event in the same received batch: one lands, one is a
/// duplicate (printed once, counted once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_in_one_batch_land_once() {
    let db = TestDb::new().await;
    let consumer_db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.seed(3, 1_000, 1, 1).await;
    db.apply_all().await;
    let body = outbox_bodies(&db).await.remove(0);
    send_all(&queue, &[body.clone(), body]).await;
    let mut c = consume(&consumer_db, &queue.url, &["--name", "twice", "--print"]);
    let mut c = KillOnDrop(c.stdout(Stdio::piped()).spawn().unwrap());
    let mut stdout = c.0.stdout.take().unwrap();
    let printed = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    wait_for("landed and the queue emptied", Duration::from_secs(30), || async {
        consumer_db.count_or_zero("SELECT count(*) FROM consumed_events").await == 1 && queue_empty(&queue).await
    })
    .await;
    signal(&c.0, "TERM");
    assert!(wait_exit(&mut c.0, Duration::from_secs(30)).await.success());
    assert_eq!(printed.join().unwrap().lines().count(), 1, "printed once");
}

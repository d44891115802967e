//! The relay against real LocalStack queues: exactly once on FIFO, at least
//! once on standard queues, per-transfer order, outages, rejections.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use transfer_worker::service::Service;

use aws_sdk_sqs::types::QueueAttributeName;
use tokio::sync::Notify;
use transfer_worker::outbox::publisher::Publisher;
use transfer_worker::outbox::relay::{Relay, RelayConfig};
use transfer_worker::outbox::sqs::Delivery;
use transfer_worker::retry::RetryPolicy;

use crate::helpers::{sqs_config, wait_for, TestDb, TestQueue};

const TYPES: [&str; 3] = ["transfer.succeeded", "refund.requested", "refund.completed"];

/// Creates `transfers` SUCCEEDED transfers, then `per_transfer` events for
/// each, interleaved across transfers (as real traffic is). Returns each
/// transfer's event ids in the order they were written.
async fn seed_events(
    db: &TestDb,
    transfers: i64,
    per_transfer: usize,
    key: impl Fn(i64) -> String,
) -> HashMap<i64, Vec<String>> {
    db.open_account(1, 0).await;
    db.open_account(2, 0).await;
    for t in 1..=transfers {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO transfers (idempotency_key, from_account, to_account, amount, status)
             VALUES ($1, 1, 2, 10, 'SUCCEEDED') RETURNING id",
        )
        .bind(key(t))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(id, t, "a fresh database numbers transfers from 1");
    }
    let mut written: HashMap<i64, Vec<String>> = HashMap::new();
    for round in 0..per_transfer {
        for t in 1..=transfers {
            let event_id = add_event(db, t, TYPES[round % TYPES.len()]).await;
            written.entry(t).or_default().push(event_id);
        }
    }
    written
}

async fn add_event(db: &TestDb, transfer_id: i64, event_type: &str) -> String {
    sqlx::query_scalar(
        "INSERT INTO outbox (transfer_id, event_type, data)
         SELECT id, $2, transfer_event_data(t, $2) FROM transfers t WHERE id = $1
         RETURNING event_id::text",
    )
    .bind(transfer_id)
    .bind(event_type)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn relay_config(batch_size: i64, max_attempts: i32) -> RelayConfig {
    let fast = RetryPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(50), multiplier: 2.0 };
    RelayConfig {
        batch_size,
        max_attempts,
        rejection_retry: fast,
        outage_retry: fast,
        poll_interval: Duration::from_millis(50),
        lease: Duration::from_secs(30),
        ..RelayConfig::default()
    }
}

fn relay(db: &TestDb, publisher: Publisher, batch_size: i64, max_attempts: i32) -> Relay {
    Relay::new(db.pool.clone(), publisher, relay_config(batch_size, max_attempts), Arc::new(Notify::new()))
}

/// A publisher whose endpoint is a closed port: SQS "unreachable".
async fn unreachable(queue: &TestQueue) -> Publisher {
    let conf = queue.client.config().to_builder().endpoint_url("http://127.0.0.1:9").build();
    Publisher::new(aws_sdk_sqs::Client::from_conf(conf), &sqs_config(&queue.url))
}

/// Events not yet published.
pub(crate) async fn pending(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM outbox WHERE state <> 'published'").await
}

#[tokio::test]
async fn two_relays_publish_each_event_exactly_once_on_a_fifo_queue_in_per_transfer_order() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let written = seed_events(&db, 40, 3, |t| format!("k-{t}")).await;
    let mut relays = Vec::new();
    for _ in 0..2 {
        let r = relay(&db, queue.publisher().await, 15, 5);
        let pool = db.pool.clone();
        relays.push(tokio::spawn(async move {
            let mut published = 0;
            loop {
                let c = r.run_once().await.unwrap();
                published += c.published;
                let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state <> 'published'")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                if left == 0 {
                    return published;
                }
            }
        }));
    }
    let mut total = 0;
    for r in relays {
        total += tokio::time::timeout(Duration::from_secs(60), r).await.expect("relays finish").unwrap();
    }
    assert_eq!(total, 120, "each event marked published once");

    let received = queue.receive(120, Duration::from_secs(2)).await;
    let ids: HashSet<&str> = received.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(received.len(), 120, "exactly once on a FIFO queue");
    assert_eq!(ids.len(), 120);
    let mut per_transfer: HashMap<i64, Vec<String>> = HashMap::new();
    for e in &received {
        per_transfer.entry(e.transfer_id.0).or_default().push(e.event_id.clone());
    }
    assert_eq!(per_transfer, written, "per-transfer order is the order written");
    let first = &received[0];
    assert_eq!(first.data.from_account.0, 1);
    assert_eq!(first.data.idempotency_key, format!("k-{}", first.transfer_id));
    assert!(first.occurred_at.ends_with('Z'));
}

#[tokio::test]
async fn the_relay_delivers_every_event_at_least_once_on_a_standard_queue() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    let written = seed_events(&db, 25, 2, |t| format!("k-{t}")).await;
    db.relay_all(queue.publisher().await).await;
    assert_eq!(pending(&db).await, 0);
    let received = queue.receive(50, Duration::from_secs(1)).await;
    let got: HashSet<String> = received.iter().map(|e| e.event_id.clone()).collect();
    let want: HashSet<String> = written.values().flatten().cloned().collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn an_unreachable_sqs_leaves_events_pending_uncounted_and_they_all_go_out_once_it_is_back() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let written = seed_events(&db, 12, 1, |t| format!("k-{t}")).await;

    let down = relay(&db, unreachable(&queue).await, 100, 2);
    for _ in 0..5 {
        let c = down.run_once().await.unwrap();
        assert_eq!((c.claimed, c.unavailable, c.published, c.rejected, c.dead), (12, 12, 0, 0, 0));
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0").await,
        12,
        "an outage never counts, however long"
    );
    assert!(db.scalar("SELECT count(*) FROM outbox WHERE last_error IS NOT NULL").await > 0, "the cause is visible");

    let up = relay(&db, queue.publisher().await, 100, 2);
    let c = up.run_once().await.unwrap();
    assert_eq!(c.published, 12);
    let received = queue.receive(12, Duration::from_secs(1)).await;
    let got: HashSet<String> = received.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(got, written.values().flatten().cloned().collect());
    assert_eq!(received.len(), 12);
}

#[tokio::test]
async fn a_missing_queue_is_an_outage_not_a_rejection() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    seed_events(&db, 3, 1, |t| format!("k-{t}")).await;
    let missing_url = format!("{}-does-not-exist", queue.url);
    let publisher = Publisher::new(queue.client.clone(), &sqs_config(&missing_url));
    let r = relay(&db, publisher, 100, 1);
    for _ in 0..3 {
        let c = r.run_once().await.unwrap();
        assert_eq!((c.unavailable, c.dead), (3, 0));
    }
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0").await, 3);
}

#[tokio::test]
async fn a_rejected_entry_is_retried_alone_then_dead_and_holds_only_its_own_transfer() {
    let db = TestDb::new().await;
    // SQS rejects (per entry, SenderFault) messages over the queue's maximum
    // size; transfer 1's key makes its events larger than 1 KiB.
    let queue = TestQueue::with_attributes(false, &[(QueueAttributeName::MaximumMessageSize, "1024")]).await;
    let huge_key = "k".repeat(1100);
    seed_events(&db, 6, 1, |t| if t == 1 { huge_key.clone() } else { format!("k-{t}") }).await;
    let later_of_1 = add_event(&db, 1, "refund.requested").await;
    let r = relay(&db, queue.publisher().await, 100, 2);

    let c = r.run_once().await.unwrap();
    assert_eq!((c.claimed, c.published, c.rejected, c.dead), (6, 5, 1, 0), "the others are published");
    let (attempts, state, error): (i32, String, String) =
        sqlx::query_as("SELECT attempts, state, last_error FROM outbox WHERE transfer_id = 1 ORDER BY id LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((attempts, state.as_str()), (1, "pending"));
    assert!(error.contains("InvalidParameterValue"), "{error}");

    wait_for("the rejected event to die", Duration::from_secs(10), || async {
        let c = r.run_once().await.unwrap();
        assert!(c.claimed <= 1, "retried alone, and its later event is never claimed ahead of it");
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'dead'").await == 1
    })
    .await;
    assert_eq!(db.scalar("SELECT attempts::bigint FROM outbox WHERE state = 'dead'").await, 2);

    // Other transfers' new events still flow; transfer 1's later event is held.
    add_event(&db, 2, "refund.requested").await;
    let c = r.run_once().await.unwrap();
    assert_eq!((c.claimed, c.published), (1, 1));
    let status = db.cli(&["status", "--json"]).await.json();
    assert_eq!(status["outbox"]["dead"], 1);
    assert_eq!(status["outbox"]["held"], 1);
    assert_eq!(status["outbox"]["pending"], 0);
    assert_eq!(status["outbox"]["published"], 6);
    assert!(status["oldest_unpublished_age_s"].as_f64().unwrap() >= 0.0);
    let human = db.cli(&["status"]).await.stdout;
    assert!(human.contains("dead events"), "{human}");
    assert!(human.contains("InvalidParameterValue"), "the operator sees why: {human}");

    let received = queue.receive(6, Duration::from_secs(1)).await;
    assert_eq!(received.len(), 6);
    assert!(received.iter().all(|e| e.transfer_id.0 != 1), "nothing of transfer 1 went out");
    assert!(!received.iter().any(|e| e.event_id == later_of_1));
}

fn relay_with_lease(db: &TestDb, publisher: Publisher, lease: Duration) -> Relay {
    let mut r = relay_config(100, 5);
    r.lease = lease;
    Relay::new(db.pool.clone(), publisher, r, Arc::new(Notify::new()))
}

#[tokio::test]
async fn events_go_out_again_after_a_crash_between_send_and_record_and_fifo_drops_the_copy() {
    let db = TestDb::new().await;
    let fifo = TestQueue::new(true).await;
    let standard = TestQueue::new(false).await;
    seed_events(&db, 5, 1, |t| format!("k-{t}")).await;
    for queue in [&fifo, &standard] {
        sqlx::query("UPDATE outbox SET state = 'pending', published_at = NULL, destination = NULL")
            .execute(&db.pool)
            .await
            .unwrap();
        let crashed = relay_with_lease(&db, queue.publisher().await, Duration::from_secs(1));
        // SQS accepted the batch, then the process died before recording it.
        let claim = crashed.claim().await.unwrap();
        let outcomes = crashed.send(&claim).await.outcomes;
        assert_eq!(outcomes.len(), 5);
        drop((claim, outcomes, crashed));

        let next = relay_with_lease(&db, queue.publisher().await, Duration::from_secs(1));
        assert_eq!(next.run_once().await.unwrap().claimed, 0, "a live lease keeps the events off other relays");
        wait_for(
            "the dead relay's lease to expire and the events to go out again",
            Duration::from_secs(10),
            || async {
                next.run_once().await.unwrap();
                pending(&db).await == 0
            },
        )
        .await;
    }
    let from_fifo = fifo.receive(5, Duration::from_secs(2)).await;
    assert_eq!(from_fifo.len(), 5, "FIFO deduplicates by event_id");
    let from_standard = standard.receive(10, Duration::from_secs(2)).await;
    assert_eq!(from_standard.len(), 10, "a standard queue gets the copy");
    let distinct: HashSet<&str> = from_standard.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(distinct.len(), 5, "consumers deduplicate by event_id");
}

#[tokio::test]
async fn a_send_that_outlives_its_lease_is_resent_by_another_relay_and_its_late_outcome_is_dropped() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let written = seed_events(&db, 4, 2, |t| format!("k-{t}")).await;
    let slow = relay_with_lease(&db, queue.publisher().await, Duration::from_millis(500));
    let claim = slow.claim().await.unwrap();
    assert_eq!(claim.events.len(), 4, "the first event of each transfer");
    let outcomes = slow.send(&claim).await.outcomes;
    // The slow relay's lease runs out before it records; another relay
    // claims the same events again and publishes everything, in order.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let other = relay_with_lease(&db, queue.publisher().await, Duration::from_secs(30));
    wait_for("the other relay to publish everything", Duration::from_secs(10), || async {
        other.run_once().await.unwrap();
        pending(&db).await == 0
    })
    .await;
    let late = slow.record(claim, &outcomes).await.unwrap();
    assert_eq!((late.published, late.lost_lease), (0, 4), "the stale outcome changes nothing");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await, 8);

    let received = queue.receive(8, Duration::from_secs(2)).await;
    let mut per_transfer: HashMap<i64, Vec<String>> = HashMap::new();
    for e in received {
        per_transfer.entry(e.transfer_id.0).or_default().push(e.event_id);
    }
    assert_eq!(per_transfer, written, "each event once (FIFO dedup), per-transfer order kept");
}

#[tokio::test]
async fn requeue_brings_a_dead_event_back_and_it_goes_out_before_the_events_it_held() {
    let db = TestDb::new().await;
    let queue = TestQueue::with_attributes(true, &[(QueueAttributeName::MaximumMessageSize, "1024")]).await;
    let huge_key = "k".repeat(1100);
    let written = seed_events(&db, 2, 1, |t| if t == 1 { huge_key.clone() } else { format!("k-{t}") }).await;
    let held = add_event(&db, 1, "refund.requested").await;
    let r = relay(&db, queue.publisher().await, 100, 1);
    let c = r.run_once().await.unwrap();
    assert_eq!((c.published, c.dead), (1, 1));
    let dead_id = &written[&1][0];

    let not_dead = db.cli(&["outbox", "requeue", "--event", &held]).await;
    assert_eq!(not_dead.code, 3, "{not_dead:?}");
    assert!(not_dead.stderr.contains("is pending"), "{}", not_dead.stderr);
    let missing = db.cli(&["outbox", "requeue", "--event", "987654"]).await;
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(missing.stderr.contains("event 987654 does not exist"), "{}", missing.stderr);
    let bad = db.cli(&["outbox", "requeue", "--event", "not-an-id"]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE state = 'dead'").await, 1, "nothing written");

    // The operator fixes the cause, then requeues.
    queue.set_max_message_size(1_048_576).await;
    let out = db.cli(&["outbox", "requeue", "--event", dead_id]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), serde_json::json!({"requeued": 1}));
    let fresh = "SELECT count(*) FROM outbox WHERE event_id::text = $1 AND state = 'pending' AND attempts = 0";
    assert_eq!(db.scalar_with(fresh, dead_id).await, 1, "a requeued event starts over");

    wait_for("the requeued and the held event to go out", Duration::from_secs(10), || async {
        r.run_once().await.unwrap();
        pending(&db).await == 0
    })
    .await;
    let received = queue.receive(3, Duration::from_secs(1)).await;
    let of_1: Vec<&str> = received.iter().filter(|e| e.transfer_id.0 == 1).map(|e| e.event_id.as_str()).collect();
    assert_eq!(of_1, vec![dead_id.as_str(), held.as_str()], "the requeued event first, then the one it held");
    assert_eq!(db.cli(&["outbox", "requeue"]).await.json(), serde_json::json!({"requeued": 0}));
}

/// A black hole: accepts connections and never answers. Returns its address
/// and a counter of connections it accepted.
async fn black_hole() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sqs_holds_no_transaction_and_no_lock_while_the_relay_waits_on_it() {
    use transfer_worker::transfer::apply::{Applier, ApplyConfig};
    use transfer_worker::transfer::cancel::cancel;
    use transfer_worker::transfer::refund::request_refund;
    use transfer_worker::transfer::TransferId;

    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    seed_events(&db, 5, 1, |t| format!("k-{t}")).await;
    let (addr, accepted) = black_hole().await;
    let conf = queue.client.config().to_builder().endpoint_url(format!("http://{addr}")).build();
    let mut config = sqs_config(&queue.url);
    config.call_timeout = Duration::from_secs(8);
    let hung = Arc::new(relay(&db, Publisher::new(aws_sdk_sqs::Client::from_conf(conf), &config), 100, 5));
    let in_flight = tokio::spawn({
        let hung = hung.clone();
        async move { hung.run_once().await.unwrap() }
    });
    wait_for("the relay to be inside its send", Duration::from_secs(5), || async {
        accepted.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    // Claimed under a lease, with no transaction open anywhere.
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE claimed_until > now()").await, 5);
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
        )
        .await,
        0,
        "no transaction is held open across the SQS call"
    );

    // Meanwhile the worker applies new transfers on the same accounts, and
    // requests on the very transfers whose events the relay holds go through.
    sqlx::query("UPDATE accounts SET balance = 100").execute(&db.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('n1', 1, 2, 10), ('n2', 2, 1, 5)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default());
    assert_eq!(applier.run_once().await.unwrap().succeeded, 2);
    request_refund(&db.pool, TransferId(1), None).await.unwrap();
    let n3: i64 = sqlx::query_scalar(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('n3', 1, 2, 1) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    cancel(&db.pool, TransferId(n3)).await.unwrap();
    assert!(applier.run_once().await.unwrap().succeeded >= 1, "the refund completes");
    // VACUUM is not held back either: no snapshot of ours is open.
    sqlx::query("VACUUM outbox").execute(&db.pool).await.unwrap();
    assert!(!in_flight.is_finished(), "the relay was still waiting on SQS all along");

    let c = in_flight.await.unwrap();
    assert_eq!((c.unavailable, c.dead), (5, 0), "a timeout is an outage, not a rejection");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE claimed_until IS NOT NULL").await, 0, "leases given back");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE attempts > 0").await, 0);
}

#[tokio::test]
async fn a_body_sqs_would_refuse_is_escaped_and_decodes_to_exactly_what_the_database_holds() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    // A SQL producer's key with characters SQS refuses in a message.
    let key = "order-\u{FFFF}-\u{FFFE}-\u{1}-end";
    let written = seed_events(&db, 3, 1, |t| if t == 2 { key.to_string() } else { format!("k-{t}") }).await;
    let stored: String =
        sqlx::query_scalar("SELECT idempotency_key FROM transfers WHERE id = 2").fetch_one(&db.pool).await.unwrap();
    assert_eq!(stored, key);
    let r = relay(&db, queue.publisher().await, 100, 1);
    let c = r.run_once().await.unwrap();
    assert_eq!((c.published, c.rejected, c.dead, c.deferred, c.unavailable), (3, 0, 0, 0, 0), "{c:?}");
    let received = queue.receive(3, Duration::from_secs(1)).await;
    let got: HashSet<String> = received.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(got, written.values().flatten().cloned().collect());
    let of_2 = received.iter().find(|e| e.transfer_id.0 == 2).unwrap();
    assert_eq!(of_2.data.idempotency_key, key, "the consumer decodes exactly the stored key");
}

#[tokio::test]
async fn sqs_refusing_one_entry_backs_off_that_event_only_never_the_pass() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    seed_events(&db, 3, 1, |t| format!("k-{t}")).await;
    // What LocalStack answers for a body with U+FFFF (had it not been
    // escaped): a per-entry InvalidMessageContents with SenderFault false.
    let publisher = queue.publisher().await;
    let poisoned = transfer_worker::outbox::message::Outgoing {
        outbox_id: 1,
        transfer_id: transfer_worker::transfer::TransferId(1),
        event_id: "e-1".into(),
        dedup_id: "e-1".into(),
        event_type: transfer_worker::outbox::EventType::TransferSucceeded,
        body: "{\"k\":\"\u{FFFF}\"}".into(),
        traceparent: None,
    };
    let fine = transfer_worker::outbox::message::Outgoing { outbox_id: 2, body: "{}".into(), ..poisoned.clone() };
    let outcomes = publisher.publish(&[poisoned, fine]).await.outcomes;
    assert_eq!(outcomes[&2], Delivery::Sent);
    match &outcomes[&1] {
        Delivery::Rejected(e) => assert_eq!(e.code, "InvalidMessageContents", "{e}"),
        other => panic!("the message's own fault, counted: {other:?}"),
    }

    // In the running relay, with a long outage backoff: an event SQS refuses
    // (too large for this queue) never delays other transfers' events.
    let small = TestQueue::with_attributes(false, &[(QueueAttributeName::MaximumMessageSize, "1024")]).await;
    let db = TestDb::new().await;
    let huge_key = "k".repeat(1100);
    seed_events(&db, 3, 1, |t| if t == 1 { huge_key.clone() } else { format!("k-{t}") }).await;
    let mut config = relay_config(100, 1_000);
    config.outage_retry =
        RetryPolicy { initial: Duration::from_secs(30), max: Duration::from_secs(30), multiplier: 2.0 };
    config.poll_interval = Duration::from_millis(100);
    let wake = Arc::new(Notify::new());
    let r = Arc::new(Relay::new(db.pool.clone(), small.publisher().await, config, wake.clone()));
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(transfer_worker::service::run(r.clone(), stop.clone()));
    wait_for("the others to be published", Duration::from_secs(5), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await == 2
    })
    .await;
    for t in 2..=3 {
        add_event(&db, t, "refund.requested").await;
    }
    wake.notify_waiters();
    wait_for("new events of other transfers, at once", Duration::from_secs(3), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await == 4
    })
    .await;
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox WHERE transfer_id = 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(attempts >= 1, "the refused event's attempts are counted");
    assert!(error.contains("InvalidParameterValue"), "{error}");
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn a_whole_call_error_is_never_counted_even_for_a_batch_of_one() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    seed_events(&db, 1, 1, |t| format!("k-{t}")).await;
    // A misconfiguration: FIFO attributes left off for a FIFO queue. SQS
    // fails the whole call (InvalidParameterValue), however many entries.
    let misconfigured = queue.publisher().await.with_fifo(false);
    let r = relay(&db, misconfigured, 100, 1);
    for _ in 0..3 {
        let c = r.run_once().await.unwrap();
        assert_eq!((c.claimed, c.unavailable, c.rejected, c.dead), (1, 1, 0, 0), "{c:?}");
    }
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0").await, 1);
}

#[tokio::test]
async fn a_fifo_queue_url_with_a_trailing_slash_keeps_the_fifo_attributes() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    seed_events(&db, 2, 1, |t| format!("k-{t}")).await;
    let with_slash = Publisher::new(queue.client.clone(), &sqs_config(&format!("{}/", queue.url)));
    assert!(with_slash.is_fifo());
    let c = relay(&db, with_slash, 100, 1).run_once().await.unwrap();
    assert_eq!(c.published, 2, "{c:?}");
    // `receive` checks MessageGroupId and MessageDeduplicationId on FIFO queues.
    assert_eq!(queue.receive(2, Duration::from_secs(1)).await.len(), 2);

    // And SQS's own word is taken over the URL's.
    let mut asked = Publisher::new(queue.client.clone(), &sqs_config(&queue.url)).with_fifo(false);
    assert!(asked.check().await.unwrap().fifo);
    assert!(asked.is_fifo());
}

/// A row written by hand whose data is not an event's cannot stall the
/// relay: it is rejected as its own fault (never sent), dead after the
/// configured attempts and shown by `status`, while the others go out.
#[tokio::test]
async fn an_outbox_row_whose_data_is_not_an_event_is_dead_and_blocks_nothing() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    seed_events(&db, 3, 1, |t| format!("k-{t}")).await;
    sqlx::query("INSERT INTO outbox (transfer_id, event_type, data) VALUES (999, 'transfer.cancelled', '{\"x\": 1}')")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut config = relay_config(100, 1);
    config.max_attempts = 1;
    let relay = Relay::new(db.pool.clone(), queue.publisher().await, config, Default::default());
    let c = relay.run_once().await.unwrap();
    assert_eq!((c.claimed, c.published, c.dead), (4, 3, 1), "{c:?}");
    let (state, error): (String, String) =
        sqlx::query_as("SELECT state, last_error FROM outbox WHERE transfer_id = 999")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state, "dead");
    assert!(error.contains("MalformedEvent") && error.contains("not an event"), "{error}");
    assert_eq!(queue.receive(3, Duration::from_secs(1)).await.len(), 3);
    assert_eq!(db.cli(&["status", "--json"]).await.json()["outbox"]["dead"], 1);
}

/// A proxy in front of LocalStack that swallows its first connection (a
/// call that hangs) and forwards every later one. Returns its address and a
/// counter of connections it accepted.
async fn first_call_hangs() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("the test services set AWS_ENDPOINT_URL");
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut client, _)) = listener.accept().await {
            if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                held.push(client);
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_never_waits_for_another_transfers_sqs_call_and_a_transfers_events_keep_their_order() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    let written = seed_events(&db, 1, 2, |t| format!("k-{t}")).await;
    let (addr, accepted) = first_call_hangs().await;
    let conf = queue.client.config().to_builder().endpoint_url(format!("http://{addr}")).build();
    let mut config = sqs_config(&queue.url);
    config.call_timeout = Duration::from_secs(6);
    let publisher = Publisher::new(aws_sdk_sqs::Client::from_conf(conf), &config);
    let wake = Arc::new(Notify::new());
    // One relay task: without pipelining, its next claim waits for the call.
    let r = Arc::new(Relay::new(db.pool.clone(), publisher, relay_config(100, 5), wake.clone()));
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(transfer_worker::service::run(r.clone(), stop.clone()));
    wait_for("transfer 1's first event to be inside a hung call", Duration::from_secs(5), || async {
        accepted.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;

    // Another transfer's event, written while that call hangs.
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount, status) VALUES ('k-2', 1, 2, 10, 'SUCCEEDED')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let other = add_event(&db, 2, "transfer.succeeded").await;
    wake.notify_one();
    let published = "SELECT count(*) FROM outbox WHERE event_id::text = $1 AND state = 'published'";
    let started = std::time::Instant::now();
    wait_for("the other transfer's event, without waiting for the hung call", Duration::from_secs(2), || async {
        db.scalar_with(published, &other).await == 1
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let of_1 = &written[&1];
    assert_eq!(db.scalar_with(published, &of_1[0]).await, 0, "still with the hung call");
    assert_eq!(db.scalar_with(published, &of_1[1]).await, 0, "transfer 1's second event waits for its first");

    // The hung call times out; its event goes again, then the one it held.
    wait_for("transfer 1's events after the timeout", Duration::from_secs(20), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await == 3
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    let received = queue.receive(3, Duration::from_secs(1)).await;
    let order: Vec<&str> = received.iter().filter(|e| e.transfer_id.0 == 1).map(|e| e.event_id.as_str()).collect();
    assert_eq!(order, vec![of_1[0].as_str(), of_1[1].as_str()], "per-transfer order");
    assert_eq!(received.len(), 3);
}

//! Several destinations: events routed by type to SQS queues and SNS topics
//! (subscribed by queues with raw delivery), each (event, destination) with
//! its own delivery state, so one destination's outage or dead event never
//! delays another's; CloudEvents on request; the schema every body meets.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use transfer_worker::outbox::{EventBody, EventType};

use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue, TestTopic};

/// The schema in the repository, compiled.
fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schema/event.v1.json")).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).expect("a valid JSON Schema")
}

/// Each transfer's event types in arrival order.
fn by_transfer(events: &[EventBody]) -> HashMap<i64, Vec<EventType>> {
    let mut out: HashMap<i64, Vec<EventType>> = HashMap::new();
    for e in events {
        out.entry(e.transfer_id.0).or_default().push(e.event_type);
    }
    out
}

/// Transfers 1 -> 2 (some too large to succeed), refunds of the first few.
async fn traffic(db: &TestDb, n: usize) {
    for i in 0..n {
        let amount = if i % 4 == 3 { 1_000_000 } else { 10 };
        db.enqueue_sql(&format!("r-{i}"), 1, 2, amount).await;
    }
    wait_for("the transfers applied", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await == 0
    })
    .await;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM transfers WHERE status = 'SUCCEEDED' ORDER BY id LIMIT 4")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for id in ids {
        assert_eq!(db.cli(&["refund", &id.to_string(), "--amount", "5"]).await.code, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_routed_by_type_to_queues_and_topics_each_in_order_and_in_its_format() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let ledger = TestQueue::new(true).await;
    let refunds = TestQueue::new(false).await;
    let alerts = TestTopic::new(false).await;
    let routes = [
        format!("transfer.*={}", ledger.url),
        format!("refund.*={};cloudevents", refunds.url),
        format!("*.failed={}", alerts.arn),
    ];
    let addr = format!("127.0.0.1:{}", crate::admin::free_port());
    let mut args = vec!["--event-source", "payments/test", "--admin-addr", addr.as_str()];
    for r in &routes {
        args.extend(["--route", r.as_str()]);
    }
    let mut w = KillOnDrop(db.spawn_worker("http://unused.invalid/1/q", &args));
    traffic(&db, 12).await;

    let schema = schema();
    // The ledger: every transfer's outcome, nothing else, FIFO ids checked.
    let got = ledger.receive(12, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 12, "{got:?}");
    assert!(got.iter().all(|e| e.event_type.as_str().starts_with("transfer.")));
    // Refunds: CloudEvents whose data is the native body.
    let messages = refunds.receive_messages(8, Duration::from_millis(500)).await;
    assert_eq!(messages.len(), 8);
    let mut refund_events = Vec::new();
    for m in &messages {
        let ce: serde_json::Value = serde_json::from_str(m.body().unwrap()).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["source"], "payments/test");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["id"], ce["data"]["event_id"]);
        assert_eq!(ce["type"], ce["data"]["event_type"]);
        assert_eq!(ce["subject"], ce["data"]["transfer_id"].to_string());
        assert_eq!(ce["time"], ce["data"]["occurred_at"]);
        assert!(schema.is_valid(&ce["data"]), "{ce}");
        refund_events.push(serde_json::from_value::<EventBody>(ce["data"].clone()).unwrap());
    }
    assert!(refund_events.iter().all(|e| e.event_type.as_str().starts_with("refund.")));
    for (id, types) in by_transfer(&refund_events) {
        let mut sorted = types.clone();
        sorted.sort_by_key(|t| t.sequence());
        assert_eq!(sorted, [EventType::RefundRequested, EventType::RefundCompleted], "transfer {id}");
    }
    // The topic's subscriber: the failures, with the event_type attribute.
    let failed = alerts.queue.receive(3, Duration::from_millis(500)).await;
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(failed.iter().all(|e| e.event_type == EventType::TransferFailed));
    // Every native body meets the schema.
    for e in got.iter().chain(&failed) {
        assert!(schema.is_valid(&serde_json::to_value(e).unwrap()), "{e:?}");
    }
    // In order per transfer, at the FIFO ledger.
    let expected = db.events_by_transfer().await;
    for (id, types) in by_transfer(&got) {
        let want: Vec<EventType> =
            expected[&id].iter().copied().filter(|t| t.as_str().starts_with("transfer.")).collect();
        assert_eq!(types, want, "transfer {id}");
    }
    // One row per (event, destination); status shows each destination.
    wait_for("every delivery recorded", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state <> 'published'").await == 0
    })
    .await;
    let status = db.cli(&["status", "--json"]).await.json();
    let destinations = &status["destinations"];
    assert_eq!(destinations[&ledger.url]["published"], 12, "{status}");
    assert_eq!(destinations[&refunds.url]["published"], 8, "{status}");
    assert_eq!(destinations[&alerts.arn]["published"], 3, "{status}");
    let ids: i64 = db.scalar("SELECT count(DISTINCT event_id) FROM outbox").await;
    assert_eq!(ids, 12 + 8, "one event_id per event, whatever its destinations");
    // A failed transfer's story: one event, two deliveries, one event_id.
    let failed_id: i64 = db.scalar("SELECT min(id) FROM transfers WHERE status = 'FAILED'").await;
    let shown = db.cli(&["transfer", "show", &failed_id.to_string()]).await.json();
    let events = shown["events"].as_array().unwrap();
    let mut to: Vec<&str> = events.iter().map(|e| e["destination"].as_str().unwrap()).collect();
    to.sort();
    let mut want = [ledger.url.as_str(), alerts.arn.as_str()];
    want.sort();
    assert_eq!(to, want, "{shown}");
    assert_eq!(events[0]["event_id"], events[1]["event_id"]);
    assert!(events.iter().all(|e| e["state"] == "published" && e["publications"].as_array().unwrap().len() == 1));
    // Metrics per destination.
    let (_, metrics) = crate::admin::http(&addr, "GET", "/metrics").await.unwrap();
    for (destination, n) in [(&ledger.url, 12), (&refunds.url, 8), (&alerts.arn, 3)] {
        let line =
            format!("transfer_worker_deliveries_total{{destination=\"{destination}\",outcome=\"published\"}} {n}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
        let gauge =
            format!("transfer_worker_destination_events{{destination=\"{destination}\",state=\"published\"}} {n}");
        assert!(metrics.contains(&gauge), "{gauge} in {metrics}");
    }
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_one_destination_never_delays_another() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let healthy = TestQueue::new(true).await;
    let broken = TestQueue::new(true).await;
    let (a, b) = (format!("*={}", healthy.url), format!("*={}", broken.url));
    let args = ["--route", a.as_str(), "--route", b.as_str()];
    let mut w = KillOnDrop(db.spawn_worker("http://unused.invalid/1/q", &args));
    db.enqueue_sql("before", 1, 2, 10).await;
    let mut got = healthy.receive(1, Duration::ZERO).await;
    let mut late = broken.receive(1, Duration::ZERO).await;
    assert_eq!((got.len(), late.len()), (1, 1));
    // The broken queue goes away (an outage: deleted, or SQS hanging on it).
    broken.client.delete_queue().queue_url(&broken.url).send().await.unwrap();
    let started = std::time::Instant::now();
    traffic(&db, 20).await;
    got.extend(healthy.receive(28, Duration::from_millis(300)).await);
    assert_eq!(got.len(), 29, "the healthy destination gets everything");
    assert!(started.elapsed() < Duration::from_secs(20), "and at its usual pace: {:?}", started.elapsed());
    let expected = db.events_by_transfer().await;
    for (id, types) in by_transfer(&got) {
        assert_eq!(&types, &expected[&id], "transfer {id}: in order");
    }
    // The broken destination's deliveries wait, uncounted.
    let status = db.cli(&["status", "--json"]).await.json();
    assert_eq!(status["destinations"][&broken.url]["pending"], 28, "{status}");
    assert_eq!(status["destinations"][&broken.url]["dead"], 0, "{status}");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE attempts > 0").await, 0, "an outage never counts");
    // It comes back: everything arrives, in order.
    broken
        .client
        .create_queue()
        .queue_name(broken.url.rsplit('/').next().unwrap())
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap();
    late.extend(broken.receive(28, Duration::from_millis(300)).await);
    assert_eq!(late.len(), 29);
    for (id, types) in by_transfer(&late) {
        assert_eq!(&types, &expected[&id], "transfer {id}: in order after the outage");
    }
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_event_holds_back_only_its_own_destinations_later_events_of_its_transfer() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    // One queue refuses messages over 1 KiB; the FIFO topic takes them.
    let small = TestQueue::with_attributes(false, &[(QueueAttributeName::MaximumMessageSize, "1024")]).await;
    let topic = TestTopic::new(true).await;
    let args = [
        "--relay-max-attempts".to_owned(),
        "1".to_owned(),
        "--route".to_owned(),
        format!("*={}", small.url),
        "--route".to_owned(),
        format!("*={}", topic.arn),
    ];
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut w = KillOnDrop(db.spawn_worker("http://unused.invalid/1/q", &args));
    let big = db.enqueue_sql(&"k".repeat(1_100), 1, 2, 10).await;
    db.enqueue_sql("small-1", 1, 2, 10).await;
    wait_for("the big event dead at the small queue", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'dead'").await == 1
    })
    .await;
    assert_eq!(db.cli(&["refund", &big.to_string()]).await.code, 0);
    // At the topic: the big transfer's three events, in order, with FIFO ids.
    let at_topic = topic.queue.receive(4, Duration::from_millis(500)).await;
    let of_big: Vec<EventType> = at_topic.iter().filter(|e| e.transfer_id.0 == big).map(|e| e.event_type).collect();
    assert_eq!(of_big, [EventType::TransferSucceeded, EventType::RefundRequested, EventType::RefundCompleted]);
    // At the small queue: the other transfer only; the refund's two wait behind the dead one.
    let at_small = small.receive(1, Duration::from_secs(1)).await;
    assert_eq!(at_small.len(), 1);
    assert_ne!(at_small[0].transfer_id.0, big);
    let status = db.cli(&["status", "--json"]).await.json();
    let d = &status["destinations"][&small.url];
    assert_eq!((d["dead"].as_i64(), d["held"].as_i64()), (Some(1), Some(2)), "{status}");
    assert_eq!(status["destinations"][&topic.arn]["held"], 0, "{status}");
    assert_eq!(status["dead_events"][0]["destination"], small.url.as_str());
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn events_no_route_takes_are_recorded_not_delivered() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let ledger = TestQueue::new(false).await;
    let args = ["--route".to_owned(), format!("transfer.succeeded={}", ledger.url)];
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut w = KillOnDrop(db.spawn_worker("http://unused.invalid/1/q", &args));
    db.enqueue_sql("ok", 1, 2, 10).await;
    db.enqueue_sql("too-much", 1, 2, 1_000_000).await;
    assert_eq!(ledger.receive(1, Duration::from_millis(500)).await.len(), 1);
    wait_for("the failure recorded as not routed", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE destination = '' AND state = 'published'").await == 1
    })
    .await;
    let status = db.cli(&["status", "--json"]).await.json();
    assert_eq!(status["outbox"]["pending"], 0, "{status}");
    assert_eq!(status["destinations"][""]["published"], 1, "{status}");
    assert_eq!(status["oldest_unpublished_age_s"], 0.0);
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn bad_routes_are_refused_at_start_naming_the_route() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    let missing = format!("{}-missing", queue.url);
    let twice = [format!("transfer.*={}", queue.url), format!("refund.*={}/", queue.url)];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["transfer.*".into()], "with an `=`"),
        (vec![format!("={}", queue.url)], "the pattern (before `=`) is empty"),
        (vec![format!("payout.*={}", queue.url)], "matches no event type"),
        (vec!["*=ftp://example.com/1/q".into()], "neither an SQS queue URL"),
        (vec![format!("*={};xml", queue.url)], "`native` or `cloudevents`"),
        (twice.to_vec(), "names the destination of route"),
        (vec![format!("*={missing}")], &missing),
        (vec!["*=arn:aws:sns:us-east-1:000000000000:no-such-topic".into()], "no-such-topic"),
    ];
    for (routes, needle) in cases {
        let mut args = vec!["run".to_owned()];
        for r in &routes {
            args.extend(["--route".to_owned(), r.clone()]);
        }
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = db.cli(&args).await;
        assert_eq!(out.code, 2, "{routes:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{routes:?}: {}", out.stderr);
    }
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 0);
}

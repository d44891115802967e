//! Operators' controls during an incident: pause and resume every replica at
//! once, and replay already-published events with their original ids.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::admin::{free_port, http};
use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

/// Enqueues `n` transfers of 1 from account 1 to 2 by SQL; their ids.
async fn enqueue_many(db: &TestDb, prefix: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(db.enqueue_sql(&format!("{prefix}-{i}"), 1, 2, 1).await);
    }
    ids
}

async fn count(db: &TestDb, sql: &'static str) -> i64 {
    db.scalar(sql).await
}

/// Checks, for `seconds`, that `sql` keeps the value `want`.
async fn stays(db: &TestDb, what: &str, sql: &'static str, want: i64, seconds: u64) {
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        assert_eq!(db.scalar(sql).await, want, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_apply_holds_every_replica_including_one_started_later_and_resume_applies_everything() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    // A long poll interval: only the wake-up can make resume quick.
    let slow = ["--poll-interval-ms", "30000"];
    let addr = format!("127.0.0.1:{}", free_port());
    let mut a = KillOnDrop(db.spawn_worker(&queue.url, &[&slow[..], &["--admin-addr", &addr]].concat()));
    let mut b = KillOnDrop(db.spawn_worker(&queue.url, &slow));
    wait_for("the admin server", Duration::from_secs(20), || async { http(&addr, "GET", "/readyz").await.is_some() })
        .await;
    enqueue_many(&db, "before", 5).await;
    wait_for("the first transfers applied", Duration::from_secs(20), || async {
        count(&db, "SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await == 5
    })
    .await;

    let out = db.cli(&["pause", "apply", "--reason", "incident 7 (alice)"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let paused = out.json()["paused"].clone();
    assert_eq!((paused["apply"].as_bool(), paused["relay"].as_bool()), (Some(true), Some(false)), "{paused}");
    assert_eq!(paused["reason"], "incident 7 (alice)");
    assert!(paused["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{paused}");
    // "Within about a second"; then producers still enqueue, and nothing is applied.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids = enqueue_many(&db, "during", 20).await;
    // A replica started while paused obeys it from its first pass.
    let mut c = KillOnDrop(db.spawn_worker(&queue.url, &slow));
    stays(&db, "nothing applied while paused", "SELECT count(*) FROM transfers WHERE status = 'PENDING'", 20, 3).await;
    // Paused is healthy; status and metrics say it.
    assert_eq!(http(&addr, "GET", "/readyz").await.unwrap().0, 200);
    assert_eq!(http(&addr, "GET", "/livez").await.unwrap().0, 200);
    let (_, metrics) = http(&addr, "GET", "/metrics").await.unwrap();
    assert!(metrics.contains("transfer_worker_paused{part=\"apply\"} 1"), "{metrics}");
    assert!(metrics.contains("transfer_worker_paused{part=\"relay\"} 0"), "{metrics}");
    let status = db.cli(&["status", "--json"]).await.json();
    assert_eq!(status["paused"], paused, "status --json shows the pause");
    let text = db.cli(&["status"]).await.stdout;
    assert!(text.contains("PAUSED: apply since") && text.contains("incident 7 (alice)"), "{text}");

    let resumed_at = Instant::now();
    let out = db.cli(&["resume", "all"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["paused"]["apply"], false);
    assert!(out.json()["paused"]["reason"].is_null());
    wait_for("every paused transfer applied", Duration::from_secs(20), || async {
        count(&db, "SELECT count(*) FROM transfers WHERE status = 'PENDING'").await == 0
    })
    .await;
    // Woken, not polled (the poll interval is 30 s).
    assert!(resumed_at.elapsed() < Duration::from_secs(10), "resume took {:?}", resumed_at.elapsed());
    assert_eq!(count(&db, "SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await, 25);
    assert_eq!(ids.len(), 20);
    let (_, metrics) = http(&addr, "GET", "/metrics").await.unwrap();
    assert!(metrics.contains("transfer_worker_paused{part=\"apply\"} 0"), "{metrics}");
    for w in [&mut a, &mut b, &mut c] {
        signal(&w.0, "TERM");
        assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_relay_sends_nothing_counts_nothing_and_resume_delivers_every_event_in_order() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &[]));
    let first = enqueue_many(&db, "first", 10).await;
    wait_for("the first events published", Duration::from_secs(30), || async {
        count(&db, "SELECT count(*) FROM outbox WHERE state = 'published'").await == 10
    })
    .await;

    let out = db.cli(&["pause", "relay"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.json()["paused"]["reason"].is_null());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let on_queue = queue.messages().await;
    assert_eq!(on_queue, 10);
    // Apply goes on (refunds, new transfers); their events wait in the outbox.
    enqueue_many(&db, "second", 10).await;
    for id in &first[..5] {
        assert_eq!(db.cli(&["refund", &id.to_string()]).await.code, 0);
    }
    wait_for("applied while the relay is paused", Duration::from_secs(30), || async {
        count(&db, "SELECT count(*) FROM outbox").await == 30
    })
    .await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(queue.messages().await, on_queue, "no send while the relay is paused");
        assert_eq!(count(&db, "SELECT count(*) FROM outbox WHERE state = 'published'").await, 10);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE attempts > 0 OR transient_failures > 0 OR claimed_until IS NOT NULL"
        )
        .await,
        0,
        "nothing is counted against a paused event"
    );

    assert_eq!(db.cli(&["resume", "relay"]).await.code, 0);
    let got = queue.receive(30, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 30, "every event, once");
    let mut per_transfer: HashMap<i64, Vec<String>> = HashMap::new();
    for e in &got {
        per_transfer.entry(e.transfer_id.0).or_default().push(e.event_type.as_str().to_owned());
    }
    for (id, types) in &per_transfer {
        let want: Vec<String> = db.events_by_transfer().await[id].iter().map(|t| t.as_str().to_owned()).collect();
        assert_eq!(types, &want, "transfer {id}: in order");
    }
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn pause_and_resume_reject_bad_input_and_change_nothing() {
    let db = TestDb::new().await;
    for (args, needle) in [
        (vec!["pause", "nothing"], "possible values: apply, relay, all"),
        (vec!["pause"], "required"),
        (vec!["resume", "everything"], "possible values: apply, relay, all"),
        (vec!["pause", "all", "--reason", "two\nlines"], "control character"),
        (vec!["pause", "all", "--reason", &"x".repeat(501)], "longer than 500"),
    ] {
        let out = db.cli(&args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    assert_eq!(count(&db, "SELECT count(*) FROM worker_controls WHERE paused").await, 0);
    // Pausing twice keeps the first `since`; a blank reason is no reason.
    let first = db.cli(&["pause", "relay", "--reason", " "]).await.json();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = db.cli(&["pause", "relay"]).await.json();
    assert_eq!(first["paused"]["since"], second["paused"]["since"]);
    assert!(second["paused"]["reason"].is_null());
}

/// One transfer with a refund, applied and published to `queue`: its id and
/// the three events as the queue got them.
async fn published_story(db: &TestDb, queue: &TestQueue, key: &str) -> (i64, Vec<transfer_worker::outbox::EventBody>) {
    let id = db.enqueue_sql(key, 1, 2, 10).await;
    db.apply_all().await;
    assert_eq!(db.cli(&["refund", &id.to_string(), "--amount", "4"]).await.code, 0);
    db.apply_all().await;
    db.relay_all(queue.publisher().await).await;
    let got = queue.receive(3, Duration::from_millis(500)).await;
    (id, got)
}

#[tokio::test]
async fn replay_of_a_transfer_arrives_again_in_order_with_the_original_ids_even_on_fifo() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let (id, first) = published_story(&db, &queue, "order-1").await;
    let types: Vec<&str> = first.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["transfer.succeeded", "refund.requested", "refund.completed"]);
    let shown = db.cli(&["transfer", "show", &id.to_string()]).await.json();
    let first_published: Vec<serde_json::Value> =
        shown["events"].as_array().unwrap().iter().map(|e| e["first_published_at"].clone()).collect();

    // Twice, within FIFO's five-minute deduplication window: both get through.
    for n in 1..=2 {
        let out = db.cli(&["outbox", "replay", "--transfer", &id.to_string()]).await;
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.json()["replayed"], 3);
        assert_eq!(out.json()["transfers"], 1);
        assert_eq!(out.json()["dry_run"], false);
        db.relay_all(queue.publisher().await).await;
        let again = queue.receive(3, Duration::from_millis(500)).await;
        assert_eq!(again.len(), 3, "replay {n} arrives, in full");
        for (a, b) in first.iter().zip(&again) {
            assert_eq!(a, b, "replay {n}: the original event_id and body, in the original order");
        }
        let shown = db.cli(&["transfer", "show", &id.to_string()]).await.json();
        for (e, first_at) in shown["events"].as_array().unwrap().iter().zip(&first_published) {
            assert_eq!(&e["first_published_at"], first_at, "a replay never changes the first publication");
            assert_eq!(e["replays"], n);
            let publications = e["publications"].as_array().unwrap();
            assert_eq!(publications.len(), n + 1, "every publication is listed: {e}");
            assert_eq!(&publications[0], first_at);
            assert_eq!(e["state"], "published");
        }
    }
    // The receive helper checked each replay's deduplication id; check the
    // one SQS saw last, and that the first is untouched.
    let dedup: Vec<(String, i32)> =
        sqlx::query_as("SELECT event_id::text, replays FROM outbox WHERE transfer_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(dedup.iter().all(|(_, n)| *n == 2), "{dedup:?}");
}

#[tokio::test]
async fn replay_by_time_window_and_type_and_dry_run_writes_nothing() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(published_story(&db, &queue, &format!("w-{i}")).await.0);
    }
    // Transfers 0..3 happened two hours ago; 3..6 just now.
    sqlx::query("UPDATE outbox SET occurred_at = now() - interval '2 hours' WHERE transfer_id = ANY($1)")
        .bind(&ids[..3])
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE transfers SET created_at = now() - interval '2 hours' WHERE id = ANY($1)")
        .bind(&ids[..3])
        .execute(&db.pool)
        .await
        .unwrap();
    let snapshot = || async {
        sqlx::query_as::<_, (i64, String, Option<String>, i32)>(
            "SELECT id, state, published_at::text, replays FROM outbox ORDER BY id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let before = snapshot().await;
    let args = ["outbox", "replay", "--since", "3h", "--until", "1h", "--type", "refund.*"];
    let dry = db.cli(&[&args[..], &["--dry-run"]].concat()).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(dry.json()["replayed"], 6, "two refund events of each of the three old transfers");
    assert_eq!(dry.json()["transfers"], 3);
    assert_eq!(dry.json()["dry_run"], true);
    assert_eq!(snapshot().await, before, "a dry run writes nothing");

    let out = db.cli(&args).await;
    assert_eq!(out.code, 0, "{out:?}");
    let mut dry_json = dry.json();
    dry_json["dry_run"] = false.into();
    assert_eq!(out.json(), dry_json, "the dry run counted what the replay did");
    db.relay_all(queue.publisher().await).await;
    let again = queue.receive(6, Duration::from_millis(500)).await;
    assert_eq!(again.len(), 6);
    for e in &again {
        assert!(ids[..3].contains(&e.transfer_id.0) && e.event_type.as_str().starts_with("refund."), "{e:?}");
    }
    // An RFC 3339 window works the same way (and finds nothing new now).
    let rfc: (String,) = sqlx::query_as(
        "SELECT to_char((now() - interval '3 hours') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let out = db.cli(&["outbox", "replay", "--since", &rfc.0, "--type", "transfer.succeeded", "--dry-run"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["replayed"], 6, "every transfer.succeeded since three hours ago");
}

#[tokio::test]
async fn replay_into_pruned_history_says_what_is_gone_and_bad_input_queues_nothing() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(published_story(&db, &queue, &format!("p-{i}")).await.0);
    }
    // The first two transfers' events are pruned; the first transfer too.
    sqlx::query("UPDATE outbox SET published_at = now() - interval '9 days' WHERE transfer_id = ANY($1)")
        .bind(&ids[..2])
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE transfers SET applied_at = now() - interval '9 days', refund_applied_at = now() - interval '9 days' WHERE id = $1")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let pruned = db.cli(&["prune", "--published-older-than", "7d", "--transfers-older-than", "8d"]).await;
    assert_eq!(pruned.code, 0, "{pruned:?}");
    assert_eq!(pruned.json()["published_events"], 6);
    assert_eq!(pruned.json()["transfers"], 1);

    let out = db.cli(&["outbox", "replay", "--since", "1h"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    assert_eq!(v["replayed"], 6, "what is left is replayed: {v}");
    assert_eq!(v["transfers"], 2);
    assert_eq!(v["transfers_without_events"], 1, "the second transfer's events are gone: {v}");
    assert_eq!(v["pruned_transfers"], 1, "the first transfer is gone altogether: {v}");

    let before: i64 = count(&db, "SELECT count(*) FROM outbox WHERE state = 'pending'").await;
    let pruned_id = ids[0].to_string();
    let future = "2999-01-01T00:00:00Z";
    for (args, needle) in [
        (vec!["outbox", "replay", "--transfer", &pruned_id], "was pruned"),
        (vec!["outbox", "replay", "--transfer", "987654"], "transfer 987654 does not exist"),
        (vec!["outbox", "replay", "--since", "1h", "--until", "2h"], "--until"),
        (vec!["outbox", "replay", "--since", future], "in the future"),
        (vec!["outbox", "replay", "--since", "1h", "--until", future], "in the future"),
        (vec!["outbox", "replay", "--since", "yesterday"], "RFC 3339"),
        (vec!["outbox", "replay", "--since", "2026-13-45T00:00:00Z"], "not a time"),
        (vec!["outbox", "replay", "--since", "1h", "--type", "payout.*"], "matches no event type"),
        (vec!["outbox", "replay"], "required"),
        (vec!["outbox", "replay", "--transfer", "1", "--since", "1h"], "cannot be used with"),
        (vec!["outbox", "replay", "--until", "1h"], "required"),
    ] {
        let out = db.cli(&args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox WHERE state = 'pending'").await, before, "nothing queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_relays_a_replay_at_once() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--poll-interval-ms", "30000"]));
    let id = db.enqueue_sql("live-1", 1, 2, 10).await;
    let first = queue.receive(1, Duration::from_millis(200)).await;
    assert_eq!(first.len(), 1);
    let out = db.cli(&["outbox", "replay", "--transfer", &id.to_string()]).await;
    assert_eq!(out.json()["replayed"], 1, "{out:?}");
    let started = Instant::now();
    let again = queue.receive(1, Duration::from_millis(200)).await;
    assert_eq!(again, first);
    assert!(started.elapsed() < Duration::from_secs(10), "woken, not polled: {:?}", started.elapsed());
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

//! A transfer batch's events handed straight to the relay of the process
//! (`outbox::handoff`): written leased to it, sent without a claim, and
//! never lost, doubled or reordered when the hand-off does not happen.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use transfer_worker::outbox::publisher::{Publisher, MAX_BATCH_ENTRIES};
use transfer_worker::outbox::relay::{Relay, RelayConfig};
use transfer_worker::outbox::route::Routing;
use transfer_worker::service::Service;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};

use crate::helpers::{sqs_config, wait_for, TestDb, TestQueue};
use crate::relay::pending;

fn relay(db: &TestDb, publisher: Publisher, lease: Duration, passes_in_flight: usize) -> Relay {
    let config =
        RelayConfig { lease, passes_in_flight, poll_interval: Duration::from_millis(50), ..Default::default() };
    Relay::new(db.pool.clone(), publisher, config, Arc::new(Notify::new()))
}

/// Accounts 1 and 2 with 100 each, and three transfers from 1: two it can
/// pay, one it cannot.
async fn three_transfers(db: &TestDb) {
    db.open_account(1, 100).await;
    db.open_account(2, 100).await;
    for (key, amount) in [("h-1", 30), ("h-2", 500), ("h-3", 20)] {
        db.enqueue_sql(key, 1, 2, amount).await;
    }
}

#[tokio::test]
async fn an_applied_batchs_events_are_written_leased_to_the_relay_and_sent_without_a_claim() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    three_transfers(&db).await;
    let relay = Arc::new(relay(&db, queue.publisher().await, Duration::from_secs(30), 4));
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default()).handing_events_to(relay.clone());
    let applied = applier.run_once().await.unwrap();
    assert_eq!((applied.succeeded, applied.failed), (2, 1));
    // Written as the relay's destination's, never unrouted for a claim.
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 3);
    assert_eq!(
        db.scalar_with("SELECT count(*) FROM outbox WHERE destination = $1", relay.publisher().destination()).await,
        3
    );

    // The relay's loop never ran a claim: its sends in flight published them.
    let sent = relay.settle().await.unwrap();
    assert_eq!((sent.claimed, sent.published, sent.lost_lease), (3, 3, 0));
    assert_eq!(pending(&db).await, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE claimed_until IS NOT NULL").await, 0);

    // Each body is what a claim would have sent: the database's own row.
    let received = queue.receive(3, Duration::from_secs(2)).await;
    assert_eq!(received.len(), 3);
    for e in &received {
        let (data, occurred_at): (serde_json::Value, String) = sqlx::query_as(
            r#"SELECT data, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                 FROM outbox WHERE event_id = $1::uuid"#,
        )
        .bind(&e.event_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(serde_json::to_value(&e.data).unwrap(), data);
        assert_eq!(e.occurred_at, occurred_at);
    }
    let types: HashSet<&str> = received.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, HashSet::from(["transfer.succeeded", "transfer.failed"]));
}

#[tokio::test]
async fn events_handed_to_a_relay_that_never_sends_them_go_out_once_its_lease_runs_out() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    three_transfers(&db).await;
    // SQS hangs for this relay: the process may as well have died after
    // the commit.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let conf =
        queue.client.config().to_builder().endpoint_url(format!("http://{}", hole.local_addr().unwrap())).build();
    let mut config = sqs_config(&queue.url);
    config.call_timeout = Duration::from_secs(30);
    let hung = Publisher::new(aws_sdk_sqs::Client::from_conf(conf), &config);
    let dying = Arc::new(relay(&db, hung, Duration::from_millis(800), 4));
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default()).handing_events_to(dying.clone());
    assert_eq!(applier.run_once().await.unwrap().claimed, 3);

    let other = relay(&db, queue.publisher().await, Duration::from_secs(30), 4);
    assert_eq!(other.run_once().await.unwrap().claimed, 0, "a live lease keeps handed events off other relays");
    wait_for("the lease to run out and another relay to send them", Duration::from_secs(10), || async {
        other.run_once().await.unwrap();
        pending(&db).await == 0
    })
    .await;
    let received = queue.receive(3, Duration::from_secs(2)).await;
    let ids: HashSet<String> = received.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!((received.len(), ids.len()), (3, 3), "each event once: the hung relay never got through");
    drop(hole);
}

#[tokio::test]
async fn a_relay_with_two_sends_in_flight_is_handed_nothing_and_its_claim_gathers_the_events() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    three_transfers(&db).await;
    let relay = Arc::new(relay(&db, queue.publisher().await, Duration::from_secs(30), 4));
    let first = relay.offer(1).expect("an idle relay offers a slot");
    let second = relay.offer(1).expect("one send in flight: still keeping up");
    assert!(relay.offer(1).is_none(), "with two sends in flight, two slots free, it offers none");
    // A batch that fills a call on its own is as full as a claim would make
    // it: it gets any free slot, and none once all four are taken.
    let full = relay.offer(MAX_BATCH_ENTRIES).expect("ten events: a free slot is enough");
    let fourth = relay.offer(MAX_BATCH_ENTRIES).expect("the last free slot");
    assert!(relay.offer(MAX_BATCH_ENTRIES).is_none(), "every slot taken");
    drop((full, fourth));
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default()).handing_events_to(relay.clone());
    assert_eq!(applier.run_once().await.unwrap().claimed, 3);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE destination IS NULL AND claimed_until IS NULL").await, 3);
    let sent = relay.run_once().await.unwrap();
    assert_eq!((sent.claimed, sent.published), (3, 3), "one claim takes them all, while the other send is in flight");
    drop((first, second));
    assert!(relay.offer(1).is_some(), "idle again");
    assert_eq!(queue.receive(3, Duration::from_secs(2)).await.len(), 3);
}

#[test]
fn only_a_destination_that_alone_takes_a_transfers_events_is_offered_them() {
    let takes = |routes: &[&str], destination: &str| {
        let routes = routes.iter().map(|r| r.parse().unwrap()).collect();
        Relay::scope_takes_transfer_events(&Routing::new(routes).scope_of(destination))
    };
    let (q1, q2) = ("http://h/1/q1", "http://h/1/q2");
    assert!(takes(&["*=http://h/1/q1"], q1));
    assert!(takes(&["transfer.*=http://h/1/q1", "refund.*=http://h/1/q2"], q1));
    assert!(!takes(&["transfer.*=http://h/1/q1", "refund.*=http://h/1/q2"], q2), "not its events");
    assert!(!takes(&["*=http://h/1/q1", "transfer.failed=http://h/1/q2"], q1), "the claim copies them");
    assert!(!takes(&["transfer.succeeded=http://h/1/q1"], q1), "not both of the batch's types");
}

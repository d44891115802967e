//! Gathering (`transfer::gather`): above its rate, a woken apply pass waits
//! for more transfers, one task at a time, and nothing is lost or applied
//! twice for it.

use std::sync::Arc;
use std::time::Duration;

use transfer_worker::service::Service;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};
use transfer_worker::transfer::gather::Gather;

use crate::helpers::{wait_for, KillOnDrop, TestDb, TestQueue};

#[tokio::test]
async fn a_steady_stream_above_the_rate_is_applied_in_batches_of_several_each_once() {
    let db = TestDb::new().await;
    for id in 1..=4 {
        db.open_account(id, 1_000_000).await;
    }
    let queue = TestQueue::new(false).await;
    let _worker = KillOnDrop(db.spawn_worker(&queue.url, &["--gather-above", "50", "--gather-ms", "50"]));

    // One INSERT per transfer, as a producer inserting by SQL does, about
    // 200 a second (each wakes an apply task).
    db.enqueue_steadily("g", 0..300).await;
    wait_for("every transfer applied and published", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await == 300
    })
    .await;
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await, 300);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 300, "one event per transfer");
    assert_eq!(db.total_balance().await, 4_000_000);
    // Every batch commits in one transaction, so its rows share `applied_at`.
    let batches = db.scalar("SELECT count(DISTINCT applied_at) FROM transfers").await;
    assert!(batches <= 100, "300 transfers in {batches} batches: woken passes did not wait for more");
}

#[tokio::test]
async fn while_one_task_gathers_another_woken_task_leaves_it_the_rows_even_those_committed_later() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 100).await;
    // A rate well above the threshold, and a long wait to act inside.
    let gather = Arc::new(Gather::new(1, Duration::from_millis(400)));
    gather.claimed(1_000);
    let applier = || Arc::new(Applier::new(db.pool.clone(), ApplyConfig::default()).gathering_with(gather.clone()));
    let (first, second) = (applier(), applier());

    db.enqueue_sql("before", 1, 2, 10).await;
    let gathering = tokio::spawn({
        let first = first.clone();
        async move { first.run_once().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let skipped = second.run_once().await.unwrap();
    assert_eq!(skipped.claimed, 0, "the second task leaves the rows to the one gathering");
    db.enqueue_sql("after", 1, 2, 10).await;

    let gathered = gathering.await.unwrap();
    assert_eq!((gathered.claimed, gathered.succeeded), (2, 2), "the gathering task takes both, in one batch");
    assert_eq!(db.scalar("SELECT count(DISTINCT applied_at) FROM transfers").await, 1);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 2);
}

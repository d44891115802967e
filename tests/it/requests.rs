//! Refunds and cancels: guarded updates that write an event only when they
//! applied, including while the worker is applying the same transfer.

use std::time::Duration;

use transfer_worker::error::Refusal;
use transfer_worker::outbox::EventType::{self, *};
use transfer_worker::transfer::apply::{Applier, ApplyConfig, Step};
use transfer_worker::transfer::cancel::cancel;
use transfer_worker::transfer::refund::request_refund;
use transfer_worker::transfer::{Amount, TransferId};
use transfer_worker::transfer::{RefundStatus, TransferStatus};
use transfer_worker::Error;

use crate::helpers::{wait_for, TestDb};

async fn events(db: &TestDb, id: TransferId) -> Vec<EventType> {
    db.events_by_transfer().await.remove(&id.0).unwrap_or_default()
}

async fn status(db: &TestDb, id: TransferId) -> (TransferStatus, RefundStatus) {
    let (status, refund): (String, String) =
        sqlx::query_as("SELECT status, refund_status FROM transfers WHERE id = $1")
            .bind(id.0)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    (status.parse().unwrap(), refund.parse().unwrap())
}

/// Starts the worker and holds it inside its transaction: the test
/// locks the source account first, so the worker claims (locks) the transfer
/// row and then waits. Returns the worker task and the blocking transaction.
async fn worker_holding(
    db: &TestDb,
    account: i64,
) -> (tokio::task::JoinHandle<()>, sqlx::Transaction<'static, sqlx::Postgres>) {
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE").bind(account).execute(&mut *blocker).await.unwrap();
    // max_skips 0: the batch waits for the held account instead of leaving
    // the transfer for later, so it holds the transfer's row lock meanwhile.
    let applier = Applier::new(db.pool.clone(), ApplyConfig { max_skips: 0, ..ApplyConfig::default() });
    // The transfer step only, so a refund requested meanwhile stays REQUESTED.
    let worker = tokio::spawn(async move {
        applier.run_step(Step::Transfer).await.unwrap();
    });
    // Observed, not probed: a SKIP LOCKED probe could itself take the row
    // for an instant and make the worker skip it.
    wait_until_blocked(db, "%FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE%").await;
    (worker, blocker)
}

/// Waits until a session is blocked on a lock while running `like`.
async fn wait_until_blocked(db: &TestDb, like: &'static str) {
    wait_for(like, Duration::from_secs(10), || async {
        db.scalar_with(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
            like,
        )
        .await
            > 0
    })
    .await;
}

/// Enqueues a transfer of 60 from account 1 (100) to 2 (0), holds the worker
/// inside its transaction on it, sends `request` for it, checks the request
/// waits on a lock while running `blocked_on`, then lets the worker commit and
/// returns the request's result.
async fn race_with_worker<F, Fut, T>(request: F, blocked_on: &'static str) -> (TestDb, TransferId, T)
where
    F: FnOnce(sqlx::PgPool, TransferId) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let id = TransferId(db.enqueue_sql("t", 1, 2, 60).await);
    let (worker, blocker) = worker_holding(&db, 1).await;

    // The transfer is PENDING as far as anyone can see, and the worker is mid-way.
    let pending = tokio::spawn(request(db.pool.clone(), id));
    wait_until_blocked(&db, blocked_on).await;
    assert!(!pending.is_finished(), "the request waits for the worker");
    blocker.commit().await.unwrap();
    worker.await.unwrap();
    let result = pending.await.unwrap();
    (db, id, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_racing_the_worker_waits_for_it_then_applies_once() {
    let (db, id, result) = race_with_worker(
        |pool, id| async move { request_refund(&pool, id, None).await },
        "SELECT id FROM transfers WHERE id = $1 FOR NO KEY UPDATE%",
    )
    .await;
    let r = result.expect("judged on the committed row: SUCCEEDED, so it applies");
    assert_eq!(r.refund_amount, 60);
    assert_eq!(status(&db, id).await, (TransferStatus::Succeeded, RefundStatus::Requested));
    assert_eq!(events(&db, id).await, [TransferSucceeded, RefundRequested]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_the_worker_waits_for_it_then_does_not_apply() {
    let (db, id, result) = race_with_worker(
        |pool, id| async move { cancel(&pool, id).await },
        "%UPDATE transfers t SET status = $2, applied_at%",
    )
    .await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Error::Refused(Refusal::NotCancellable { status: TransferStatus::Succeeded, .. })),
        "{err:?}"
    );
    assert_eq!(status(&db, id).await.0, TransferStatus::Succeeded);
    assert_eq!(events(&db, id).await, [TransferSucceeded], "no event for the cancel that came too late");
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 2").await, 60);
}

#[tokio::test]
async fn a_cancel_of_a_pending_transfer_applies_and_the_worker_then_leaves_it_alone() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let id = TransferId(db.enqueue_sql("t", 1, 2, 60).await);
    let out = db.cli(&["cancel", &id.to_string()]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), serde_json::json!({"transfer_id": id.0, "status": "CANCELLED"}));
    db.apply_all().await;
    assert_eq!(status(&db, id).await.0, TransferStatus::Cancelled);
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 100);
    let again = db.cli(&["cancel", &id.to_string()]).await;
    assert_eq!(again.code, 3);
    assert!(again.stderr.contains("CANCELLED"), "{}", again.stderr);
    assert_eq!(events(&db, id).await, [TransferCancelled]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_refunds_at_once_or_one_after_another_give_one_refund_and_one_event() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let id = TransferId(db.enqueue_sql("t", 1, 2, 60).await);
    db.apply_all().await;

    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move { request_refund(&pool, id, Some(Amount::new(25).unwrap())).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::Refused(r @ Refusal::AlreadyRefunded { .. })) => {
                assert!(r.to_string().contains("already has a refund"), "{r}")
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok, 1);
    let again = db.cli(&["refund", &id.to_string(), "--amount", "25"]).await;
    assert_eq!(again.code, 3, "{again:?}");
    assert!(again.stderr.contains("REQUESTED"), "{}", again.stderr);
    assert_eq!(events(&db, id).await, [TransferSucceeded, RefundRequested]);

    db.apply_all().await;
    let after = db.cli(&["refund", &id.to_string()]).await;
    assert_eq!(after.code, 3, "a completed refund is not refunded again");
    assert_eq!(events(&db, id).await, [TransferSucceeded, RefundRequested, RefundCompleted]);
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 100 - 60 + 25);
}

#[tokio::test]
async fn a_partial_refund_moves_back_only_its_amount() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let id = TransferId(db.enqueue_sql("t", 1, 2, 60).await);
    db.apply_all().await;
    let out = db.cli(&["refund", &id.to_string(), "--amount", "15"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), serde_json::json!({"transfer_id": id.0, "refund_status": "REQUESTED", "refund_amount": 15}));
    db.apply_all().await;
    assert_eq!(status(&db, id).await, (TransferStatus::Succeeded, RefundStatus::Completed));
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 55);
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 2").await, 45);
    let amounts: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT (data->>'refund_amount')::bigint FROM outbox WHERE event_type LIKE 'refund.%' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(amounts, vec![Some(15), Some(15)]);
}

#[tokio::test]
async fn a_refund_of_a_transfer_that_did_not_succeed_exits_3_and_writes_nothing() {
    let db = TestDb::new().await;
    db.open_account(1, 10).await;
    db.open_account(2, 0).await;
    let failed = TransferId(db.enqueue_sql("failed", 1, 2, 60).await);
    db.apply_all().await;
    let cancelled = TransferId(db.enqueue_sql("cancelled", 1, 2, 5).await);
    cancel(&db.pool, cancelled).await.unwrap();
    let pending = TransferId(db.enqueue_sql("pending", 1, 2, 5).await);
    let before = db.events_by_transfer().await;
    for (id, state) in [(failed, "FAILED"), (cancelled, "CANCELLED"), (pending, "PENDING")] {
        let out = db.cli(&["refund", &id.to_string()]).await;
        assert_eq!(out.code, 3, "{state}: {out:?}");
        assert!(out.stderr.contains(&format!("is {state}")), "{}", out.stderr);
    }
    assert_eq!(db.events_by_transfer().await, before);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE refund_status <> 'NONE'").await, 0);
}

#[tokio::test]
async fn a_refund_fails_when_the_recipient_no_longer_has_the_money() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    db.open_account(3, 0).await;
    let id = TransferId(db.enqueue_sql("t", 1, 2, 60).await);
    db.apply_all().await;
    db.enqueue_sql("spend", 2, 3, 50).await;
    db.apply_all().await;
    request_refund(&db.pool, id, None).await.unwrap();
    db.apply_all().await;
    assert_eq!(status(&db, id).await, (TransferStatus::Succeeded, RefundStatus::Failed));
    let reason: String = sqlx::query_scalar("SELECT data->>'reason' FROM outbox WHERE event_type = 'refund.failed'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(reason, "insufficient_funds");
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 2").await, 10);
    assert_eq!(events(&db, id).await, [TransferSucceeded, RefundRequested, RefundFailed]);
}

#[tokio::test]
async fn refund_and_cancel_reject_bad_input_with_exit_2_and_write_nothing() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let id = TransferId(db.enqueue_sql("t", 1, 2, 60).await);
    db.apply_all().await;
    let id = id.to_string();
    let cases: [(&[&str], &str); 8] = [
        (&["refund", "424242"], "transfer 424242 does not exist"),
        (&["refund", "abc"], "transfer id must be an integer"),
        (&["refund", &id, "--amount", "0"], "amount must be > 0"),
        (&["refund", &id, "--amount", "-4"], "amount must be > 0"),
        (&["refund", &id, "--amount", "61"], "exceeds transfer"),
        (&["cancel", "424242"], "transfer 424242 does not exist"),
        (&["cancel", "x"], "transfer id must be an integer"),
        (&["cancel"], "TRANSFER_ID"),
    ];
    for (args, needle) in cases {
        let out = db.cli(args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE refund_status <> 'NONE'").await, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 1);
}

//! The worker's claim and apply, driven in-process through `run_once`.

use std::collections::HashMap;
use std::time::Duration;

use transfer_worker::retry::RetryPolicy;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};

use crate::helpers::{wait_for, TestDb};

/// Opens `accounts` accounts with `balance` each and enqueues `n` random
/// transfers between them by SQL (some larger than a balance can cover).
/// Returns each account's opening balance.
pub async fn seed(db: &TestDb, accounts: i64, balance: i64, n: usize, seed: u64) -> HashMap<i64, i64> {
    transfer_worker::bench::seed_random(&db.pool, accounts, balance, n, balance / 2, seed).await.unwrap();
    (1..=accounts).map(|id| (id, balance)).collect()
}

#[tokio::test]
async fn eight_concurrent_apply_tasks_apply_each_of_2000_transfers_exactly_once() {
    let db = TestDb::new().await;
    let opening = seed(&db, 30, 1_000, 2_000, 7).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let applier = Applier::new(db.pool.clone(), ApplyConfig { batch_size: 25, ..ApplyConfig::default() });
            tokio::spawn(async move {
                let mut claimed = 0;
                loop {
                    let c = applier.run_once().await.unwrap();
                    if c.claimed == 0 {
                        return claimed;
                    }
                    claimed += c.claimed;
                }
            })
        })
        .collect();
    let mut claimed = 0;
    let mut tasks_that_worked = 0;
    for t in tasks {
        let n = t.await.unwrap();
        claimed += n;
        tasks_that_worked += (n > 0) as usize;
    }
    assert_eq!(claimed, 2_000, "every transfer claimed exactly once across tasks");
    assert!(tasks_that_worked >= 2, "the work was actually shared");
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await, 0);
    assert!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'FAILED'").await > 0, "some lacked funds");
    db.assert_invariants(30_000, &opening).await;
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 2_000);
}

#[tokio::test]
async fn a_transfer_without_funds_fails_with_its_reason_and_one_event() {
    let db = TestDb::new().await;
    db.open_account(1, 50).await;
    db.open_account(2, 0).await;
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         VALUES ('a', 1, 2, 30), ('b', 1, 2, 30), ('c', 2, 1, 30)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let c = Applier::new(db.pool.clone(), ApplyConfig::default()).run_once().await.unwrap();
    assert_eq!((c.claimed, c.succeeded, c.failed), (3, 2, 1));
    // In id order: a moves 30 to account 2, b finds only 20 left, c moves 30 back.
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT idempotency_key, status, failure_reason FROM transfers ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows[1], ("b".into(), "FAILED".into(), Some("insufficient_funds".into())));
    let (event_type, reason): (String, Option<String>) = sqlx::query_as(
        "SELECT event_type, data->>'reason' FROM outbox o JOIN transfers t ON t.id = o.transfer_id WHERE t.idempotency_key = 'b'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((event_type.as_str(), reason.as_deref()), ("transfer.failed", Some("insufficient_funds")));
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 50);
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 2").await, 0);
}

#[tokio::test]
async fn a_transfer_that_errors_is_retried_with_backoff_then_failed_without_blocking_the_others() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    // Crediting account 3 overflows a BIGINT: an unexpected error for that transfer only.
    db.open_account(3, i64::MAX - 5).await;
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         VALUES ('good-1', 1, 2, 10), ('poison', 1, 3, 10), ('good-2', 1, 2, 20)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let config = ApplyConfig {
        batch_size: 10,
        max_attempts: 3,
        retry: RetryPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(1), multiplier: 2.0 },
    };
    let applier = Applier::new(db.pool.clone(), config);

    let c = applier.run_once().await.unwrap();
    assert_eq!((c.succeeded, c.errored), (2, 1), "the good transfers of the batch are applied");
    let (attempts, status, last_error): (i32, String, Option<String>) =
        sqlx::query_as("SELECT attempts, status, last_error FROM transfers WHERE idempotency_key = 'poison'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((attempts, status.as_str()), (1, "PENDING"));
    assert!(last_error.unwrap().contains("overflow"));
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE next_attempt_at > now()").await, 1, "backing off");
    assert_eq!(applier.run_once().await.unwrap().claimed, 0, "backing off: not claimed again at once");

    wait_for("the poison transfer to fail for good", Duration::from_secs(10), || async {
        applier.run_once().await.unwrap();
        db.scalar("SELECT count(*) FROM transfers WHERE idempotency_key = 'poison' AND status = 'FAILED'").await == 1
    })
    .await;
    let (attempts, reason): (i32, String) =
        sqlx::query_as("SELECT attempts, failure_reason FROM transfers WHERE idempotency_key = 'poison'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((attempts, reason.as_str()), (3, "processing_error"));
    let reasons: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT o.data->>'reason' FROM outbox o JOIN transfers t ON t.id = o.transfer_id WHERE t.idempotency_key = 'poison'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(reasons, vec![Some("processing_error".to_string())], "one transfer.failed event");
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 1_000 - 30);
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 2").await, 30);
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 3").await, i64::MAX - 5);
}

#[tokio::test]
async fn a_sql_enqueued_transfer_over_the_daily_limit_fails_when_applied() {
    let db = TestDb::new().await;
    sqlx::query("INSERT INTO accounts (id, balance, daily_limit) VALUES (1, 1000, 100), (2, 0, NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         VALUES ('a', 1, 2, 60), ('b', 1, 2, 30), ('c', 1, 2, 20), ('d', 2, 1, 5)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    Applier::new(db.pool.clone(), ApplyConfig::default()).run_once().await.unwrap();
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT idempotency_key, status, failure_reason FROM transfers ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows[0].1, "SUCCEEDED");
    assert_eq!(rows[1].1, "SUCCEEDED");
    assert_eq!(rows[2], ("c".into(), "FAILED".into(), Some("daily_limit_exceeded".into())));
    assert_eq!(rows[3].1, "SUCCEEDED", "incoming money is not limited");
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 1000 - 90 + 5);
}

//! The worker's claim and apply, driven in-process through `run_once`.

use std::collections::HashMap;
use std::time::Duration;
use transfer_worker::service::Service;

use transfer_worker::db::SessionLimits;
use transfer_worker::retry::RetryPolicy;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};
use transfer_worker::transfer::busy::TURN_WAIT;
use transfer_worker::transfer::cancel::cancel;
use transfer_worker::transfer::refund::request_refund;
use transfer_worker::transfer::{TransferId, TransferStatus};

use crate::helpers::{wait_for, KillOnDrop, TestDb, TestQueue};

#[tokio::test]
async fn eight_concurrent_apply_tasks_apply_each_of_2000_transfers_exactly_once() {
    let db = TestDb::new().await;
    let opening = db.seed(30, 1_000, 2_000, 7).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let applier = Applier::new(db.pool.clone(), ApplyConfig { batch_size: 25, ..ApplyConfig::default() });
            tokio::spawn(async move {
                let mut applied = 0;
                loop {
                    let c = applier.run_once().await.unwrap();
                    if c.claimed == 0 {
                        return applied;
                    }
                    applied += c.succeeded + c.failed;
                }
            })
        })
        .collect();
    let mut applied = 0;
    let mut tasks_that_worked = 0;
    for t in tasks {
        let n = t.await.unwrap();
        applied += n;
        tasks_that_worked += (n > 0) as usize;
    }
    assert_eq!(applied, 2_000, "every transfer applied exactly once across tasks");
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
        max_skips: 3,
        retry: RetryPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(1), multiplier: 2.0 },
        ..ApplyConfig::default()
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

/// A pool made the way `run` makes it, with these session limits.
async fn worker_pool(db: &TestDb, limits: SessionLimits) -> sqlx::PgPool {
    transfer_worker::db::connect(&db.url, 8, limits).await.unwrap()
}

#[tokio::test]
async fn a_producers_open_transaction_does_not_stall_the_worker_on_the_same_accounts() {
    use transfer_worker::account::AccountId;
    use transfer_worker::transfer::enqueue::{enqueue, enqueue_bulk, NewTransfer};
    use transfer_worker::transfer::Amount;

    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 1_000).await;
    // Producers that enqueued on accounts 1 and 2 and keep their transactions
    // open: their foreign-key checks hold KEY SHARE locks on both accounts.
    let mut sql_producer = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('open', 1, 2, 5)")
        .execute(&mut *sql_producer)
        .await
        .unwrap();
    let mut library_producer = db.pool.begin().await.unwrap();
    let t = NewTransfer::new(AccountId(2), AccountId(1), Amount::new(7).unwrap(), None).unwrap();
    enqueue(&mut *library_producer, &t).await.unwrap();
    let mut bulk_producer = db.pool.begin().await.unwrap();
    enqueue_bulk(&mut bulk_producer, &[(1, t.clone()), (2, t.clone())]).await.unwrap();

    // Committed transfers on the same accounts are applied meanwhile.
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('c1', 1, 2, 10), ('c2', 2, 1, 3)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let applier = Applier::new(worker_pool(&db, SessionLimits::default()).await, ApplyConfig::default());
    let c = tokio::time::timeout(Duration::from_secs(10), applier.run_once())
        .await
        .expect("the worker must not wait for the producers' transactions")
        .unwrap();
    assert_eq!((c.claimed, c.succeeded), (2, 2));
    // A refund and a cancel do not wait for them either.
    let c1 = TransferId(db.scalar("SELECT id FROM transfers WHERE idempotency_key = 'c1'").await);
    tokio::time::timeout(Duration::from_secs(10), request_refund(&db.pool, c1, None)).await.unwrap().unwrap();
    let c3: i64 = sqlx::query_scalar(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('c3', 1, 2, 1) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), cancel(&db.pool, TransferId(c3))).await.unwrap().unwrap();
    let c = tokio::time::timeout(Duration::from_secs(10), applier.run_once()).await.unwrap().unwrap();
    assert_eq!(c.succeeded, 1, "the refund completes");

    for producer in [sql_producer, library_producer, bulk_producer] {
        producer.commit().await.unwrap();
    }
    wait_for("the producers' transfers to be applied", Duration::from_secs(10), || async {
        applier.run_once().await.unwrap();
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await == 0
    })
    .await;
    assert_eq!(db.total_balance().await, 2_000);
}

/// Holds account 1 the way another writer would, and checks that the
/// transfers touching it are put off (never counted, never FAILED) while the
/// others go through, then applied once the lock is gone.
async fn held_account_lock_is_contention_not_the_transfers_fault(limits: SessionLimits, sqlstate: &str) {
    let db = TestDb::new().await;
    for id in 1..=4 {
        db.open_account(id, 1_000).await;
    }
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         SELECT 'held-' || g, 1, 2, 1 FROM generate_series(1, 3) g
         UNION ALL SELECT 'free-' || g, 3, 4, 1 FROM generate_series(1, 3) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut other_writer = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE").execute(&mut *other_writer).await.unwrap();

    let fast = RetryPolicy { initial: Duration::from_millis(20), max: Duration::from_millis(100), multiplier: 2.0 };
    // max_skips 0: batches wait for held accounts (and time out) rather than
    // leaving their rows for later; skipping has a test of its own.
    let config = ApplyConfig { batch_size: 10, max_attempts: 2, retry: fast, max_skips: 0, ..ApplyConfig::default() };
    let applier = Applier::new(worker_pool(&db, limits).await, config);
    let c = applier.run_once().await.unwrap();
    assert_eq!((c.succeeded, c.put_off, c.errored, c.failed), (3, 3, 0, 0), "{c:?}");
    // Many more passes than max_attempts: still nothing counted.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let c = applier.run_once().await.unwrap();
        assert_eq!((c.errored, c.failed), (0, 0), "{c:?}");
    }
    let held: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT status, attempts, last_error FROM transfers WHERE idempotency_key LIKE 'held-%' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (status, attempts, last_error) in &held {
        assert_eq!((status.as_str(), *attempts), ("PENDING", 0));
        assert!(last_error.as_deref().unwrap_or("").contains("not counted"), "{last_error:?}");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM transfers WHERE idempotency_key LIKE 'free-%' AND status = 'SUCCEEDED'").await,
        3
    );
    let log_hint = held[0].2.clone().unwrap();
    assert!(log_hint.contains(sqlstate) || log_hint.contains("timeout") || log_hint.contains("cancel"), "{log_hint}");

    other_writer.rollback().await.unwrap();
    wait_for("the held transfers to be applied", Duration::from_secs(10), || async {
        applier.run_once().await.unwrap();
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await == 6
    })
    .await;
    assert_eq!(db.scalar("SELECT max(attempts)::bigint FROM transfers").await, 0);
}

#[tokio::test]
async fn a_lock_timeout_puts_transfers_off_without_counting_and_lets_the_others_through() {
    let limits = SessionLimits { lock_timeout: Some(Duration::from_millis(200)), ..SessionLimits::default() };
    held_account_lock_is_contention_not_the_transfers_fault(limits, "55P03").await;
}

#[tokio::test]
async fn a_statement_timeout_puts_transfers_off_without_counting_and_lets_the_others_through() {
    let limits = SessionLimits {
        lock_timeout: Some(Duration::ZERO),
        statement_timeout: Some(Duration::from_millis(300)),
        ..SessionLimits::default()
    };
    held_account_lock_is_contention_not_the_transfers_fault(limits, "57014").await;
}

#[tokio::test]
async fn the_worker_sets_its_own_timeouts_whatever_the_database_default_is() {
    let db = TestDb::new().await;
    let name: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&db.pool).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {name} SET statement_timeout = '1ms'")))
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = worker_pool(&db, SessionLimits::default()).await;
    let (statement, lock): (String, String) =
        sqlx::query_as("SELECT current_setting('statement_timeout'), current_setting('lock_timeout')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((statement.as_str(), lock.as_str()), ("30s", "5s"));
}

#[tokio::test]
async fn daily_totals_that_overflow_a_bigint_mean_over_the_limit_not_an_error() {
    let db = TestDb::new().await;
    let big = i64::MAX / 2 + 1;
    sqlx::query("INSERT INTO accounts (id, balance, daily_limit) VALUES (1, 1000, 100), (2, 0, NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    // Two PENDING transfers today (written by SQL, which is not checked at
    // enqueue) whose sum is past 2^63.
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         VALUES ('s1', 1, 2, $1), ('s2', 1, 2, $1)",
    )
    .bind(big)
    .execute(&db.pool)
    .await
    .unwrap();
    // At enqueue: exit 3 naming the limit, not exit 1 "bigint out of range".
    let out = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "1"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("daily limit of account 1 exceeded"), "{}", out.stderr);

    // At apply: a running total at the top of the range saturates instead of
    // failing the batch with an overflow.
    sqlx::query("DELETE FROM transfers").execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE accounts SET spent_day = (now() AT TIME ZONE 'UTC')::date, spent_today = $1 WHERE id = 1")
        .bind(i64::MAX - 5)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('p', 1, 2, 10)")
        .execute(&db.pool)
        .await
        .unwrap();
    let c = Applier::new(db.pool.clone(), ApplyConfig::default()).run_once().await.unwrap();
    assert_eq!((c.failed, c.errored), (1, 0), "{c:?}");
    let reason: String = sqlx::query_scalar("SELECT failure_reason FROM transfers WHERE idempotency_key = 'p'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(reason, "daily_limit_exceeded");
}

#[tokio::test]
async fn what_the_worker_applied_counts_toward_the_days_limit_at_the_next_enqueue() {
    let db = TestDb::new().await;
    sqlx::query("INSERT INTO accounts (id, balance, daily_limit) VALUES (1, 1000, 100), (2, 0, NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let enq = |amount: &'static str| {
        let db = &db;
        async move { db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", amount]).await }
    };
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default());
    assert_eq!(enq("30").await.code, 0);
    assert_eq!(applier.run_once().await.unwrap().succeeded, 1);
    assert_eq!(enq("30").await.code, 0);
    assert_eq!(applier.run_once().await.unwrap().succeeded, 1);
    assert_eq!(db.scalar("SELECT spent_today FROM accounts WHERE id = 1").await, 60, "what left it today");
    assert_eq!(enq("30").await.code, 0, "60 applied + 30 = 90 <= 100");
    let over = enq("20").await;
    assert_eq!(over.code, 3, "60 applied + 30 pending + 20 > 100: {over:?}");
    assert!(over.stderr.contains("90 already accepted today"), "{}", over.stderr);
    // An unlimited account keeps its day's total too: a limit may come later.
    sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('u', 2, 1, 5)")
        .execute(&db.pool)
        .await
        .unwrap();
    applier.run_once().await.unwrap();
    assert_eq!(db.scalar("SELECT spent_today FROM accounts WHERE id = 2").await, 5);
}

#[tokio::test]
async fn an_unlimited_account_may_move_more_than_i64_max_in_one_batch() {
    let db = TestDb::new().await;
    let big = i64::MAX - 10;
    db.open_account(1, big).await;
    db.open_account(2, 0).await;
    // 1 -> 2, 2 -> 1, 1 -> 2: account 1 sends 2 * big in one batch, which
    // a running daily total for an unlimited account would overflow.
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         VALUES ('a', 1, 2, $1), ('b', 2, 1, $1), ('c', 1, 2, $1)",
    )
    .bind(big)
    .execute(&db.pool)
    .await
    .unwrap();
    let c = Applier::new(db.pool.clone(), ApplyConfig::default()).run_once().await.unwrap();
    assert_eq!((c.succeeded, c.errored), (3, 0), "{c:?}");
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 2").await, big);
}

#[tokio::test]
async fn the_daily_window_at_apply_is_the_utc_day_whatever_the_session_time_zone() {
    let db = TestDb::new().await;
    // sqlx asks for UTC when it connects; a session can still change it.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET TimeZone = 'Pacific/Kiritimati'").execute(conn).await?;
                Ok(())
            })
        })
        .connect(&db.url)
        .await
        .unwrap();
    let zone: String = sqlx::query_scalar("SELECT current_setting('TimeZone')").fetch_one(&pool).await.unwrap();
    assert_eq!(zone, "Pacific/Kiritimati", "sessions of this database are 14 h ahead of UTC");
    sqlx::query("INSERT INTO accounts (id, balance, daily_limit) VALUES (1, 1000, 100), (2, 0, NULL)")
        .execute(&pool)
        .await
        .unwrap();
    // 60 sent on the previous UTC day, 60 PENDING now: each day stays under
    // the limit of 100. (In Kiritimati the two may be the same local day.)
    sqlx::query("UPDATE accounts SET spent_day = (now() AT TIME ZONE 'UTC')::date - 1, spent_today = 60 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('today', 1, 2, 60)")
        .execute(&pool)
        .await
        .unwrap();
    let c = Applier::new(pool.clone(), ApplyConfig::default()).run_once().await.unwrap();
    assert_eq!(c.succeeded, 1, "{c:?}");
    let (day, spent): (bool, i64) =
        sqlx::query_as("SELECT spent_day = (now() AT TIME ZONE 'UTC')::date, spent_today FROM accounts WHERE id = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((day, spent), (true, 60), "counted on the UTC day it was applied, from zero");
}

/// A limit set by plain SQL in the middle of the day counts everything the
/// account already sent that day, with or without a limit then.
#[tokio::test]
async fn a_limit_set_mid_day_counts_what_the_account_already_sent_that_day() {
    let db = TestDb::new().await;
    db.open_account(1, 10_000).await;
    db.open_account(2, 0).await;
    db.enqueue_sql("before", 1, 2, 1_000).await;
    db.apply_all().await;
    sqlx::query("UPDATE accounts SET daily_limit = 500 WHERE id = 1").execute(&db.pool).await.unwrap();
    // The CLI refuses at enqueue ...
    let out = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "1"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("1000 already accepted today"), "{}", out.stderr);
    // ... and a transfer enqueued by SQL fails when applied.
    let id = db.enqueue_sql("after", 1, 2, 400).await;
    db.apply_all().await;
    let (status, reason): (String, Option<String>) =
        sqlx::query_as("SELECT status, failure_reason FROM transfers WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), reason.as_deref()), ("FAILED", Some("daily_limit_exceeded")));
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 9_000);
}

/// Transfers enqueued by SQL that waited days (the worker was down over a
/// weekend), with pruning in between, count on the day they are applied:
/// two of 100 against a limit of 100 never both succeed.
#[tokio::test]
async fn transfers_that_waited_days_and_a_prune_cannot_exceed_a_limit_together() {
    let db = TestDb::new().await;
    sqlx::query("INSERT INTO accounts (id, balance, daily_limit) VALUES (1, 1000, 100), (2, 0, NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    // Both were enqueued on a Friday; the worker comes back on Monday,
    // applies one, a prune runs, then the other is applied.
    let friday = |key: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO transfers (idempotency_key, from_account, to_account, amount, created_at)
                 VALUES ($1, 1, 2, 100, now() - interval '3 days')",
            )
            .bind(key)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    friday("fri-1").await;
    db.apply_all().await;
    let out = db.cli(&["prune", "--published-older-than", "1s", "--transfers-older-than", "1s"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    friday("fri-2").await;
    db.apply_all().await;
    let statuses: Vec<TransferStatus> = sqlx::query_scalar::<_, String>("SELECT status FROM transfers ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(statuses, [TransferStatus::Succeeded, TransferStatus::Failed]);
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 2").await, 100);
}

#[tokio::test]
async fn a_batch_takes_the_accounts_it_can_and_a_row_skipped_too_often_waits_its_turn() {
    let db = TestDb::new().await;
    for id in 1..=4 {
        db.open_account(id, 1_000).await;
    }
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         VALUES ('held', 1, 2, 1), ('free-1', 3, 4, 1), ('free-2', 4, 3, 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Another batch (or writer) holds account 1.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE id = 1 FOR NO KEY UPDATE").execute(&mut *other).await.unwrap();

    let limits = SessionLimits { lock_timeout: Some(Duration::from_millis(300)), ..SessionLimits::default() };
    let fast = RetryPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(20), multiplier: 2.0 };
    let applier = Applier::new(
        worker_pool(&db, limits).await,
        ApplyConfig { batch_size: 10, max_attempts: 2, retry: fast, max_skips: 2, ..ApplyConfig::default() },
    );
    let started = std::time::Instant::now();
    let c = applier.run_once().await.unwrap();
    assert_eq!((c.succeeded, c.skipped, c.put_off), (2, 1, 0), "{c:?}");
    assert!(started.elapsed() < Duration::from_millis(250), "the batch did not wait for account 1");
    let c = applier.run_once().await.unwrap();
    assert_eq!((c.skipped, c.put_off), (1, 0), "skipped a second time: {c:?}");
    // Skipped max_skips times: now it waits its turn, but at most
    // TURN_WAIT; the lock is still held, so account 1 is held elsewhere: the
    // row stays PENDING, uncounted, and claims leave account 1 alone.
    let started = std::time::Instant::now();
    let c = applier.run_once().await.unwrap();
    assert_eq!((c.succeeded, c.skipped, c.put_off, c.errored), (0, 1, 0, 0), "{c:?}");
    assert!(started.elapsed() < TURN_WAIT + Duration::from_millis(500), "waited {:?}", started.elapsed());
    let c = applier.run_once().await.unwrap();
    assert_eq!(c.claimed, 0, "account 1 is busy: its transfer is not claimed again at once: {c:?}");
    other.rollback().await.unwrap();
    wait_for("the held transfer to be applied", Duration::from_secs(10), || async {
        applier.run_once().await.unwrap();
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await == 3
    })
    .await;
    assert_eq!(db.scalar("SELECT max(attempts)::bigint FROM transfers").await, 0);
}

#[tokio::test]
async fn a_hot_account_touched_by_every_transfer_ends_with_exact_balances() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000_000).await;
    for id in 2..=20 {
        db.open_account(id, 1_000).await;
    }
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         SELECT 'h-' || g, CASE WHEN g % 2 = 0 THEN 1 ELSE 2 + g % 19 END,
                CASE WHEN g % 2 = 0 THEN 2 + g % 19 ELSE 1 END, 1 + g % 7
           FROM generate_series(1, 3000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let opening: HashMap<i64, i64> = (1..=20).map(|id| (id, if id == 1 { 1_000_000 } else { 1_000 })).collect();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let applier = Applier::new(db.pool.clone(), ApplyConfig { batch_size: 50, ..ApplyConfig::default() });
            tokio::spawn(async move {
                applier.drain().await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await, 0);
    db.assert_invariants(1_000_000 + 19_000, &opening).await;
}

/// An outside session holds account 1's row lock for as long as the test
/// runs (an `UPDATE` left uncommitted in an operator's psql). A backlog
/// of transfers on account 1 waits; transfers between other accounts,
/// enqueued meanwhile, are applied with their usual latency by a real worker
/// process with its default settings; once the lock goes, the backlog is
/// applied too, with no attempt counted.
#[tokio::test]
async fn an_account_locked_elsewhere_for_minutes_delays_only_its_own_transfers() {
    let db = TestDb::new().await;
    for id in 1..=4 {
        db.open_account(id, 1_000_000).await;
    }
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         SELECT 'held-' || g, 1, 2, 1 FROM generate_series(1, 500) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // An UPDATE left uncommitted: the row lock an outside writer holds.
    let mut outside = db.pool.begin().await.unwrap();
    sqlx::query("UPDATE accounts SET balance = balance WHERE id = 1").execute(&mut *outside).await.unwrap();
    let queue = TestQueue::new(false).await;
    let _worker = KillOnDrop(db.spawn_worker(&queue.url, &[]));

    // 30 rounds of 10 unrelated transfers, 100 ms apart.
    for round in 0..30 {
        sqlx::query(
            "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
             SELECT 'free-' || $1 || '-' || g, 3 + g % 2, 4 - g % 2, 1 FROM generate_series(1, 10) g",
        )
        .bind(round)
        .execute(&db.pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("the unrelated transfers to be applied", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE idempotency_key LIKE 'free-%' AND status = 'SUCCEEDED'").await
            == 300
    })
    .await;
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM applied_at - created_at)::float8 FROM transfers
          WHERE idempotency_key LIKE 'free-%' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    let max = latencies[latencies.len() - 1];
    assert!(p99 < 1.5 && max < 3.0, "unrelated transfers waited: p99 {p99:.3} s, max {max:.3} s");
    assert_eq!(
        db.scalar("SELECT count(*) FROM transfers WHERE idempotency_key LIKE 'held-%' AND status = 'PENDING'").await,
        500,
        "the transfers that need account 1 wait for it"
    );

    outside.rollback().await.unwrap();
    wait_for("the held transfers to be applied once the lock goes", Duration::from_secs(20), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'SUCCEEDED'").await == 800
    })
    .await;
    assert_eq!(db.scalar("SELECT max(attempts)::bigint FROM transfers").await, 0, "contention is never counted");
    assert_eq!(db.total_balance().await, 4_000_000);
}

//! Producers: idempotent enqueue, enqueue inside the producer's transaction,
//! bulk files, and plain SQL inserts.

use transfer_worker::account::AccountId;
use transfer_worker::error::Refusal;
use transfer_worker::service::Service;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};
use transfer_worker::transfer::enqueue::{enqueue, NewTransfer};
use transfer_worker::transfer::{Amount, IdempotencyKey};
use transfer_worker::Error;

use crate::helpers::TestDb;

fn transfer(from: i64, to: i64, amount: i64, key: &str) -> NewTransfer {
    NewTransfer::new(
        AccountId(from),
        AccountId(to),
        Amount::new(amount).unwrap(),
        Some(IdempotencyKey::new(key).unwrap()),
    )
    .unwrap()
}

#[tokio::test]
async fn same_key_and_parameters_returns_the_existing_transfer() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let first = enqueue(&db.pool, &transfer(1, 2, 10, "k")).await.unwrap();
    let again = enqueue(&db.pool, &transfer(1, 2, 10, "k")).await.unwrap();
    assert!(first.created);
    assert!(!again.created);
    assert_eq!(first.transfer_id, again.transfer_id);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 1);
}

#[tokio::test]
async fn same_key_with_other_parameters_is_refused_and_writes_nothing() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    db.open_account(3, 0).await;
    enqueue(&db.pool, &transfer(1, 2, 10, "k")).await.unwrap();
    for other in [transfer(1, 2, 11, "k"), transfer(1, 3, 10, "k"), transfer(2, 1, 10, "k")] {
        let err = enqueue(&db.pool, &other).await.unwrap_err();
        assert!(matches!(err, Error::Refused(Refusal::KeyReused { .. })), "{err:?}");
    }
    let out = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "99", "--key", "k"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("idempotency key \"k\""), "{}", out.stderr);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 1);
    assert_eq!(db.scalar("SELECT amount FROM transfers").await, 10);
}

#[tokio::test]
async fn concurrent_enqueues_with_one_key_create_one_transfer() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move { enqueue(&pool, &transfer(1, 2, 10, "race")).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let e = t.await.unwrap();
        created += e.created as usize;
        ids.insert(e.transfer_id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 1);
}

#[tokio::test]
async fn a_transfer_enqueued_in_an_open_producer_transaction_is_invisible_to_workers_until_commit() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default());

    let mut tx = db.pool.begin().await.unwrap();
    let e = enqueue(&mut *tx, &transfer(1, 2, 10, "in-tx")).await.unwrap();
    assert!(e.created);
    assert_eq!(applier.run_once().await.unwrap().claimed, 0, "uncommitted transfer must not be claimed");
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0);
    tx.commit().await.unwrap();

    let counts = applier.run_once().await.unwrap();
    assert_eq!((counts.claimed, counts.succeeded), (1, 1));
}

#[tokio::test]
async fn a_rolled_back_producer_transaction_leaves_no_transfer() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let mut tx = db.pool.begin().await.unwrap();
    enqueue(&mut *tx, &transfer(1, 2, 10, "rolled-back")).await.unwrap();
    tx.rollback().await.unwrap();
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default());
    assert_eq!(applier.run_once().await.unwrap().claimed, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0);
}

#[tokio::test]
async fn bulk_enqueue_prints_one_result_per_line_and_is_idempotent() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let input = "{\"from\":1,\"to\":2,\"amount\":5,\"key\":\"a\"}\n\n{\"from\":2,\"to\":1,\"amount\":3}\n{\"from\":1,\"to\":2,\"amount\":5,\"key\":\"a\"}\n";
    let out = db.cli_with_stdin(&["enqueue", "--file", "-"], input).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<serde_json::Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["created"], true);
    assert_eq!(lines[1]["created"], true);
    assert_eq!(lines[2]["created"], false, "a key repeated in the file is the same transfer");
    assert_eq!(lines[0]["transfer_id"], lines[2]["transfer_id"]);
    assert_eq!(lines[0]["status"], "PENDING");

    let again =
        db.cli_with_stdin(&["enqueue", "--file", "-"], "{\"from\":1,\"to\":2,\"amount\":5,\"key\":\"a\"}\n").await;
    assert_eq!(again.code, 0);
    assert_eq!(again.json()["created"], false);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 2);
}

#[tokio::test]
async fn a_bad_line_rejects_the_whole_bulk_file_naming_the_line() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let good = "{\"from\":1,\"to\":2,\"amount\":5}\n";
    let cases = [
        ("{\"from\":1,\"to\":2,\"amount\":0}", "line 2", 2),
        ("{\"from\":1,\"to\":1,\"amount\":5}", "line 2", 2),
        ("{\"from\":1,\"to\":99,\"amount\":5}", "account 99 does not exist", 2),
        ("not json", "line 2", 2),
        ("{\"from\":1,\"to\":2,\"amount\":5,\"colour\":\"red\"}", "line 2", 2),
        ("{\"from\":1,\"to\":2}", "line 2", 2),
    ];
    for (bad, needle, code) in cases {
        let out = db.cli_with_stdin(&["enqueue", "--file", "-"], &format!("{good}{bad}\n{good}")).await;
        assert_eq!(out.code, code, "{bad}: {out:?}");
        assert!(out.stderr.contains(needle), "{bad}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{bad}: nothing printed as enqueued");
    }
    // A key reused with other parameters, in the file or against the database.
    let out = db
        .cli_with_stdin(
            &["enqueue", "--file", "-"],
            "{\"from\":1,\"to\":2,\"amount\":5,\"key\":\"x\"}\n{\"from\":1,\"to\":2,\"amount\":6,\"key\":\"x\"}\n",
        )
        .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("line 2"), "{}", out.stderr);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0, "nothing written");

    enqueue(&db.pool, &transfer(1, 2, 7, "taken")).await.unwrap();
    let out = db
        .cli_with_stdin(
            &["enqueue", "--file", "-"],
            "{\"from\":1,\"to\":2,\"amount\":5}\n{\"from\":1,\"to\":2,\"amount\":8,\"key\":\"taken\"}\n",
        )
        .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("line 2"), "{}", out.stderr);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 1, "the good line was rolled back too");

    let out = db.cli(&["enqueue", "--file", "/nonexistent/file.jsonl"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("/nonexistent/file.jsonl"), "{}", out.stderr);
}

#[tokio::test]
async fn a_plain_sql_insert_gets_defaults_and_bad_rows_are_rejected_by_the_database() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('sql-1', 1, 2, 40)")
        .execute(&db.pool)
        .await
        .unwrap();
    let (status, refund_status): (String, String) =
        sqlx::query_as("SELECT status, refund_status FROM transfers").fetch_one(&db.pool).await.unwrap();
    assert_eq!((status.as_str(), refund_status.as_str()), ("PENDING", "NONE"));

    for (values, constraint) in [
        ("('b1', 1, 2, 0)", "transfers_amount_positive"),
        ("('b2', 1, 2, -5)", "transfers_amount_positive"),
        ("('b3', 1, 1, 5)", "transfers_distinct_accounts"),
        ("('b4', 1, 42, 5)", "transfers_to_account_fkey"),
        ("('b5', 42, 1, 5)", "transfers_from_account_fkey"),
        ("('', 1, 2, 5)", "transfers_idempotency_key_length"),
        ("(repeat('x', 2049), 1, 2, 5)", "transfers_idempotency_key_length"),
    ] {
        let sql = format!("INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES {values}");
        let err = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap_err();
        assert_eq!(transfer_worker::db::violated_constraint(&err), Some(constraint), "{values}: {err}");
    }
    let err = sqlx::query(
        "INSERT INTO transfers (id, idempotency_key, from_account, to_account, amount) VALUES (99, 'x', 1, 2, 5)",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert_eq!(transfer_worker::db::sqlstate(&err).as_deref(), Some("428C9"), "ids come from the sequence only: {err}");
    let err = sqlx::query("UPDATE transfers SET status = 'DONE'").execute(&db.pool).await.unwrap_err();
    assert_eq!(transfer_worker::db::violated_constraint(&err), Some("transfers_status_known"));
    let err = sqlx::query("UPDATE accounts SET balance = -1 WHERE id = 1").execute(&db.pool).await.unwrap_err();
    assert_eq!(transfer_worker::db::violated_constraint(&err), Some("accounts_balance_non_negative"));

    let applier = Applier::new(db.pool.clone(), ApplyConfig::default());
    assert_eq!(applier.run_once().await.unwrap().succeeded, 1, "a SQL-enqueued transfer is applied like any other");
}

#[tokio::test]
async fn an_enqueue_over_the_daily_limit_exits_3_and_writes_nothing() {
    let db = TestDb::new().await;
    let out = db.cli(&["account", "open", "1", "--balance", "1000", "--daily-limit", "100"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    db.open_account(2, 0).await;
    let enq = |amount: &'static str, key: &'static str| {
        let db = &db;
        async move { db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", amount, "--key", key]).await }
    };
    assert_eq!(enq("60", "a").await.code, 0);
    let over = enq("50", "b").await;
    assert_eq!(over.code, 3, "{over:?}");
    assert!(over.stderr.contains("daily limit of account 1 exceeded"), "{}", over.stderr);
    assert_eq!(enq("40", "c").await.code, 0, "exactly up to the limit is fine");
    let repeat = enq("60", "a").await;
    assert_eq!(repeat.code, 0, "a repeat of an accepted transfer is not a new acceptance: {repeat:?}");
    assert_eq!(repeat.json()["created"], false);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 2);
    // Incoming money and other accounts are not limited.
    assert_eq!(db.cli(&["enqueue", "--from", "2", "--to", "1", "--amount", "500"]).await.code, 0);

    let bulk = db
        .cli_with_stdin(
            &["enqueue", "--file", "-"],
            "{\"from\":2,\"to\":1,\"amount\":1}\n{\"from\":1,\"to\":2,\"amount\":1}\n",
        )
        .await;
    assert_eq!(bulk.code, 3, "{bulk:?}");
    assert!(bulk.stderr.contains("line 2: daily limit"), "{}", bulk.stderr);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 3, "the bulk file wrote nothing");
}

#[tokio::test]
async fn concurrent_enqueues_never_accept_more_than_the_daily_limit() {
    let db = TestDb::new().await;
    sqlx::query("INSERT INTO accounts (id, balance, daily_limit) VALUES (1, 10000, 100), (2, 0, NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                // Each in its own producer transaction, committed after a pause
                // so the transactions overlap.
                let mut tx = pool.begin().await.unwrap();
                let r = enqueue(&mut *tx, &transfer(1, 2, 10, &format!("k-{i}"))).await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                tx.commit().await.unwrap();
                r.is_ok()
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap() as i64;
    }
    assert_eq!(accepted, 10);
    assert_eq!(db.scalar("SELECT COALESCE(sum(amount), 0)::bigint FROM transfers").await, 100);
}

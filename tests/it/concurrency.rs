//! The concurrency tools as library features (advisory locks and guards,
//! isolation with retries, optimistic versions), each against real
//! PostgreSQL with real concurrency, the `--guard` of the CLI, the `lab`
//! that compares them, and the runnable examples.

use std::time::Duration;

use transfer_worker::account::AccountId;
use transfer_worker::concurrency::advisory::{self, hash_key, Guard, LockKey, SessionLock};
use transfer_worker::concurrency::isolation::{run_in, Isolation};
use transfer_worker::concurrency::optimistic::{self, Attempt};
use transfer_worker::concurrency::{Retries, RetryError};
use transfer_worker::error::{Error, Refusal};
use transfer_worker::retry::RetryPolicy;
use transfer_worker::transfer::enqueue::{enqueue, NewTransfer};
use transfer_worker::transfer::Amount;

use crate::helpers::{wait_for, TestDb};

const FAST: Retries = Retries {
    max_attempts: 4,
    policy: RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(5), multiplier: 2.0 },
};

#[tokio::test]
async fn the_sql_and_rust_lock_keys_agree_on_any_text() {
    let db = TestDb::new().await;
    let long = "k".repeat(2048);
    for (ns, key) in [
        ("", ""),
        ("guard", ""),
        ("", "x"),
        ("ab", "c"),
        ("a", "bc"),
        ("guard", "user-42:purchase"),
        ("guard", "ユーザー42:購入 😀 é"),
        ("naïve", "'; DROP TABLE transfers; --"),
        ("guard", "\"quoted\" \\ back"),
        ("guard", long.as_str()),
    ] {
        let sql: i64 = sqlx::query_scalar("SELECT transfer_worker_lock_key($1, $2)")
            .bind(ns)
            .bind(key)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(sql, hash_key(ns, key), "{ns:?} / {key:?}");
    }
    assert_ne!(hash_key("ab", "c"), hash_key("a", "bc"));
}

#[tokio::test]
async fn a_try_lock_refuses_a_second_holder_and_the_waiting_form_waits_for_the_first() {
    let db = TestDb::new().await;
    for key in [LockKey::hashed("test", "k"), LockKey::pair(7, 42)] {
        let mut first = db.pool.begin().await.unwrap();
        assert!(advisory::try_xact_lock(&mut first, key).await.unwrap());
        let mut second = db.pool.begin().await.unwrap();
        assert!(!advisory::try_xact_lock(&mut second, key).await.unwrap(), "{key:?}: refused while held");
        // The waiting form waits ...
        let pool = db.pool.clone();
        let waiter = tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            advisory::xact_lock(&mut tx, key).await.unwrap();
            tx.commit().await.unwrap();
        });
        wait_for("the waiter to wait on the advisory lock", Duration::from_secs(10), || async {
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'",
            )
            .await
                == 1
        })
        .await;
        assert!(!waiter.is_finished());
        // ... until the holder's transaction ends.
        first.commit().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        second.rollback().await.unwrap();
    }
    // The two forms are different key spaces.
    let mut a = db.pool.begin().await.unwrap();
    assert!(advisory::try_xact_lock(&mut a, LockKey::Int(7)).await.unwrap());
    let mut b = db.pool.begin().await.unwrap();
    assert!(advisory::try_xact_lock(&mut b, LockKey::pair(0, 7)).await.unwrap());
}

async fn held_elsewhere(db: &TestDb, key: i64) -> bool {
    let mut other = db.pool.begin().await.unwrap();
    let taken = advisory::try_xact_lock(&mut other, LockKey::Int(key)).await.unwrap();
    other.rollback().await.unwrap();
    !taken
}

#[tokio::test]
async fn a_session_lock_is_released_by_release_and_by_drop_also_on_panic() {
    let db = TestDb::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&db.url).await.unwrap();
    let key = hash_key("test", "session");
    // Released explicitly: its connection goes back to the pool, not holding it.
    let lock = SessionLock::acquire(&pool, LockKey::Int(key)).await.unwrap();
    assert!(held_elsewhere(&db, key).await);
    assert!(SessionLock::try_acquire(&pool, LockKey::Int(key)).await.unwrap().is_none(), "one holder at a time");
    lock.release().await.unwrap();
    assert!(!held_elsewhere(&db, key).await);
    // Dropped without release: the connection is closed, which releases it.
    let lock = SessionLock::acquire(&pool, LockKey::Int(key)).await.unwrap();
    drop(lock);
    wait_for("the dropped lock to be released", Duration::from_secs(10), || async { !held_elsewhere(&db, key).await })
        .await;
    // A panic while holding it: the same.
    let p = pool.clone();
    let panicked = tokio::spawn(async move {
        let _lock = SessionLock::acquire(&p, LockKey::Int(key)).await.unwrap();
        panic!("a bug while holding the lock");
    })
    .await;
    assert!(panicked.is_err());
    wait_for("the panicked task's lock to be released", Duration::from_secs(10), || async {
        !held_elsewhere(&db, key).await
    })
    .await;
    // No pooled connection holds an advisory lock.
    for _ in 0..2 {
        let mut c = pool.acquire().await.unwrap();
        let held: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
                .fetch_one(&mut *c)
                .await
                .unwrap();
        assert_eq!(held, 0);
    }
}

#[tokio::test]
async fn serializable_retries_a_write_skew_and_gives_up_after_the_bound_with_the_last_error() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "CREATE TABLE on_call (doctor TEXT PRIMARY KEY, on_call BOOLEAN NOT NULL);
         INSERT INTO on_call VALUES ('alice', true), ('bob', true)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let leave = |doctor: &'static str| {
        let pool = db.pool.clone();
        async move {
            run_in(&pool, Isolation::Serializable, &Retries::default(), move |conn| {
                Box::pin(async move {
                    let n: i64 =
                        sqlx::query_scalar("SELECT count(*) FROM on_call WHERE on_call").fetch_one(&mut *conn).await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if n < 2 {
                        return Ok(false);
                    }
                    sqlx::query("UPDATE on_call SET on_call = false WHERE doctor = $1")
                        .bind(doctor)
                        .execute(&mut *conn)
                        .await?;
                    Ok(true)
                })
            })
            .await
            .unwrap()
        }
    };
    let (a, b) = tokio::join!(leave("alice"), leave("bob"));
    assert_eq!(db.scalar("SELECT count(*) FROM on_call WHERE on_call").await, 1, "one doctor stays");
    assert_eq!(u32::from(a.value) + u32::from(b.value), 1);
    assert!(a.attempts + b.attempts >= 3, "one of them was retried: {a:?} {b:?}");

    // Always failing to serialize: FAST's 4 attempts, then the last error.
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.url).await.unwrap();
    let err = run_in(&pool, Isolation::Serializable, &FAST, |conn| {
        Box::pin(async move {
            sqlx::raw_sql(
                "DO $$ BEGIN RAISE EXCEPTION 'forced conflict' USING ERRCODE = 'serialization_failure'; END $$",
            )
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    })
    .await
    .unwrap_err();
    match err {
        RetryError::Exhausted { attempts, last } => {
            assert_eq!(attempts, 4);
            assert!(last.to_string().contains("forced conflict"), "{last}");
        }
        other => panic!("{other:?}"),
    }
    // Other errors are not retried.
    let mut calls = 0;
    let err = run_in(&pool, Isolation::RepeatableRead, &FAST, |conn| {
        calls += 1;
        Box::pin(async move {
            sqlx::query("SELECT 1/0").execute(&mut *conn).await?;
            Ok(())
        })
    })
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::Failed(_)) && calls == 1, "{err:?} after {calls} calls");
    // The pool's one connection is back at the default level.
    let level: String = sqlx::query_scalar("SHOW transaction_isolation").fetch_one(&pool).await.unwrap();
    assert_eq!(level, "read committed");
}

#[tokio::test]
async fn optimistic_versions_lose_nothing_and_give_up_after_the_bound() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "CREATE TABLE counter (id INT PRIMARY KEY, value BIGINT, version BIGINT); INSERT INTO counter VALUES (1, 0, 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let patient = Retries { max_attempts: 10_000, policy: FAST.policy };
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut retries = 0;
                for _ in 0..40 {
                    let done = optimistic::retry(&patient, || async {
                        let (v, version): (i64, i64) =
                            sqlx::query_as("SELECT value, version FROM counter WHERE id = 1").fetch_one(&pool).await?;
                        let rows = sqlx::query(
                            "UPDATE counter SET value = $1, version = version + 1 WHERE id = 1 AND version = $2",
                        )
                        .bind(v + 1)
                        .bind(version)
                        .execute(&pool)
                        .await?
                        .rows_affected();
                        Ok(Attempt::from_rows_affected(rows))
                    })
                    .await
                    .unwrap();
                    retries += done.attempts - 1;
                }
                retries
            })
        })
        .collect();
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    assert_eq!(db.scalar("SELECT value FROM counter").await, 160);
    eprintln!("{retries} retries");
    // A version that changes under every attempt: given up after the bound.
    let mut tries = 0;
    let err = optimistic::retry::<(), _, _>(&FAST, || {
        tries += 1;
        async { Ok(Attempt::Conflict) }
    })
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::VersionConflict { attempts: 4 }) && tries == 4, "{err:?}");
}

/// Eight requests by one user at once, each with a fresh key, each holding
/// its transaction open for a while: with the guard, one purchase; the
/// others refused at once, nothing written.
#[tokio::test]
async fn a_guard_lets_one_of_eight_concurrent_purchases_through() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000_000).await;
    db.open_account(2, 0).await;
    let guard = Guard::new("user-1:purchase").unwrap();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (pool, guard, barrier) = (db.pool.clone(), guard.clone(), barrier.clone());
            tokio::spawn(async move {
                let t = NewTransfer::new(AccountId(1), AccountId(2), Amount::new(100).unwrap(), None)
                    .unwrap()
                    .with_guard(Some(guard));
                barrier.wait().await;
                let mut tx = pool.begin().await.unwrap();
                let r = enqueue(&mut *tx, &t).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.commit().await.unwrap();
                r
            })
        })
        .collect();
    let (mut created, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => created += 1,
            Err(Error::Refused(Refusal::GuardHeld { guard })) => {
                assert_eq!(guard, "user-1:purchase");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((created, refused), (1, 7));
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 1);
}

/// A SQL producer holds a guard in its open transaction: `enqueue`,
/// `refund` and `cancel` with that guard are refused at once (exit 3, the
/// guard named, nothing written), and go through once it commits. A guard is
/// any text; bad ones are exit 2.
#[tokio::test]
async fn requests_with_a_guard_a_sql_session_holds_are_refused_and_write_nothing() {
    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let done = db.enqueue_sql("done", 1, 2, 10).await;
    db.apply_all().await;
    let pending = db.enqueue_sql("pending", 1, 2, 10).await;
    let guard = "ユーザー42'; DROP TABLE transfers; -- \"x\"";
    let mut sql = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(transfer_worker_lock_key('guard', $1))")
        .bind(guard)
        .execute(&mut *sql)
        .await
        .unwrap();
    let before = (db.scalar("SELECT count(*) FROM transfers").await, db.scalar("SELECT count(*) FROM outbox").await);
    let (d, p) = (done.to_string(), pending.to_string());
    let requests: [Vec<&str>; 3] = [
        vec!["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--guard", guard],
        vec!["refund", d.as_str(), "--guard", guard],
        vec!["cancel", p.as_str(), "--guard", guard],
    ];
    for args in &requests {
        let started = std::time::Instant::now();
        let out = db.cli(args).await;
        assert_eq!(out.code, 3, "{args:?}: {out:?}");
        assert!(out.stderr.contains("guard") && out.stderr.contains("ユーザー42"), "{}", out.stderr);
        assert!(started.elapsed() < Duration::from_secs(5), "refused at once, not after a wait");
    }
    let after = (db.scalar("SELECT count(*) FROM transfers").await, db.scalar("SELECT count(*) FROM outbox").await);
    assert_eq!(before, after, "nothing written");
    sql.commit().await.unwrap();
    for args in &requests {
        let out = db.cli(args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    for (args, needle) in [
        (vec!["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--guard", ""], "--guard"),
        (vec!["cancel", p.as_str(), "--guard", ""], "--guard"),
    ] {
        let out = db.cli(&args).await;
        assert_eq!(out.code, 2, "{out:?}");
        assert!(out.stderr.contains(needle) && out.stderr.contains("must not be empty"), "{}", out.stderr);
    }
    let long = "g".repeat(2049);
    let out = db.cli(&["refund", d.as_str(), "--guard", &long]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("at most 2048 bytes"), "{}", out.stderr);
}

#[tokio::test]
async fn lab_runs_the_2_x_25_counter_by_default_and_only_naive_loses_updates() {
    let db = TestDb::new().await;
    let out = db.cli(&["lab", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    assert_eq!(
        (v["scenario"].as_str(), v["workers"].as_i64(), v["increments"].as_i64()),
        (Some("counter"), Some(2), Some(25))
    );
    let strategies = v["strategies"].as_array().unwrap();
    let names: Vec<&str> = strategies.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["naive", "atomic", "for_update", "optimistic", "advisory", "serializable"]);
    for s in strategies {
        for k in ["expected", "actual", "lost", "duplicates", "refused", "retries"] {
            assert!(s[k].as_i64().is_some(), "{k} in {s}");
        }
        assert!(s["elapsed_ms"].as_f64().unwrap() > 0.0 && s["ops_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert_eq!(s["expected"], 50);
        assert_eq!(s["lost"].as_i64().unwrap(), 50 - s["actual"].as_i64().unwrap(), "{s}");
        if s["name"] != "naive" {
            assert_eq!(s["actual"], 50, "{s}");
        }
    }
    // With more workers and --repeat, naive loses updates (every run's
    // figures are listed) and the others never do.
    let out = db.cli(&["lab", "--workers", "6", "--increments", "40", "--repeat", "3", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    for s in v["strategies"].as_array().unwrap() {
        let lost: Vec<i64> = s["lost"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(lost.len(), 3, "{s}");
        assert_eq!(s["actual"].as_array().unwrap().len(), 3);
        if s["name"] == "naive" {
            assert!(lost.iter().sum::<i64>() > 0, "naive lost nothing in 3 runs: {s}");
        } else {
            assert_eq!(lost, [0, 0, 0], "{s}");
        }
    }
    let text = db.cli(&["lab"]).await;
    assert_eq!(text.code, 0);
    assert!(text.stdout.contains("serializable") && text.stdout.contains("duplicates"), "{}", text.stdout);
}

#[tokio::test]
async fn lab_refund_writes_exactly_one_refund_for_every_strategy_but_naive() {
    let db = TestDb::new().await;
    let out = db.cli(&["lab", "--scenario", "refund", "--repeat", "3", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    assert_eq!((v["scenario"].as_str(), v["workers"].as_i64()), (Some("refund"), Some(8)));
    let strategies = v["strategies"].as_array().unwrap();
    let names: Vec<&str> = strategies.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["naive", "guarded", "for_update", "optimistic", "advisory", "serializable"]);
    for s in strategies {
        assert_eq!(s["expected"], 1);
        let actual: Vec<i64> = s["actual"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        let dups: Vec<i64> = s["duplicates"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        if s["name"] == "naive" {
            assert!(dups.iter().sum::<i64>() > 0, "8 naive requests at once refunded twice at least once: {s}");
        } else {
            assert_eq!(actual, [1, 1, 1], "{s}");
            assert_eq!(dups, [0, 0, 0], "{s}");
            assert_eq!(s["refused"], 7, "the other seven were refused: {s}");
        }
    }
    let out = db.cli(&["lab", "--scenario", "purchase", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    let s = v["strategies"].as_array().unwrap();
    assert_eq!((s[0]["name"].as_str(), s[0]["actual"].as_i64()), (Some("naive"), Some(4)), "{v}");
    assert_eq!(
        (s[1]["name"].as_str(), s[1]["actual"].as_i64(), s[1]["refused"].as_i64()),
        (Some("guarded"), Some(1), Some(3))
    );
    for (args, flag) in [
        (&["lab", "--scenario", "nope"][..], "--scenario"),
        (&["lab", "--workers", "0"][..], "--workers"),
        (&["lab", "--repeat", "0"][..], "--repeat"),
    ] {
        let out = db.cli(args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(flag), "{}", out.stderr);
    }
}

/// The runnable examples of the library (`examples/`), run as a user would.
#[tokio::test]
async fn the_library_examples_run() {
    let db = TestDb::new().await;
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("examples");
    for (example, says) in [
        ("guard", "request 2 refused: guard \"user-42:purchase\" is held"),
        ("serializable", "doctors still on call: 1"),
        ("optimistic", "4 writers x 50 increments = 200"),
    ] {
        let out = tokio::process::Command::new(dir.join(example))
            .env("DATABASE_URL", &db.url)
            .output()
            .await
            .unwrap_or_else(|e| panic!("{example}: {e} (cargo test builds the examples)"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{example}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(says), "{example}: {stdout}");
    }
}

//! Running it as an operator would: `transfer show`, `prune` and the worker's
//! own pruning, metrics, JSON logs with no secret in them, trace context to
//! consumers, and the `probe` a container health check uses.

use std::collections::HashMap;
use std::time::Duration;
use transfer_worker::service::Service;

use crate::admin::{free_port, http};
use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

#[tokio::test]
async fn transfer_show_tells_the_whole_story_of_one_transfer() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let id = db.enqueue_sql("order-42", 1, 2, 60).await;
    db.apply_all().await;
    assert_eq!(db.cli(&["refund", &id.to_string(), "--amount", "10"]).await.code, 0);
    db.apply_all().await;

    let id_text = id.to_string();
    for args in [vec!["transfer", "show", id_text.as_str()], vec!["transfer", "show", "--key", "order-42"]] {
        let out = db.cli(&args).await;
        assert_eq!(out.code, 0, "{out:?}");
        let v = out.json();
        assert_eq!(v["transfer_id"], id);
        assert_eq!(v["idempotency_key"], "order-42");
        assert_eq!(
            (v["from_account"].as_i64(), v["to_account"].as_i64(), v["amount"].as_i64()),
            (Some(1), Some(2), Some(60))
        );
        assert_eq!(v["status"], "SUCCEEDED");
        assert_eq!(v["refund_status"], "COMPLETED");
        assert_eq!(v["refund"]["status"], "COMPLETED");
        assert_eq!(v["refund"]["amount"], 10);
        let events = v["events"].as_array().unwrap();
        let types: Vec<&str> = events.iter().map(|e| e["event_type"].as_str().unwrap()).collect();
        assert_eq!(types, ["transfer.succeeded", "refund.requested", "refund.completed"], "in the order written");
        for e in events {
            assert_eq!(e["state"], "pending");
            assert_eq!(e["attempts"], 0);
            assert!(e["event_id"].as_str().unwrap().len() == 36 && e["last_error"].is_null(), "{e}");
        }
    }
    for (args, needle) in [
        (vec!["transfer", "show", "987654"], "transfer 987654 does not exist"),
        (vec!["transfer", "show", "--key", "no-such-key"], "no transfer has idempotency key"),
        (vec!["transfer", "show", "abc"], "transfer id must be an integer"),
        (vec!["transfer", "show"], "required"),
    ] {
        let out = db.cli(&args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
}

#[tokio::test]
async fn prune_deletes_old_published_events_in_batches_and_transfers_only_when_asked() {
    let db = TestDb::new().await;
    crate::fixtures::seed_random(&db.pool, 20, 1_000_000, 2_500, 100, 3).await.unwrap();
    db.apply_all().await;
    // Most events were published 8 days ago; some yesterday; the rest wait.
    sqlx::query(
        "UPDATE outbox SET state = 'published', occurred_at = now() - interval '8 days',
                published_at = now() - interval '8 days' WHERE id % 10 <> 0",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE outbox SET state = 'published', published_at = now() - interval '1 day' WHERE id % 10 = 0 AND id % 20 = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE transfers SET applied_at = now() - interval '8 days'").execute(&db.pool).await.unwrap();
    let old = db.scalar("SELECT count(*) FROM outbox WHERE published_at < now() - interval '7 days'").await;
    let left = db.scalar("SELECT count(*) FROM outbox").await - old;
    assert!(old > 2 * transfer_worker::retention::BATCH, "several batches' worth: {old}");

    let out = db.cli(&["prune", "--published-older-than", "7d"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["published_events"], old);
    assert_eq!(out.json()["transfers"], 0, "transfers are never pruned unless asked");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, left, "pending and young events stay");
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 2_500);
    // The counters behind `status` follow the deletes.
    let status = db.cli(&["status", "--json"]).await.json();
    assert_eq!(status["outbox"]["published"], db.scalar("SELECT count(*) FROM outbox WHERE state = 'published'").await);

    // Transfers: only the finished ones whose events are all gone.
    let keep_refund: i64 = db.scalar("SELECT min(id) FROM transfers WHERE status = 'SUCCEEDED'").await;
    sqlx::query("UPDATE transfers SET refund_status = 'REQUESTED', refund_amount = 1 WHERE id = $1")
        .bind(keep_refund)
        .execute(&db.pool)
        .await
        .unwrap();
    let prunable = db
        .scalar(
            "SELECT count(*) FROM transfers t WHERE t.refund_status <> 'REQUESTED'
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.transfer_id = t.id)",
        )
        .await;
    let out = db.cli(&["prune", "--published-older-than", "7d", "--transfers-older-than", "7d"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["transfers"], prunable);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 2_500 - prunable);
    assert_eq!(
        db.scalar_with("SELECT count(*) FROM transfers WHERE id = $1::text::bigint", &keep_refund.to_string()).await,
        1
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM transfers t WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.transfer_id = t.id) AND refund_status <> 'REQUESTED'").await,
        0
    );

    for (args, needle) in [
        (vec!["prune"], "needs --published-older-than"),
        (vec!["prune", "--published-older-than", "7 days"], "an age is a whole number and a unit"),
        (vec!["prune", "--transfers-older-than", "1w"], "an age is a whole number and a unit"),
    ] {
        let out = db.cli(&args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_prunes_published_events_itself_one_replica_at_a_time() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    // Another replica is pruning (holds the lock) while this worker starts.
    let mut other = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(transfer_worker_lock_key('transfer-worker', 'prune'))")
        .execute(&mut *other)
        .await
        .unwrap();
    let args = ["--prune-published-older-than", "1s", "--prune-interval-ms", "200"];
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &args));
    for i in 0..20 {
        db.enqueue_sql(&format!("p-{i}"), 1, 2, 1).await;
    }
    wait_for("everything published", Duration::from_secs(30), || db.settled()).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 20, "not while another replica holds the lock");
    sqlx::query("SELECT pg_advisory_unlock(transfer_worker_lock_key('transfer-worker', 'prune'))")
        .execute(&mut *other)
        .await
        .unwrap();
    wait_for("the worker to prune them", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 20, "the ledger stays");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

/// The value of the first sample of `name` with these exact labels.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_worker_did_with_help_units_and_no_id_labels() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    for (i, amount) in [10, 20, 500].iter().enumerate() {
        db.enqueue_sql(&format!("m-{i}"), 1, 2, *amount).await;
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", &addr]));
    wait_for("applied and published", Duration::from_secs(30), || db.settled()).await;
    let metrics = loop {
        let (code, body) = http(&addr, "GET", "/metrics").await.unwrap();
        assert_eq!(code, 200);
        if sample(&body, "transfer_worker_events_published_total").unwrap_or(0.0) >= 3.0 {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        sample(&metrics, "transfer_worker_transfers_finished_total{outcome=\"succeeded\",reason=\"\"}"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "transfer_worker_transfers_finished_total{outcome=\"failed\",reason=\"insufficient_funds\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(sample(&metrics, "transfer_worker_sqs_calls_total{result=\"ok\"}").unwrap() >= 1.0, "{metrics}");
    assert!(sample(&metrics, "transfer_worker_apply_batches_total{step=\"transfer\"}").unwrap() >= 1.0, "{metrics}");
    assert_eq!(sample(&metrics, "transfer_worker_enqueue_to_applied_seconds_count"), Some(3.0), "{metrics}");
    assert_eq!(sample(&metrics, "transfer_worker_event_publish_age_seconds_count"), Some(3.0), "{metrics}");
    assert!(metrics.contains("transfer_worker_apply_batch_duration_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("transfer_worker_sqs_call_duration_seconds_bucket"), "{metrics}");
    assert_eq!(sample(&metrics, "transfer_worker_transfers{status=\"SUCCEEDED\"}"), Some(2.0), "{metrics}");
    assert_eq!(sample(&metrics, "transfer_worker_outbox_events{state=\"dead\"}"), Some(0.0), "{metrics}");
    assert!(metrics.contains("transfer_worker_oldest_unpublished_age_seconds "), "{metrics}");
    // Conventions: every family has HELP and TYPE; no label carries an id.
    let families: Vec<&str> = metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
    assert!(families.len() >= 15, "{metrics}");
    for f in &families {
        let name = f.split_whitespace().next().unwrap();
        assert!(metrics.contains(&format!("# HELP {name} ")), "HELP for {name}");
    }
    for banned in ["transfer_id=", "account=", "event_id=", "outbox_id="] {
        assert!(!metrics.contains(banned), "{banned} in {metrics}");
    }
    // The alert rules shipped in the repository are well formed and use
    // only metrics the worker exports.
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{}/deploy/prometheus/transfer-worker.rules.yml", env!("CARGO_MANIFEST_DIR")))
            .unwrap(),
    )
    .unwrap();
    let rules = rules["groups"][0]["rules"].as_sequence().unwrap();
    assert!(rules.len() >= 3);
    for r in rules {
        let (alert, expr) = (r["alert"].as_str().unwrap(), r["expr"].as_str().unwrap());
        assert!(r["for"].as_str().is_some_and(|f| f.ends_with('m')), "{alert}");
        assert!(r["labels"]["severity"].is_string() && r["annotations"]["summary"].is_string(), "{alert}");
        for name in
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("transfer_worker_"))
        {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(metrics.contains(&format!("# TYPE {family} ")), "{alert}: {name} is not exported");
        }
    }
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_fields_and_ids_and_no_secret_appears_anywhere() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    for i in 0..5 {
        db.enqueue_sql(&format!("j-{i}"), 1, 2, 1).await;
    }
    // Secrets of every kind (the test cluster trusts any password; LocalStack
    // accepts any key).
    let (password, aws_secret, token) = ("Pw-9f8e7d", "AwsSecret-5c4b3a", "Tok-1a2b3c4d5e6f7g8h");
    let url = db.url.replacen("postgres@", &format!("postgres:{password}@"), 1);
    let mut cmd = db.worker_command(&queue.url, &["--log-format", "json"]);
    cmd.env("DATABASE_URL", &url)
        .env("AWS_SECRET_ACCESS_KEY", aws_secret)
        .env("TRANSFER_WORKER_ADMIN_TOKEN", token)
        .env("RUST_LOG", "debug,aws_smithy_runtime=info,aws_config=info,hyper=info,h2=info")
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut w = KillOnDrop(child);
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    wait_for("applied and published", Duration::from_secs(30), || db.settled()).await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    let logs = reader.join().unwrap();

    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{logs}");
    for l in &lines {
        assert!(l["level"].is_string() && l["target"].is_string() && l["timestamp"].is_string(), "{l}");
    }
    let batch = lines.iter().find(|l| l["message"] == "batch applied").unwrap_or_else(|| panic!("{logs}"));
    assert!(batch["transfer_ids"].as_str().unwrap().contains('['), "the batch's transfer ids: {batch}");
    assert!(lines.iter().any(|l| l["message"] == "relay pass" && l["events"].is_number()), "{logs}");
    for secret in [password, aws_secret, token] {
        assert!(!logs.contains(secret), "{secret} in the logs");
    }

    // Nor in --help (with the secrets in the environment), errors or status.
    let help = std::process::Command::new(crate::helpers::BIN)
        .args(["run", "--help"])
        .env("DATABASE_URL", &url)
        .env("TRANSFER_WORKER_ADMIN_TOKEN", token)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string() + &String::from_utf8_lossy(&help.stderr);
    assert!(help.contains("--admin-token"), "{help}");
    for secret in [password, token] {
        assert!(!help.contains(secret), "{secret} in --help");
    }
    let unreachable = url.replace(&db.url[db.url.rfind('@').unwrap() + 1..db.url.rfind('/').unwrap()], "127.0.0.1:9");
    let out = tokio::process::Command::new(crate::helpers::BIN)
        .args(["status"])
        .env("DATABASE_URL", &unreachable)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(password), "{out:?}");
    let out = tokio::process::Command::new(crate::helpers::BIN)
        .args(["status"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains(password));
}

#[tokio::test]
async fn a_producers_trace_context_reaches_the_consumer_on_every_event() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let tp_cli = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tp_sql = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let tp_file = "00-11111111111111111111111111111111-2222222222222222-00";
    let out = db
        .cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--key", "cli", "--traceparent", tp_cli])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount, traceparent) VALUES ('sql', 1, 2, 5, $1)",
    )
    .bind(tp_sql)
    .execute(&db.pool)
    .await
    .unwrap();
    let line = format!("{{\"from\":1,\"to\":2,\"amount\":5,\"key\":\"file\",\"traceparent\":\"{tp_file}\"}}\n");
    assert_eq!(db.cli_with_stdin(&["enqueue", "--file", "-"], &line).await.code, 0);
    db.enqueue_sql("none", 1, 2, 5).await;
    // Bad trace contexts are refused: by the CLI (exit 2) and by the database.
    let bad = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--traceparent", "00-xyz"]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("traceparent must look like"), "{}", bad.stderr);
    let err = sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount, traceparent) VALUES ('b', 1, 2, 5, 'nope')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("transfers_traceparent_w3c"), "{err}");

    db.apply_all().await;
    let relay = transfer_worker::outbox::relay::Relay::new(
        db.pool.clone(),
        queue.publisher().await,
        transfer_worker::outbox::relay::RelayConfig::default(),
        Default::default(),
    );
    assert_eq!(relay.run_once().await.unwrap().published, 4);
    let by_key: HashMap<String, Option<String>> =
        queue.receive_traced(4).await.into_iter().map(|(key, _, tp)| (key, tp)).collect();
    assert_eq!(by_key["cli"].as_deref(), Some(tp_cli));
    assert_eq!(by_key["sql"].as_deref(), Some(tp_sql));
    assert_eq!(by_key["file"].as_deref(), Some(tp_file));
    assert_eq!(by_key["none"], None, "no attribute without a trace context");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_answers_0_for_a_ready_worker_and_1_otherwise() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let probe = |path: &'static str| {
        let addr = format!("0.0.0.0:{port}");
        async move {
            tokio::process::Command::new(crate::helpers::BIN)
                .args(["probe", "--path", path])
                .env("TRANSFER_WORKER_ADMIN_ADDR", &addr)
                .output()
                .await
                .unwrap()
        }
    };
    let down = probe("/readyz").await;
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", &addr]));
    wait_for("the admin server", Duration::from_secs(20), || async { http(&addr, "GET", "/livez").await.is_some() })
        .await;
    let up = probe("/readyz").await;
    assert_eq!(up.status.code(), Some(0), "{up:?}");
    assert!(String::from_utf8_lossy(&up.stdout).contains("database: ok"));
    assert_eq!(probe("/nope").await.status.code(), Some(1));
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

/// A late retry of a transfer that was applied and then pruned: the same key
/// and parameters get the original answer (never a second payment), other
/// parameters and a plain SQL INSERT are refused, `transfer show` says what
/// happened; the key is forgotten only after its own window.
#[tokio::test]
async fn a_retry_after_its_transfer_was_pruned_gets_the_original_answer_never_a_second_payment() {
    use transfer_worker::account::AccountId;
    use transfer_worker::transfer::enqueue::{enqueue, NewTransfer};
    use transfer_worker::transfer::{Amount, IdempotencyKey, TransferStatus};

    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let args = ["enqueue", "--from", "1", "--to", "2", "--amount", "300", "--key", "order-42"];
    let first = db.cli(&args).await;
    assert_eq!(first.code, 0, "{first:?}");
    let id = first.json()["transfer_id"].as_i64().unwrap();
    db.apply_all().await;
    sqlx::query("UPDATE outbox SET state = 'published', published_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE transfers SET applied_at = now() - interval '1 hour'").execute(&db.pool).await.unwrap();
    let out = db.cli(&["prune", "--published-older-than", "1s", "--transfers-older-than", "1s"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["transfers"], 1);
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0);

    let retry = db.cli(&args).await;
    assert_eq!(retry.code, 0, "{retry:?}");
    assert_eq!(retry.json(), serde_json::json!({"transfer_id": id, "status": "SUCCEEDED", "created": false}));
    let t = NewTransfer::new(
        AccountId(1),
        AccountId(2),
        Amount::new(300).unwrap(),
        Some(IdempotencyKey::new("order-42").unwrap()),
    )
    .unwrap();
    let again = enqueue(&db.pool, &t).await.unwrap();
    assert_eq!((again.transfer_id.0, again.status, again.created), (id, TransferStatus::Succeeded, false));
    let bulk =
        db.cli_with_stdin(&["enqueue", "--file", "-"], r#"{"from":1,"to":2,"amount":300,"key":"order-42"}"#).await;
    assert_eq!((bulk.code, bulk.json()["created"].as_bool()), (0, Some(false)), "{bulk:?}");

    let other = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "301", "--key", "order-42"]).await;
    assert_eq!(other.code, 3, "{other:?}");
    assert!(other.stderr.contains(&format!("transfer {id} (since pruned)")), "{}", other.stderr);
    let sql = sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ('order-42', 1, 2, 300)",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    let sql = sql.as_database_error().expect("a database error");
    assert_eq!((sql.code().as_deref(), sql.constraint()), (Some("23505"), Some("transfers_idempotency_key_retired")));
    let show = db.cli(&["transfer", "show", "--key", "order-42"]).await;
    assert_eq!(show.code, 2, "{show:?}");
    assert!(show.stderr.contains(&format!("transfer {id}, SUCCEEDED, was pruned")), "{}", show.stderr);

    db.apply_all().await;
    assert_eq!(db.scalar("SELECT balance FROM accounts WHERE id = 1").await, 700, "paid once");
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0);

    // The keys' window is never shorter than the transfers'.
    let out = db.cli(&["prune", "--transfers-older-than", "1d", "--keys-older-than", "1h"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("at least as long as the transfers"), "{}", out.stderr);
    let out = db.cli(&["run", "--prune-transfers-older-than", "7d", "--prune-keys-older-than", "1d"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    // After its window the key is forgotten (and may be used again).
    sqlx::query("UPDATE retired_keys SET created_at = now() - interval '2 hours'").execute(&db.pool).await.unwrap();
    let out = db.cli(&["prune", "--keys-older-than", "1h"]).await;
    assert_eq!((out.code, out.json()["retired_keys"].as_i64()), (0, Some(1)), "{out:?}");
    assert_eq!(db.cli(&args).await.json()["created"], true);
}

/// `TRUNCATE` bypasses row triggers; the counts behind `status`, `/metrics`
/// and the console follow it anyway.
#[tokio::test]
async fn counts_follow_a_truncate_of_the_outbox_or_the_transfers() {
    let db = TestDb::new().await;
    crate::fixtures::seed_random(&db.pool, 10, 1_000, 200, 100, 5).await.unwrap();
    db.apply_all().await;
    transfer_worker::status::compact_counts(&db.pool).await.unwrap();
    let before = db.cli(&["status", "--json"]).await.json();
    assert_eq!(before["outbox"]["pending"], 200);
    sqlx::query("TRUNCATE outbox").execute(&db.pool).await.unwrap();
    let after = db.cli(&["status", "--json"]).await.json();
    assert_eq!(after["outbox"], serde_json::json!({"pending": 0, "published": 0, "dead": 0, "held": 0}));
    assert_eq!(after["transfers"], before["transfers"], "the other table's counts stay");
    sqlx::query("TRUNCATE transfers").execute(&db.pool).await.unwrap();
    db.enqueue_sql("fresh", 1, 2, 1).await;
    transfer_worker::status::compact_counts(&db.pool).await.unwrap();
    let status = db.cli(&["status", "--json"]).await.json();
    let counted: i64 = status["transfers"].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!((counted, status["transfers"]["PENDING"].as_i64()), (1, Some(1)), "{status}");
}

/// A SQL producer's `traceparent` is held to exactly what the CLI accepts.
#[tokio::test]
async fn a_sql_producers_traceparent_is_refused_where_w3c_forbids_it() {
    let db = TestDb::new().await;
    db.open_account(1, 100).await;
    db.open_account(2, 0).await;
    let insert = |key: &'static str, tp: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query("INSERT INTO transfers (idempotency_key, from_account, to_account, amount, traceparent) VALUES ($1, 1, 2, 1, $2)")
                .bind(key)
                .bind(tp)
                .execute(&pool)
                .await
        }
    };
    for (key, bad) in [
        ("ff", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("zero-trace", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ("zero-span", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
        ("upper", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
    ] {
        let err = insert(key, bad).await.unwrap_err();
        assert_eq!(err.as_database_error().and_then(|e| e.constraint()), Some("transfers_traceparent_w3c"), "{bad}");
        let cli = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "1", "--traceparent", bad]).await;
        assert_eq!(cli.code, 2, "the CLI refuses it too: {cli:?}");
    }
    insert("ok", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").await.unwrap();
}

/// An event whose id was taken by a transaction still open when a prune
/// walked past it, and that commits (and is published) later, is pruned by a
/// later run of the same worker, not only after a restart.
#[tokio::test]
async fn events_that_commit_after_a_prune_walked_past_them_are_pruned_later() {
    use transfer_worker::retention::{prune, Cursors, PruneConfig, FULL_WALK_EVERY};
    let db = TestDb::new().await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    // A transaction takes an outbox id and stays open ...
    let mut open = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (transfer_id, event_type, data) VALUES (999999, 'transfer.cancelled', '{}')")
        .execute(&mut *open)
        .await
        .unwrap();
    // ... while later events commit, are published and pruned.
    for i in 0..5 {
        db.enqueue_sql(&format!("t-{i}"), 1, 2, 1).await;
    }
    db.apply_all().await;
    let old = "UPDATE outbox SET state = 'published', published_at = now() - interval '1 hour'";
    sqlx::query(old).execute(&db.pool).await.unwrap();
    let config = PruneConfig { published_older_than: Some(Duration::from_secs(1)), ..PruneConfig::default() };
    let mut cursors = Cursors::default();
    assert_eq!(prune(&db.pool, config, &mut cursors).await.unwrap().published_events, 5);
    assert!(cursors.events > 0, "the walk moved its cursor past the open transaction's id");
    open.commit().await.unwrap();
    sqlx::query(old).execute(&db.pool).await.unwrap();
    assert_eq!(prune(&db.pool, config, &mut cursors).await.unwrap().published_events, 0, "below the cursor");
    // At most FULL_WALK_EVERY later, a run walks from the start.
    cursors.last_full_walk = std::time::Instant::now().checked_sub(FULL_WALK_EVERY);
    assert_eq!(prune(&db.pool, config, &mut cursors).await.unwrap().published_events, 1);
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 0);
}

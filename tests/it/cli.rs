//! The command line's contract: output shapes, exit codes, and bad input
//! answered with exit 2, a message that says what was wrong, and nothing written.

use crate::helpers::{TestDb, BIN};

#[tokio::test]
async fn account_open_and_show_print_the_account() {
    let db = TestDb::new().await;
    let out = db.cli(&["account", "open", "7", "--balance", "250", "--daily-limit", "100"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), serde_json::json!({"id": 7, "balance": 250, "daily_limit": 100}));
    let out = db.cli(&["account", "show", "7"]).await;
    assert_eq!(out.json()["balance"], 250);
}

#[tokio::test]
async fn account_commands_reject_bad_input_and_write_nothing() {
    let db = TestDb::new().await;
    db.open_account(1, 10).await;
    let cases: [(&[&str], i32, &str); 7] = [
        (&["account", "open", "2", "--balance", "-5"], 2, "balance must be >= 0"),
        (&["account", "open", "x", "--balance", "5"], 2, "account id must be an integer"),
        (&["account", "open", "2"], 2, "--balance"),
        (&["account", "open", "2", "--balance", "5", "--daily-limit", "0"], 2, "daily limit must be > 0"),
        (&["account", "open", "1", "--balance", "5"], 3, "account 1 already exists"),
        (&["account", "show", "9"], 2, "account 9 does not exist"),
        (&["account", "show", "nine"], 2, "account id must be an integer"),
    ];
    for (args, code, needle) in cases {
        let out = db.cli(args).await;
        assert_eq!(out.code, code, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    assert_eq!(db.scalar("SELECT count(*) FROM accounts").await, 1);
    assert_eq!(db.scalar("SELECT balance FROM accounts").await, 10);
}

#[tokio::test]
async fn enqueue_prints_the_contract_object_and_rejects_bad_input_writing_nothing() {
    let db = TestDb::new().await;
    db.open_account(1, 10).await;
    db.open_account(2, 0).await;
    let long_key = "k".repeat(2049);
    let cases: [(&[&str], &str); 9] = [
        (&["enqueue", "--from", "1", "--to", "3", "--amount", "5"], "account 3 does not exist"),
        (&["enqueue", "--from", "3", "--to", "1", "--amount", "5"], "account 3 does not exist"),
        (&["enqueue", "--from", "1", "--to", "1", "--amount", "5"], "different accounts"),
        (&["enqueue", "--from", "1", "--to", "2", "--amount", "0"], "amount must be > 0"),
        (&["enqueue", "--from", "1", "--to", "2", "--amount", "-3"], "amount must be > 0"),
        (&["enqueue", "--from", "1", "--to", "2", "--amount", "1.5"], "whole number"),
        (&["enqueue", "--from", "1", "--amount", "5"], "--to"),
        (&["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--key", &long_key], "at most 2048 bytes"),
        (&["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--file", "x"], "cannot be used with"),
    ];
    for (args, needle) in cases {
        let out = db.cli(args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    assert_eq!(db.scalar("SELECT count(*) FROM transfers").await, 0);

    let longest = "k".repeat(2048);
    let out = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--key", &longest]).await;
    assert_eq!(out.code, 0, "a 2 KiB key is fine: {out:?}");
    let out = db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--key", "k-1"]).await;
    assert_eq!(out.code, 0);
    let v = out.json();
    assert!(v["transfer_id"].is_i64());
    assert_eq!(v["status"], "PENDING");
    assert_eq!(v["created"], true);
    assert_eq!(v.as_object().unwrap().len(), 3);
}

#[tokio::test]
async fn status_json_has_every_state_of_the_contract() {
    let db = TestDb::new().await;
    let v = db.cli(&["status", "--json"]).await.json();
    for s in ["PENDING", "SUCCEEDED", "FAILED", "CANCELLED"] {
        assert_eq!(v["transfers"][s], 0, "{s}");
    }
    for s in ["REQUESTED", "COMPLETED", "FAILED"] {
        assert_eq!(v["refunds"][s], 0, "{s}");
    }
    for s in ["pending", "published", "dead", "held"] {
        assert_eq!(v["outbox"][s], 0, "{s}");
    }
    assert_eq!(v["oldest_unpublished_age_s"], 0.0);
    let human = db.cli(&["status"]).await;
    assert_eq!(human.code, 0);
    assert!(human.stdout.contains("PENDING 0"), "{}", human.stdout);
}

#[tokio::test]
async fn missing_configuration_is_bad_input_and_an_unreachable_database_is_a_failure() {
    let run = |args: &[&str], db_url: Option<&str>| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args).env_remove("DATABASE_URL").env_remove("SQS_QUEUE_URL");
        if let Some(url) = db_url {
            cmd.env("DATABASE_URL", url);
        }
        let out = cmd.output().unwrap();
        (out.status.code().unwrap(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["status"], None);
    assert_eq!(code, 2);
    assert!(err.contains("DATABASE_URL"), "{err}");
    let db = TestDb::new().await;
    let (code, err) = run(&["run"], Some(&db.url));
    assert_eq!(code, 2);
    assert!(err.contains("SQS_QUEUE_URL"), "{err}");
    let (code, _) = run(&["status"], Some("postgres://postgres@127.0.0.1:1/nothing"));
    assert_eq!(code, 1);
    let (code, err) = run(&["no-such-command"], None);
    assert_eq!(code, 2, "{err}");
    // A guessable admin token is refused before anything starts.
    let q = ["--queue-url", "http://127.0.0.1:1/queue/q"];
    let (code, err) = run(&[&["run", "--admin-token", "change-me"][..], &q].concat(), Some(&db.url));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--admin-token") && err.contains("at least 16 characters"), "{err}");
    assert!(!err.contains("change-me"), "the token is never echoed: {err}");
    let (code, err) = run(&[&["run", "--admin-allowed-hosts", "http://x"][..], &q].concat(), Some(&db.url));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--admin-allowed-hosts"), "{err}");
}

#[tokio::test]
async fn migrate_is_safe_to_run_twice_and_concurrently() {
    let db = TestDb::unmigrated().await;
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(BIN)
                .arg("migrate")
                .env("DATABASE_URL", &db.url)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(db.cli(&["migrate"]).await.code, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM accounts").await, 0);
}

#[tokio::test]
async fn run_refuses_a_database_without_the_schema_and_says_to_migrate() {
    let db = TestDb::unmigrated().await;
    let started = std::time::Instant::now();
    let out = db.cli(&["run", "--queue-url", "http://127.0.0.1:9/queue/q", "--admin-addr", "127.0.0.1:0"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("run `transfer-worker migrate`"), "{}", out.stderr);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "it does not retry forever");

    // A database migrated by an older version: the missing migration is named.
    transfer_worker::db::migrate(&db.pool).await.unwrap();
    let last = transfer_worker::db::MIGRATOR.iter().map(|m| m.version).max().unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1").bind(last).execute(&db.pool).await.unwrap();
    let out = db.cli(&["run", "--queue-url", "http://127.0.0.1:9/queue/q", "--admin-addr", "127.0.0.1:0"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&format!("migration {last}")), "{}", out.stderr);
    assert!(out.stderr.contains("transfer-worker migrate"), "{}", out.stderr);
}

#[tokio::test]
async fn an_unreachable_database_is_reported_with_its_address_and_cause_at_once() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://postgres:s3cret-pw@127.0.0.1:{port}/nowhere");
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(BIN).args(["status"]).env("DATABASE_URL", &url).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}/nowhere")), "names the server: {stderr}");
    assert!(stderr.to_lowercase().contains("refused"), "names the cause: {stderr}");
    assert!(!stderr.contains("s3cret-pw"), "never the password: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "at once, not after a pool timeout");
}

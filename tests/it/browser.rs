//! The dead-event console in a real browser: headless Chromium (Debian's
//! package) opens the page of a running worker that has a dead event, takes
//! a screenshot, clicks "Requeue", and the event is then published.
//! (`scripts/test.sh` installs Chromium and the driver, playwright-core,
//! pinned in tests/browser/package-lock.json.)

use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;

use crate::admin::{free_port, http};
use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_requeues_a_dead_event_from_the_console_in_a_browser() {
    let browser_dir = format!("{}/tests/browser", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{browser_dir}/node_modules/playwright-core")).exists(),
        "run the tests with scripts/test.sh, which installs the browser driver"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(std::path::Path::new(&chromium).exists(), "{chromium} missing: scripts/test.sh installs Debian's chromium");

    let db = TestDb::new().await;
    // A queue that refuses messages over 1 KiB, and a transfer whose key makes
    // its event larger: SQS rejects it, the worker marks it dead.
    let queue = TestQueue::with_attributes(false, &[(QueueAttributeName::MaximumMessageSize, "1024")]).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let key = "k".repeat(1_100);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ($1, 1, 2, 10) RETURNING id",
    )
    .bind(&key)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let args = ["--admin-addr", &addr, "--relay-max-attempts", "1"];
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &args));
    wait_for("the event to die", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'dead'").await == 1
    })
    .await;
    // A refund after it: its two events (requested, completed) are held
    // back behind the dead event.
    assert_eq!(db.cli(&["refund", &id.to_string()]).await.code, 0);
    wait_for("the refund's events to be held", Duration::from_secs(30), || async {
        db.cli(&["status", "--json"]).await.json()["outbox"]["held"] == 2
    })
    .await;
    // The operator fixes the cause first.
    queue.set_max_message_size(1_048_576).await;

    let screenshot = format!("{}/target/console.png", env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::remove_file(&screenshot);
    let out = tokio::process::Command::new("node")
        .arg(format!("{browser_dir}/console.mjs"))
        .arg(format!("http://{addr}/"))
        .arg(&screenshot)
        .env("CHROMIUM", &chromium)
        .output()
        .await
        .expect("node (Node.js) runs the browser driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["heading"], "transfer-worker");
    assert_eq!(seen["dead"], 1, "one dead event listed: {seen}");
    assert_eq!(seen["held"], "2", "holding back the refund's events: {seen}");
    assert_eq!(seen["flash"], "Requeued 1 event(s).", "{seen}");
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());

    wait_for("the requeued and the held event to be published", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state <> 'published'").await == 0
    })
    .await;
    let (_, metrics) = http(&addr, "GET", "/metrics").await.unwrap();
    assert!(metrics.contains("transfer_worker_events_requeued_total 1"), "{metrics}");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_console_acts_only_with_the_token_and_says_so() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    let port = free_port();
    let mut w = KillOnDrop(
        db.spawn_worker(&queue.url, &["--admin-addr", &format!("0.0.0.0:{port}"), "--admin-token", "let-me-in"]),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_for("the admin server", Duration::from_secs(20), || async { http(&addr, "GET", "/livez").await.is_some() })
        .await;
    let (code, page) = http(&addr, "GET", "/").await.unwrap();
    assert_eq!(code, 200, "read-only views stay open");
    assert!(page.contains("requeueing needs the admin token"), "{page}");
    assert!(!page.contains("let-me-in"), "the token never shows");
    let (code, body) = http(&addr, "POST", "/requeue-all").await.unwrap();
    assert_eq!(code, 403, "{body}");
    // With the token (as a bearer header): allowed.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"POST /requeue-all HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer let-me-in\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    assert!(answer.contains("location: /?requeued=0"), "{answer}");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

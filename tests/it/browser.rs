//! The console in a real browser: headless Chromium (Debian's package)
//! opens the page of a running worker that has a dead event, takes a
//! screenshot, clicks "Requeue", and the event is then published; an
//! operator pauses apply with a reason, looks a transfer up and replays it,
//! and resumes.
//! (`scripts/test.sh` installs Chromium and the driver, playwright-core,
//! pinned in tests/browser/package-lock.json.)

use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;

use crate::admin::{free_port, http};
use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

/// The browser drivers' folder and Chromium, checked to be there.
fn browser() -> (String, String) {
    let browser_dir = format!("{}/tests/browser", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{browser_dir}/node_modules/playwright-core")).exists(),
        "run the tests with scripts/test.sh, which installs the browser driver"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(std::path::Path::new(&chromium).exists(), "{chromium} missing: scripts/test.sh installs Debian's chromium");
    (browser_dir, chromium)
}

/// Runs one step of `incident.mjs`; what the page showed.
async fn incident_step(addr: &str, step: &str, arg: &str) -> serde_json::Value {
    let (dir, chromium) = browser();
    let screenshot = format!("{}/target/console-{step}.png", env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::remove_file(&screenshot);
    let out = tokio::process::Command::new("node")
        .args([&format!("{dir}/incident.mjs"), &format!("http://{addr}/"), step, arg, &screenshot])
        .env("CHROMIUM", &chromium)
        .output()
        .await
        .expect("node (Node.js) runs the browser driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{step}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
    serde_json::from_str(stdout.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pauses_looks_up_replays_and_resumes_from_the_console_in_a_browser() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", &addr]));
    db.enqueue_sql("order-1", 1, 2, 10).await;
    assert_eq!(queue.receive(1, Duration::from_millis(200)).await.len(), 1);

    let seen = incident_step(&addr, "pause", "incident 9 (bob)").await;
    assert!(seen["banner_before"].is_null(), "no banner before: {seen}");
    assert_eq!(seen["charts"], 2, "the rates and the backlog: {seen}");
    assert_eq!(seen["flash"], "apply paused.", "{seen}");
    let banner = seen["banner"].as_str().unwrap_or_default();
    assert!(banner.starts_with("Paused: apply on every replica, since 20"), "{seen}");
    assert_eq!(seen["reason"], "incident 9 (bob)", "{seen}");
    assert_eq!(seen["resume_button"], "Resume apply");
    let state = db.cli(&["status", "--json"]).await.json()["paused"].clone();
    assert_eq!((state["apply"].as_bool(), state["relay"].as_bool()), (Some(true), Some(false)), "{state}");
    assert_eq!(state["reason"], "incident 9 (bob)");
    // The pause holds: a new transfer waits.
    db.enqueue_sql("order-2", 1, 2, 10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await, 1);

    let seen = incident_step(&addr, "transfer", "order-1").await;
    assert_eq!(seen["heading"], "Transfer 1", "{seen}");
    assert_eq!(seen["status"], "SUCCEEDED", "{seen}");
    assert_eq!((seen["events"].as_i64(), seen["publications"].as_i64()), (Some(1), Some(1)), "{seen}");
    assert!(seen["url"].as_str().unwrap().ends_with("/transfer?q=order-1"), "{seen}");
    assert!(seen["flash"].as_str().unwrap_or_default().starts_with("Queued 1 event(s) for replay"), "{seen}");
    let again = queue.receive(1, Duration::from_millis(200)).await;
    assert_eq!(again.len(), 1, "the replay went out (the relay is not paused)");
    wait_for("the replay recorded", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE cardinality(publications) = 2").await == 1
    })
    .await;

    let seen = incident_step(&addr, "resume", "-").await;
    assert_eq!(seen["flash"], "apply resumed.", "{seen}");
    assert!(seen["banner"].is_null(), "{seen}");
    wait_for("the waiting transfer applied", Duration::from_secs(10), || async {
        db.scalar("SELECT count(*) FROM transfers WHERE status = 'PENDING'").await == 0
    })
    .await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_requeues_a_dead_event_from_the_console_in_a_browser() {
    let (browser_dir, chromium) = browser();

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
    let token = "let-me-in-0123456789";
    let mut w =
        KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", &format!("0.0.0.0:{port}"), "--admin-token", token]));
    let addr = format!("127.0.0.1:{port}");
    wait_for("the admin server", Duration::from_secs(20), || async { http(&addr, "GET", "/livez").await.is_some() })
        .await;
    let (code, page) = http(&addr, "GET", "/").await.unwrap();
    assert_eq!(code, 200, "read-only views stay open");
    assert!(page.contains("Requeueing needs the admin token"), "{page}");
    assert!(!page.contains(token), "the token never shows");
    let (code, body) = http(&addr, "POST", "/requeue-all").await.unwrap();
    assert_eq!(code, 403, "{body}");
    // With the token (as a bearer header): allowed.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        format!(
            "POST /requeue-all HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
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

/// One raw HTTP/1.1 exchange: (status, head, body).
async fn exchange(addr: &str, request: String) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), head.to_owned(), body.to_owned())
}

fn post(addr: &str, host: &str, path: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra_headers}Content-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .replace("{addr}", addr)
}

/// A worker on the default loopback address with one dead event whose last
/// error is markup.
async fn worker_with_a_dead_event(db: &TestDb, queue: &TestQueue, addr: &str) -> KillOnDrop {
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    db.enqueue_sql(&"k".repeat(1_100), 1, 2, 10).await;
    let w = KillOnDrop(db.spawn_worker(&queue.url, &["--admin-addr", addr, "--relay-max-attempts", "1"]));
    wait_for("the event to die", Duration::from_secs(30), || async {
        db.scalar("SELECT count(*) FROM outbox WHERE state = 'dead'").await == 1
    })
    .await;
    sqlx::query("UPDATE outbox SET last_error = '<script>alert(\"owned\")</script>' WHERE state = 'dead'")
        .execute(&db.pool)
        .await
        .unwrap();
    w
}

/// What the issue reproduced with curl, refused: a cross-site POST, a POST
/// without the page's token, a page asked for under another host name (DNS
/// rebinding); and text from the database rendered escaped. The console's own
/// page, with its cookie and token, still acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_acts_only_for_its_own_pages_and_hosts() {
    let db = TestDb::new().await;
    let queue = TestQueue::with_attributes(false, &[(QueueAttributeName::MaximumMessageSize, "1024")]).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = worker_with_a_dead_event(&db, &queue, &addr).await;
    let still_dead = || async { db.scalar("SELECT count(*) FROM outbox WHERE state = 'dead'").await == 1 };

    let (code, _, body) = exchange(
        &addr,
        post(&addr, &addr, "/requeue-all", "Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\n", ""),
    )
    .await;
    assert_eq!(code, 403, "a cross-site form post: {body}");
    let (code, _, body) = exchange(&addr, post(&addr, &addr, "/requeue-all", "", "")).await;
    assert_eq!(code, 403, "no CSRF token: {body}");
    let (code, _, body) = exchange(&addr, post(&addr, "evil.example", "/requeue-all", "", "")).await;
    assert_eq!(code, 403, "a rebound host name: {body}");
    let get = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (code, _, body) = exchange(&addr, get("evil.example:80")).await;
    assert_eq!(code, 403, "the page under a foreign Host: {body}");
    assert!(!body.contains("dead"), "nothing of the console is shown: {body}");
    assert!(still_dead().await, "nothing was requeued");

    let (code, head, page) = exchange(&addr, get(&addr)).await;
    assert_eq!(code, 200);
    assert!(page.contains("&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;"), "escaped: {page}");
    assert!(!page.contains("<script>"), "{page}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(head.contains("SameSite=Strict") && head.contains("HttpOnly"), "{head}");
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    // Another session's token is not this one's.
    let other = "Cookie: transfer_worker_session=ffffffffffffffffffffffffffffffff\r\n";
    let (code, _, _) = exchange(&addr, post(&addr, &addr, "/requeue-all", other, &format!("csrf={csrf}"))).await;
    assert_eq!(code, 403);
    assert!(still_dead().await);
    let mine = format!("Cookie: {cookie}\r\nOrigin: http://{addr}\r\nSec-Fetch-Site: same-origin\r\n");
    let (code, head, _) = exchange(&addr, post(&addr, &addr, "/requeue-all", &mine, &format!("csrf={csrf}"))).await;
    assert_eq!(code, 303, "{head}");
    assert!(head.contains("location: /?requeued=1"), "{head}");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

/// The same, the way it happens: the operator has the console open in a
/// real browser (headless Chromium), then opens a page of another origin
/// that posts a form to the console. The browser sends the console's own
/// cookie along (same site), yet nothing is requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_in_the_operators_browser_cannot_drive_the_console() {
    let db = TestDb::new().await;
    let queue = TestQueue::with_attributes(false, &[(QueueAttributeName::MaximumMessageSize, "1024")]).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut w = worker_with_a_dead_event(&db, &queue, &addr).await;
    // The other origin: a page on another port that posts to the console.
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_url = format!("http://{}/", evil.local_addr().unwrap());
    let form = format!(
        "<!doctype html><html><body><form id=f method=post action=\"http://{addr}/requeue-all\">\
         <input name=csrf value=guess></form><script>document.getElementById('f').submit()</script></body></html>"
    );
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = evil.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
                form.len()
            );
            let _ = s.write_all(response.as_bytes()).await;
        }
    });
    let browser_dir = format!("{}/tests/browser", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("node")
        .arg(format!("{browser_dir}/cross_site.mjs"))
        .arg(format!("http://{addr}/"))
        .arg(&evil_url)
        .env("CHROMIUM", std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()))
        .output()
        .await
        .expect("node runs the browser driver");
    server.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["had_cookie"], true, "the browser holds the console's session: {seen}");
    assert_eq!(seen["status"], 403, "the forged post is refused: {seen}");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox WHERE state = 'dead'").await, 1, "nothing requeued");
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
}

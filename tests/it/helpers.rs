//! The test harness: every test gets its own freshly migrated database and,
//! when it needs SQS, its own randomly named queue on the LocalStack that
//! `scripts/test.sh` started. Waits poll an observable condition with a
//! deadline; nothing sleeps blindly.

use std::collections::HashMap;
use std::future::Future;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use rand::Rng;
use sqlx::PgPool;
use tokio::time::Instant;

use transfer_worker::outbox::publisher::Publisher;
use transfer_worker::outbox::relay::{Relay, RelayConfig};
use transfer_worker::outbox::sqs::SqsConfig;
use transfer_worker::service::Service;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};

use crate::fixtures::{self, ScratchDb};
use transfer_worker::outbox::{EventBody, EventType};
use transfer_worker::transfer::{RefundStatus, TransferStatus};

pub const BIN: &str = env!("CARGO_BIN_EXE_transfer-worker");

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests with scripts/test.sh"))
}

/// The log filter of the worker processes a test starts, and of its own
/// in-process services: warnings only, or everything at info with
/// `TEST_LOG=1`, or at the filter `TEST_LOG` holds (`TEST_LOG=debug,sqlx=warn`;
/// run with `--nocapture` to see it all).
pub fn log_filter() -> &'static str {
    static FILTER: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    FILTER.get_or_init(|| {
        match std::env::var("TEST_LOG").ok().filter(|v| !v.is_empty()) {
            Some(v) => {
                // `1`, or a filter of its own (`debug,sqlx=warn`).
                let filter: &'static str = if v == "1" { "info,sqlx=warn" } else { Box::leak(v.into_boxed_str()) };
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                    .with_test_writer()
                    .try_init();
                filter
            }
            None => "warn",
        }
    })
}

fn random_suffix() -> String {
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// A database of its own, created from `DATABASE_URL`'s server and migrated,
/// dropped when the test ends (however it ends), with the helpers a test
/// needs on it.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    _scratch: ScratchDb,
}

impl TestDb {
    pub async fn new() -> TestDb {
        log_filter();
        let db = Self::unmigrated().await;
        transfer_worker::db::migrate(&db.pool).await.expect("migrate");
        db
    }

    /// An empty database, not migrated.
    pub async fn unmigrated() -> TestDb {
        let scratch = ScratchDb::create(&env("DATABASE_URL"), "tw_test", 20).await.expect("create test database");
        TestDb { pool: scratch.pool.clone(), url: scratch.url.clone(), _scratch: scratch }
    }

    /// Opens accounts `1..=accounts` with `balance` each and enqueues `n`
    /// random transfers between them by SQL (some larger than a balance can
    /// cover). Returns each account's opening balance.
    pub async fn seed(&self, accounts: i64, balance: i64, n: usize, seed: u64) -> HashMap<i64, i64> {
        fixtures::seed_random(&self.pool, accounts, balance, n, balance / 2, seed).await.unwrap();
        (1..=accounts).map(|id| (id, balance)).collect()
    }

    /// Transfer `i` of a stream among accounts 1-4 (opened by the caller):
    /// one plain SQL INSERT of 1, keyed `<prefix>-<i>`.
    pub async fn enqueue_among_four(&self, prefix: &str, i: i64) -> i64 {
        self.enqueue_sql(&format!("{prefix}-{i}"), 1 + i % 4, 1 + (i + 1) % 4, 1).await
    }

    /// [`TestDb::enqueue_among_four`] for each of `ids`, 5 ms apart: a
    /// producer inserting one transfer per statement at about 200 a second.
    pub async fn enqueue_steadily(&self, prefix: &str, ids: std::ops::Range<i64>) {
        for i in ids {
            self.enqueue_among_four(prefix, i).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Enqueues one transfer by plain SQL, as any producer may; its id.
    pub async fn enqueue_sql(&self, key: &str, from: i64, to: i64, amount: i64) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO transfers (idempotency_key, from_account, to_account, amount) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(key)
        .bind(from)
        .bind(to)
        .bind(amount)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Applies every waiting transfer and refund (the worker's apply, in-process).
    pub async fn apply_all(&self) {
        let applier = Applier::new(self.pool.clone(), ApplyConfig::default());
        applier.drain().await.unwrap();
    }

    /// Publishes every pending event with `publisher` (the relay, in-process).
    pub async fn relay_all(&self, publisher: Publisher) {
        let relay = Relay::new(self.pool.clone(), publisher, RelayConfig::default(), Default::default());
        relay.drain().await.unwrap();
    }

    /// Runs the binary with this database and the test environment; waits.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_with_stdin(args, "").await
    }

    /// (Async, so the test's runtime keeps serving its pool while the CLI runs.)
    pub async fn cli_with_stdin(&self, args: &[&str], stdin: &str) -> CliOutput {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(BIN)
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("RUST_LOG", log_filter())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn transfer-worker");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).await.unwrap();
        drop(input);
        CliOutput::from(child.wait_with_output().await.expect("wait for transfer-worker"))
    }

    /// `transfer-worker run` on this database, ready to adjust and spawn.
    pub fn worker_command(&self, queue_url: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("run");
        if !extra.contains(&"--poll-interval-ms") {
            cmd.args(["--poll-interval-ms", "100"]);
        }
        cmd.args(["--backoff-max-ms", "1000"])
            .env("TRANSFER_WORKER_ADMIN_ADDR", "127.0.0.1:0")
            .args(extra)
            .env("DATABASE_URL", &self.url)
            .env("SQS_QUEUE_URL", queue_url)
            .env("RUST_LOG", log_filter())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Starts `transfer-worker run` as a separate process on this database.
    pub fn spawn_worker(&self, queue_url: &str, extra: &[&str]) -> Child {
        self.worker_command(queue_url, extra).spawn().expect("spawn transfer-worker run")
    }

    pub async fn open_account(&self, id: i64, balance: i64) {
        sqlx::query("INSERT INTO accounts (id, balance) VALUES ($1, $2)")
            .bind(id)
            .bind(balance)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    pub async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// A count that is 0 while its table does not exist yet (a process the
    /// test started creates it).
    pub async fn count_or_zero(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await.unwrap_or(0)
    }

    pub async fn scalar_with(&self, sql: &'static str, arg: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).bind(arg).fetch_one(&self.pool).await.unwrap()
    }

    pub async fn total_balance(&self) -> i64 {
        self.scalar("SELECT COALESCE(sum(balance), 0)::bigint FROM accounts").await
    }

    /// Every transfer and every refund is out of PENDING/REQUESTED and every event published.
    pub async fn settled(&self) -> bool {
        self.scalar(
            "SELECT (SELECT count(*) FROM transfers WHERE status = 'PENDING' OR refund_status = 'REQUESTED')
                  + (SELECT count(*) FROM outbox WHERE state <> 'published')",
        )
        .await
            == 0
    }

    /// The invariants that must hold at any committed moment: money
    /// conserved, no negative balance, each balance equal to its opening
    /// balance plus what SUCCEEDED transfers moved minus what COMPLETED refunds
    /// moved back, and each transfer's outbox events exactly the ones its
    /// state changes imply, in order.
    pub async fn assert_invariants(&self, opening_total: i64, opening: &HashMap<i64, i64>) {
        assert_eq!(self.total_balance().await, opening_total, "money is conserved");
        assert_eq!(self.scalar("SELECT count(*) FROM accounts WHERE balance < 0").await, 0);
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT a.id, a.balance
                    - COALESCE((SELECT sum(amount) FROM transfers WHERE to_account = a.id AND status = 'SUCCEEDED'), 0)::bigint
                    + COALESCE((SELECT sum(amount) FROM transfers WHERE from_account = a.id AND status = 'SUCCEEDED'), 0)::bigint
                    + COALESCE((SELECT sum(refund_amount) FROM transfers WHERE to_account = a.id AND refund_status = 'COMPLETED'), 0)::bigint
                    - COALESCE((SELECT sum(refund_amount) FROM transfers WHERE from_account = a.id AND refund_status = 'COMPLETED'), 0)::bigint
               FROM accounts a",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        for (id, implied_opening) in rows {
            assert_eq!(Some(&implied_opening), opening.get(&id), "account {id}: balance = opening + applied changes");
        }
        let actual = self.events_by_transfer().await;
        let expected = self.expected_events().await;
        for (id, want) in &expected {
            let got = actual.get(id).cloned().unwrap_or_default();
            assert_eq!(&got, want, "transfer {id}: exactly one event per applied change, in order");
        }
        assert!(actual.keys().all(|id| expected.contains_key(id)));
    }

    /// Each transfer's events (types), in the order they were written (an
    /// event sent to several destinations counts once).
    pub async fn events_by_transfer(&self) -> HashMap<i64, Vec<EventType>> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT transfer_id, event_type FROM outbox WHERE event_seq IS NULL ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let mut out: HashMap<i64, Vec<EventType>> = HashMap::new();
        for (id, t) in rows {
            out.entry(id).or_default().push(t.parse().unwrap());
        }
        out
    }

    /// The events each transfer's current state implies, in order.
    pub async fn expected_events(&self) -> HashMap<i64, Vec<EventType>> {
        let rows: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT id, status, refund_status FROM transfers").fetch_all(&self.pool).await.unwrap();
        rows.into_iter()
            .map(|(id, status, refund)| {
                let mut events = Vec::new();
                match status.parse::<TransferStatus>().unwrap() {
                    TransferStatus::Pending => {}
                    TransferStatus::Succeeded => events.push(EventType::TransferSucceeded),
                    TransferStatus::Failed => events.push(EventType::TransferFailed),
                    TransferStatus::Cancelled => events.push(EventType::TransferCancelled),
                }
                match refund.parse::<RefundStatus>().unwrap() {
                    RefundStatus::None => {}
                    RefundStatus::Requested => events.push(EventType::RefundRequested),
                    RefundStatus::Completed => events.extend([EventType::RefundRequested, EventType::RefundCompleted]),
                    RefundStatus::Failed => events.extend([EventType::RefundRequested, EventType::RefundFailed]),
                }
                (id, events)
            })
            .collect()
    }
}

/// What a CLI run printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CliOutput {
    fn from(o: Output) -> Self {
        CliOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl CliOutput {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// A queue of its own on LocalStack.
pub struct TestQueue {
    pub url: String,
    pub client: aws_sdk_sqs::Client,
}

impl TestQueue {
    pub async fn new(fifo: bool) -> TestQueue {
        Self::with_attributes(fifo, &[]).await
    }

    pub async fn with_attributes(fifo: bool, attributes: &[(QueueAttributeName, &str)]) -> TestQueue {
        let client = transfer_worker::outbox::sqs::client_from_env(Duration::from_secs(5)).await;
        let name = format!("tw-test-{}{}", random_suffix(), if fifo { ".fifo" } else { "" });
        let mut req = client.create_queue().queue_name(name);
        if fifo {
            req = req.attributes(QueueAttributeName::FifoQueue, "true");
        }
        for (k, v) in attributes {
            req = req.attributes(k.clone(), *v);
        }
        let url = req.send().await.expect("create test queue").queue_url.unwrap();
        TestQueue { url, client }
    }

    /// Lets the queue take messages of up to `bytes` (what an operator
    /// does to fix a queue that refused events as too large).
    pub async fn set_max_message_size(&self, bytes: u32) {
        self.client
            .set_queue_attributes()
            .queue_url(&self.url)
            .attributes(QueueAttributeName::MaximumMessageSize, bytes.to_string())
            .send()
            .await
            .expect("set MaximumMessageSize");
    }

    /// Messages on the queue, visible or in flight (LocalStack counts exactly).
    pub async fn messages(&self) -> i64 {
        let attrs = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("GetQueueAttributes");
        let n = |k: QueueAttributeName| {
            attrs.attributes().and_then(|m| m.get(&k)).map_or(0, |v| v.parse::<i64>().expect("a count"))
        };
        n(QueueAttributeName::ApproximateNumberOfMessages)
            + n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
    }

    pub async fn publisher(&self) -> Publisher {
        Publisher::new(self.client.clone(), &sqs_config(&self.url))
    }

    /// Receives `n` events (or what came within a minute): each one's
    /// idempotency key, event type and `traceparent` attribute.
    pub async fn receive_traced(&self, n: usize) -> Vec<(String, String, Option<String>)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < n && Instant::now() < deadline {
            let resp = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .send()
                .await
                .expect("receive");
            for m in resp.messages() {
                let body: serde_json::Value = serde_json::from_str(m.body().unwrap()).expect("event body");
                let tp = m.message_attributes().and_then(|a| a.get("traceparent")).and_then(|v| v.string_value());
                got.push((
                    body["data"]["idempotency_key"].as_str().unwrap_or_default().to_owned(),
                    body["event_type"].as_str().unwrap_or_default().to_owned(),
                    tp.map(str::to_owned),
                ));
            }
        }
        got
    }

    /// Receives (and deletes) messages until `expected` arrived or nothing
    /// more came for `quiet`; returns them in arrival order, each checked:
    /// its `event_type` attribute matches its body, and on a FIFO queue its
    /// group is the transfer id and its deduplication id the `event_id` (or
    /// a replay's `<event_id>:replay-<n>`).
    pub async fn receive(&self, expected: usize, quiet: Duration) -> Vec<EventBody> {
        self.receive_messages(expected, quiet)
            .await
            .iter()
            .map(|m| {
                let (body, _) = transfer_worker::consumer::decode(m.body().unwrap()).expect("an event body");
                let attr = m.message_attributes().and_then(|a| a.get("event_type")).and_then(|v| v.string_value());
                assert_eq!(attr, Some(body.event_type.as_str()), "event_type attribute matches the body");
                if self.url.ends_with(".fifo") {
                    let system = m.attributes().expect("system attributes");
                    let group = system.get(&MessageSystemAttributeName::MessageGroupId);
                    assert_eq!(group, Some(&body.transfer_id.to_string()), "MessageGroupId is the transfer id");
                    let dedup = system.get(&MessageSystemAttributeName::MessageDeduplicationId);
                    let dedup = dedup.expect("a MessageDeduplicationId");
                    let replay = format!("{}:replay-", body.event_id);
                    assert!(
                        dedup == &body.event_id || dedup.starts_with(&replay),
                        "MessageDeduplicationId is the event_id (or a replay's <event_id>:replay-<n>): {dedup}"
                    );
                }
                body
            })
            .collect()
    }

    /// Receives (and deletes) messages as they are, until `expected` arrived
    /// or nothing more came for `quiet`, in arrival order.
    pub async fn receive_messages(&self, expected: usize, quiet: Duration) -> Vec<aws_sdk_sqs::types::Message> {
        let mut out = Vec::new();
        let mut last = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && (out.len() < expected || last.elapsed() < quiet) {
            let resp = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(if out.len() < expected { 1 } else { 0 })
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive");
            let messages = resp.messages();
            if messages.is_empty() {
                if out.len() >= expected || last.elapsed() > quiet.max(Duration::from_secs(20)) {
                    break;
                }
                continue;
            }
            last = Instant::now();
            self.client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(transfer_worker::consumer::delete_entries(messages)))
                .send()
                .await
                .expect("delete");
            out.extend(messages.iter().cloned());
        }
        out
    }
}

/// An SNS topic of its own on LocalStack, and a queue subscribed to it with
/// raw message delivery (what reaches the queue is exactly what was published).
pub struct TestTopic {
    pub arn: String,
    /// The subscribed queue.
    pub queue: TestQueue,
}

impl TestTopic {
    pub async fn new(fifo: bool) -> TestTopic {
        let client = transfer_worker::outbox::sns::client_from_env(Duration::from_secs(5)).await;
        let name = format!("tw-topic-{}{}", random_suffix(), if fifo { ".fifo" } else { "" });
        let arn = transfer_worker::outbox::sns::create_topic(&client, &name).await.expect("create test topic");
        let queue = TestQueue::new(fifo).await;
        let queue_arn = queue
            .client
            .get_queue_attributes()
            .queue_url(&queue.url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("the queue's ARN")
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .expect("QueueArn");
        client
            .subscribe()
            .topic_arn(&arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", "true")
            .send()
            .await
            .expect("subscribe the queue");
        TestTopic { arn, queue }
    }
}

pub fn sqs_config(url: &str) -> SqsConfig {
    SqsConfig { queue_url: url.to_owned(), call_timeout: Duration::from_secs(5), concurrency: 4 }
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for a child to exit, with a deadline.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills the child when dropped, so a failing test leaves no worker behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

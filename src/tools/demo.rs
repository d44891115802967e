//! `demo`: the whole flow on the local services, printed for a newcomer.
//!
//! It works on a scratch database of its own on the same server as
//! `DATABASE_URL` (created, migrated, dropped at the end) and a queue of its
//! own: pointed at real data, it must not apply a real pending transfer, nor
//! publish its events to a queue nobody reads.
//!
//! It opens three fresh accounts, enqueues transfers (one without
//! funds, one repeated with the same idempotency key, one cancelled while
//! still pending), runs the worker in this process, then asks for a partial
//! refund, a duplicate refund and a cancel that comes too late, waits until
//! everything is applied and published to a queue of its own, sends one
//! event a second time on purpose, and consumes the queue with the consumer
//! library (each event lands once in `consumed_events`, the duplicate is
//! dropped), printing the events, balances and outcomes.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::tools::fixtures::ScratchDb;
use transfer_worker::account::{self, AccountId};
use transfer_worker::consumer::{inbox, Consumer, ConsumerConfig, Record};
use transfer_worker::error::{Error, Result};
use transfer_worker::health::Health;
use transfer_worker::outbox::publisher::Publisher;
use transfer_worker::outbox::sqs::{client_from_env, create_queue, SqsConfig, SqsFailure};
use transfer_worker::outbox::EventBody;
use transfer_worker::service::Service;
use transfer_worker::transfer::cancel::cancel;
use transfer_worker::transfer::enqueue::{enqueue, NewTransfer};
use transfer_worker::transfer::refund::request_refund;
use transfer_worker::transfer::{Amount, IdempotencyKey};
use transfer_worker::worker::{self, WorkerConfig};

/// Runs the demo on a scratch database next to `database_url`'s, giving up
/// after `timeout`.
pub async fn run(url: &str, timeout: Duration) -> Result<()> {
    let scratch = ScratchDb::create(url, "transfer_worker_demo", 12).await?;
    println!("== scratch database {} (dropped at the end; the one DATABASE_URL names is not touched)", scratch.name());
    let result = demo(&scratch.pool, timeout).await;
    scratch.drop().await?;
    result
}

async fn demo(pool: &PgPool, timeout: Duration) -> Result<()> {
    let pool = pool.clone();
    transfer_worker::db::migrate(&pool).await?;
    let deadline = Instant::now() + timeout;

    // A queue of its own, so earlier runs' messages do not mix in.
    let queue_name = format!("transfer-worker-demo-{}.fifo", std::process::id());
    // One SQS client for everything: creating the queue, the worker's
    // publisher, receiving the events back.
    let client = client_from_env(Duration::from_secs(10)).await;
    let queue_url = create_queue(&client, &queue_name).await?;
    println!("== queue {queue_url}");

    let base =
        sqlx::query_scalar!(r#"SELECT COALESCE(max(id), 0) + 1 AS "next!" FROM accounts"#).fetch_one(&pool).await?;
    let (alice, bob, carol) = (AccountId(base), AccountId(base + 1), AccountId(base + 2));
    println!("== accounts");
    for (id, name, balance) in [(alice, "alice", 1_000), (bob, "bob", 500), (carol, "carol", 0)] {
        account::open(&pool, id, balance, None).await?;
        println!("   opened {name:<5} (account {id}) with {balance}");
    }

    println!("== enqueue");
    let tag = std::process::id();
    let key = |n: u32| IdempotencyKey::new(format!("demo-{tag}-{n}")).map_err(Error::invalid);
    let requests = [
        ("alice pays bob 300", alice, bob, 300, 1),
        ("bob pays carol 200", bob, carol, 200, 2),
        ("carol pays alice 5000 (she has nowhere near that)", carol, alice, 5_000, 3),
        ("alice pays bob 300 again, same key (a retried request)", alice, bob, 300, 1),
        ("alice pays carol 50 (cancelled below, before the worker runs)", alice, carol, 50, 4),
    ];
    let mut ids = Vec::new();
    for (what, from, to, amount, n) in requests {
        let t = NewTransfer::new(from, to, Amount::new(amount).map_err(Error::invalid)?, Some(key(n)?))?;
        let e = enqueue(&pool, &t).await?;
        println!("   {what:<62} -> transfer {} {} (created: {})", e.transfer_id, e.status, e.created);
        if e.created {
            ids.push(e.transfer_id);
        }
    }
    let (first, to_cancel) = (ids[0], ids[3]);
    show("cancel the 50 while it is PENDING", cancel(&pool, to_cancel).await.map(|c| c.status.to_string()));

    println!("== worker running");
    let shutdown = CancellationToken::new();
    let publisher = Publisher::new(client.clone(), &sqs_config(queue_url.clone()));
    let config = WorkerConfig { poll_interval: Duration::from_millis(100), ..WorkerConfig::default() };
    let worker = tokio::spawn(worker::run(pool.clone(), publisher, config, Arc::new(Health::new(shutdown.clone()))));
    let raw_ids: Vec<i64> = ids.iter().map(|t| t.0).collect();
    wait_until_settled(&pool, &raw_ids, deadline).await?;

    println!("== requests after the worker applied the transfers");
    show(
        "refund 100 of alice -> bob 300",
        request_refund(&pool, first, Some(Amount::new(100).map_err(Error::invalid)?))
            .await
            .map(|r| format!("{} {}", r.refund_status, r.refund_amount)),
    );
    show(
        "refund it again (a double click)",
        request_refund(&pool, first, None).await.map(|r| r.refund_status.to_string()),
    );
    show("cancel bob -> carol 200, too late", cancel(&pool, ids[1]).await.map(|c| c.status.to_string()));
    wait_until_settled(&pool, &raw_ids, deadline).await?;
    shutdown.cancel();
    worker.await.map_err(|e| Error::Failed(format!("worker task failed: {e}")))??;
    let expected = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox WHERE transfer_id = ANY($1)"#, &raw_ids)
        .fetch_one(&pool)
        .await?;

    // A duplicate on purpose: the first event sent again, as SQS may
    // deliver it twice or a consumer may see it after a crash.
    let mut first_event = String::new();
    let duplicate = client
        .receive_message()
        .queue_url(&queue_url)
        .max_number_of_messages(1)
        .visibility_timeout(0)
        .send()
        .await
        .map_err(|e| Error::Sqs(SqsFailure::from_sdk("ReceiveMessage", &e)))?;
    if let Some(body) = duplicate.messages().first().and_then(|m| m.body()) {
        first_event = serde_json::from_str::<EventBody>(body).map(|e| e.event_id).unwrap_or_default();
        client
            .send_message()
            .queue_url(&queue_url)
            .message_body(body)
            .message_group_id(
                serde_json::from_str::<EventBody>(body).map(|e| e.transfer_id.to_string()).unwrap_or_default(),
            )
            .message_deduplication_id(format!("demo-duplicate-{}", std::process::id()))
            .send()
            .await
            .map_err(|e| Error::Sqs(SqsFailure::from_sdk("SendMessage", &e)))?;
    }

    println!("== the consumer \"demo\" lands each event once (consumed_events), then deletes it from SQS");
    inbox::ensure_table(&pool).await?;
    let mut config = ConsumerConfig::new("demo", queue_url.clone());
    config.wait = Duration::from_secs(1);
    let consumer = Consumer::new(pool.clone(), client.clone(), config, Arc::new(Record)).on_landed(Box::new(|d| {
        let e = &d.event;
        println!(
            "   {:<20} transfer {:<6} {}",
            e.event_type.as_str(),
            e.transfer_id,
            serde_json::to_string(&e.data).unwrap_or_default()
        );
    }));
    let (mut landed, mut duplicates) = (0, 0);
    while (landed < expected as usize || duplicates == 0) && Instant::now() < deadline {
        let c = consumer.run_once().await?;
        landed += c.landed;
        duplicates += c.duplicates;
    }
    consumer.finish(Instant::now() + Duration::from_secs(2)).await;
    println!("   {duplicates} duplicate dropped (event {first_event} was delivered twice; it landed once)");
    let received = landed;
    let _ = client.delete_queue().queue_url(&queue_url).send().await;

    println!("== balances");
    for (id, name) in [(alice, "alice"), (bob, "bob"), (carol, "carol")] {
        println!("   {name:<5} {}", account::show(&pool, id).await?.balance);
    }
    println!("== outcomes");
    let outcomes = sqlx::query_as!(
        OutcomeRow,
        "SELECT id, from_account, to_account, amount, status, failure_reason, refund_status, refund_amount
           FROM transfers WHERE id = ANY($1) ORDER BY id",
        &raw_ids
    )
    .fetch_all(&pool)
    .await?;
    for t in outcomes {
        let reason = t.failure_reason.map(|r| format!(" ({r})")).unwrap_or_default();
        let refund = t.refund_amount.map(|a| format!(", refund {a} {}", t.refund_status)).unwrap_or_default();
        println!(
            "   transfer {:<6} {} -> {} {:>5}: {}{reason}{refund}",
            t.id, t.from_account, t.to_account, t.amount, t.status
        );
    }
    println!(
        "== {expected} events written, {received} landed once each in consumed_events, {duplicates} duplicate dropped"
    );
    if (received as i64) < expected || duplicates == 0 {
        return Err(Error::Failed(format!(
            "expected {expected} events to land and a duplicate dropped; {received} landed"
        )));
    }
    Ok(())
}

struct OutcomeRow {
    id: i64,
    from_account: i64,
    to_account: i64,
    amount: i64,
    status: String,
    failure_reason: Option<String>,
    refund_status: String,
    refund_amount: Option<i64>,
}

/// Prints how a request went, the way the CLI would answer it.
fn show(what: &str, result: Result<String>) {
    match result {
        Ok(state) => println!("   {what:<40} -> {state}"),
        Err(e) => println!("   {what:<40} -> refused (exit {}): {e}", crate::exit::exit_code(&e) as u8),
    }
}

fn sqs_config(queue_url: String) -> SqsConfig {
    SqsConfig { queue_url, call_timeout: Duration::from_secs(10), concurrency: 4 }
}

/// Waits until none of `ids` waits for the worker and all their events are published.
async fn wait_until_settled(pool: &PgPool, ids: &[i64], deadline: Instant) -> Result<()> {
    loop {
        let waiting = sqlx::query_scalar!(
            r#"SELECT (SELECT count(*) FROM transfers WHERE id = ANY($1) AND (status = 'PENDING' OR refund_status = 'REQUESTED'))
                    + (SELECT count(*) FROM outbox WHERE transfer_id = ANY($1) AND state <> 'published') AS "n!""#,
            ids
        )
        .fetch_one(pool)
        .await?;
        if waiting == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Failed("timed out waiting for the worker to apply and publish".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

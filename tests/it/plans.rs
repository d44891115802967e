//! Plans that stay right when the statistics are stale. A table with a long
//! quiet past (finished transfers, published events, analyzed) and a burst
//! the statistics have not seen yet (a backlog of pending transfers, or of
//! events after an SQS outage) is exactly when the worker must be fast, and
//! exactly when the planner takes the partial "waiting" indexes for empty.
//! A statement that then walks such an index once per row of a batch costs
//! the whole backlog per row. These tests count the index entries a batch
//! reads (PostgreSQL's own `pg_stat_user_indexes`), not time.

use std::time::Duration;

use transfer_worker::outbox::relay::{Relay, RelayConfig};
use transfer_worker::service::Service;
use transfer_worker::transfer::apply::{Applier, ApplyConfig};

use crate::helpers::{wait_for, TestDb, TestQueue};

const PAST: i64 = 20_000;
const BURST: i64 = 5_000;

/// (scans, entries read) of one index, as last flushed by the backends.
async fn index_reads(db: &TestDb, index: &str) -> (i64, i64) {
    sqlx::query_as("SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = $1")
        .bind(index)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Waits until the backends flushed a scan of `index` beyond `before`
/// (they flush statistics about once a second when idle); the entries read since.
async fn entries_read_since(db: &TestDb, index: &str, before: (i64, i64)) -> i64 {
    wait_for("index statistics flushed", Duration::from_secs(30), || async {
        index_reads(db, index).await.0 > before.0
    })
    .await;
    index_reads(db, index).await.1 - before.1
}

/// A database whose statistics know only the quiet past: `PAST` finished
/// transfers, each with its published event, analyzed; autovacuum off so
/// they stay that way.
async fn quiet_past() -> TestDb {
    let db = TestDb::new().await;
    for sql in [
        "ALTER TABLE transfers SET (autovacuum_enabled = false)",
        "ALTER TABLE outbox SET (autovacuum_enabled = false)",
        "INSERT INTO accounts (id, balance) SELECT g, 1000000000 FROM generate_series(1, 100) g",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    sqlx::query(
        "WITH t AS (
             INSERT INTO transfers (idempotency_key, from_account, to_account, amount, status, applied_at)
             SELECT 'past-' || g, 1 + g % 100, 1 + (g + 1) % 100, 1, 'SUCCEEDED', now()
               FROM generate_series(1, $1::bigint) g
          RETURNING transfers AS row)
         INSERT INTO outbox (transfer_id, event_type, data, state, published_at)
         SELECT (t.row).id, 'transfer.succeeded', transfer_event_data(t.row, 'transfer.succeeded'), 'published', now()
           FROM t",
    )
    .bind(PAST)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE transfers, outbox").execute(&db.pool).await.unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reaches_its_rows_by_id_through_a_backlog_the_statistics_do_not_know() {
    let db = quiet_past().await;
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         SELECT 'burst-' || g, 1 + g % 100, 1 + (g * 7 + 3) % 100, 1 FROM generate_series(1, $1::bigint) g",
    )
    .bind(BURST)
    .execute(&db.pool)
    .await
    .unwrap();
    let before = index_reads(&db, "transfers_pending_idx").await;
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default());
    let counts = applier.run_once().await.unwrap();
    assert_eq!(counts.succeeded, 100, "{counts:?}");
    let read = entries_read_since(&db, "transfers_pending_idx", before).await;
    // The claim reads its 100 entries (and a few more); a finish that hashed
    // the pending index would read all 5,000.
    assert!(read < 1_000, "a batch of 100 read {read} entries of the pending index");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_walks_the_waiting_index_in_order_instead_of_sorting_a_backlog() {
    // A table last analyzed when it was small (a new deployment, a quiet
    // night), then a burst: the planner expects a handful of waiting rows.
    let db = TestDb::new().await;
    for sql in [
        "ALTER TABLE transfers SET (autovacuum_enabled = false)",
        "ALTER TABLE outbox SET (autovacuum_enabled = false)",
        "INSERT INTO accounts (id, balance) SELECT g, 1000000000 FROM generate_series(1, 100) g",
        "ANALYZE transfers, outbox",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    sqlx::query(
        "INSERT INTO transfers (idempotency_key, from_account, to_account, amount)
         SELECT 'burst-' || g, 1 + g % 100, 1 + (g * 7 + 3) % 100, 1 FROM generate_series(1, $1::bigint) g",
    )
    .bind(4 * BURST)
    .execute(&db.pool)
    .await
    .unwrap();
    let before = index_reads(&db, "transfers_pending_idx").await;
    let applier = Applier::new(db.pool.clone(), ApplyConfig::default());
    assert_eq!(applier.run_once().await.unwrap().succeeded, 100);
    let read = entries_read_since(&db, "transfers_pending_idx", before).await;
    // In order from the index: about 100 entries. Fetching every waiting row
    // to sort them would read all 20,000.
    assert!(read < 1_000, "a claim of 100 read {read} entries of the pending index");

    // The relay's claim, likewise, from the index of pending events.
    let queue = TestQueue::new(false).await;
    sqlx::query(
        "INSERT INTO outbox (transfer_id, event_type, data) SELECT id, 'refund.requested', transfer_event_data(t, 'refund.requested') FROM transfers t",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before = index_reads(&db, "outbox_unrouted_idx").await;
    let relay = Relay::new(db.pool.clone(), queue.publisher().await, RelayConfig::default(), Default::default());
    assert_eq!(relay.claim().await.unwrap().events.len(), 100);
    let read = entries_read_since(&db, "outbox_unrouted_idx", before).await;
    assert!(read < 1_000, "a relay claim of 100 read {read} entries of the pending events' index");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_claim_checks_earlier_events_by_transfer_not_by_walking_the_backlog() {
    let db = quiet_past().await;
    let queue = TestQueue::new(false).await;
    // An outage's backlog: a pending event for each of BURST transfers.
    sqlx::query(
        "INSERT INTO outbox (transfer_id, event_type, data)
         SELECT id, 'refund.requested', transfer_event_data(t, 'refund.requested') FROM transfers t ORDER BY id LIMIT $1",
    )
    .bind(BURST)
    .execute(&db.pool)
    .await
    .unwrap();
    let before = index_reads(&db, "outbox_unrouted_idx").await;
    let relay = Relay::new(db.pool.clone(), queue.publisher().await, RelayConfig::default(), Default::default());
    let claim = relay.claim().await.unwrap();
    assert_eq!(claim.events.len(), 100);
    let read = entries_read_since(&db, "outbox_unrouted_idx", before).await;
    // The heads' scan reads about 100 entries; checking each head's earlier
    // events through this index would read the backlog once per head (500,000).
    assert!(read < 1_000, "a claim of 100 read {read} entries of the pending index");

    // Another destination's backlog (an outage there) is never walked: the
    // rest is routed elsewhere and waits; this destination's claim reads
    // only its own index's few entries.
    sqlx::query(
        "UPDATE outbox SET destination = 'http://elsewhere/1/q' WHERE state = 'pending' AND destination IS NULL",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before = index_reads(&db, "outbox_pending_by_destination_idx").await;
    let other = Relay::new(db.pool.clone(), queue.publisher().await, RelayConfig::default(), Default::default());
    assert_eq!(other.claim().await.unwrap().events.len(), 0, "its own are claimed already");
    let read = entries_read_since(&db, "outbox_pending_by_destination_idx", before).await;
    assert!(read < 1_000, "a claim read {read} entries of another destination's backlog");

    // `status` counts what is held behind dead events the same way.
    sqlx::query("UPDATE outbox SET state = 'dead', claimed_until = NULL WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 50)")
        .execute(&db.pool)
        .await
        .unwrap();
    let before = index_reads(&db, "outbox_pending_by_destination_idx").await;
    let status = transfer_worker::status::read(&db.pool).await.unwrap();
    assert_eq!(status.outbox.dead, 50);
    // (The oldest-unpublished lookup reads each destination's head; wait for its flush.)
    let read = entries_read_since(&db, "outbox_pending_by_destination_idx", before).await;
    assert!(read < 1_000, "status read {read} entries of the pending index");
}

//! The inbox: one row per (consumer name, `event_id`) in `consumed_events`,
//! in the consumer's own database, written in the same transaction as the
//! handler's effects. A duplicate delivery finds its row and does nothing.
//!
//! The table is the consumer's, not part of the worker's schema (the
//! consumer's database may be another one), so the consumer creates it
//! itself ([`ensure_table`]) and its statements are runtime-checked.

use sqlx::{PgConnection, PgPool};

use super::handler::Delivered;
use crate::concurrency::advisory::{self, LockKey};
use crate::error::Result;

/// Creates `consumed_events` (and its pruning index) if missing. Several
/// consumers starting at once take turns (a transaction-scoped advisory
/// lock): `CREATE TABLE IF NOT EXISTS` alone can race.
pub async fn ensure_table(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    advisory::xact_lock(&mut tx, LockKey::hashed("transfer-worker", "consumed-events-ddl")).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS consumed_events (
             consumer    TEXT NOT NULL,
             event_id    UUID NOT NULL,
             event_type  TEXT NOT NULL,
             transfer_id BIGINT NOT NULL,
             occurred_at TIMESTAMPTZ NOT NULL,
             body        JSONB NOT NULL,
             received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             PRIMARY KEY (consumer, event_id)
         );
         CREATE INDEX IF NOT EXISTS consumed_events_received_idx ON consumed_events (consumer, received_at);",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records `event` for `consumer` inside the caller's transaction; true if
/// it is new (the handler runs), false if this consumer has it already (a
/// duplicate: nothing to do). A concurrent replica landing the same event
/// waits on the row until the first commits or rolls back, so exactly one
/// of them sees it as new.
pub async fn land(conn: &mut PgConnection, consumer: &str, delivered: &Delivered) -> Result<bool> {
    let event = &delivered.event;
    let landed = sqlx::query(
        "INSERT INTO consumed_events (consumer, event_id, event_type, transfer_id, occurred_at, body)
         VALUES ($1, $2::uuid, $3, $4, $5::timestamptz, $6)
         ON CONFLICT (consumer, event_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(&event.event_id)
    .bind(event.event_type.as_str())
    .bind(event.transfer_id.0)
    .bind(&event.occurred_at)
    .bind(&delivered.body)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(landed == 1)
}

/// Records every event of a batch for `consumer` in one statement (when the
/// inbox row is the whole effect), in the batch's order (`received_at` is
/// each row's own clock, so a FIFO group's order shows); returns the ids
/// that were new. Committed at once, all or nothing.
pub async fn land_all(
    pool: &PgPool,
    consumer: &str,
    batch: &[&Delivered],
) -> Result<std::collections::HashSet<String>> {
    let ids: Vec<&str> = batch.iter().map(|d| d.event.event_id.as_str()).collect();
    let types: Vec<&str> = batch.iter().map(|d| d.event.event_type.as_str()).collect();
    let transfers: Vec<i64> = batch.iter().map(|d| d.event.transfer_id.0).collect();
    let times: Vec<&str> = batch.iter().map(|d| d.event.occurred_at.as_str()).collect();
    let bodies: Vec<&serde_json::Value> = batch.iter().map(|d| &d.body).collect();
    let landed: Vec<String> = sqlx::query_scalar(
        "INSERT INTO consumed_events (consumer, event_id, event_type, transfer_id, occurred_at, body, received_at)
         SELECT $1, e.id::uuid, e.type, e.transfer, e.at::timestamptz, e.body, clock_timestamp()
           FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::jsonb[]) WITH ORDINALITY
                AS e(id, type, transfer, at, body, n)
          ORDER BY e.n
         ON CONFLICT (consumer, event_id) DO NOTHING
         RETURNING event_id::text",
    )
    .bind(consumer)
    .bind(&ids)
    .bind(&types)
    .bind(&transfers)
    .bind(&times)
    .bind(&bodies)
    .fetch_all(pool)
    .await?;
    Ok(landed.into_iter().collect())
}

/// Rows looked at per pruning statement.
const PRUNE_BATCH: i64 = 1_000;

/// Deletes `consumer`'s rows received longer ago than `older_than`, in
/// statements of 1,000 rows; how many.
pub async fn prune(pool: &PgPool, consumer: &str, older_than: std::time::Duration) -> Result<u64> {
    let mut deleted = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM consumed_events WHERE consumer = $1 AND event_id IN (
                 SELECT event_id FROM consumed_events
                  WHERE consumer = $1 AND received_at < now() - $2 * interval '1 second'
                  LIMIT $3)",
        )
        .bind(consumer)
        .bind(older_than.as_secs_f64())
        .bind(PRUNE_BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        deleted += n;
        if n < PRUNE_BATCH as u64 {
            return Ok(deleted);
        }
    }
}

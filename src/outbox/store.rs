//! The one owner of the outbox's state transitions: the relay's claim under a
//! lease and the outcomes it records (pending -> published, pending ->
//! pending with an attempt counted or dead, pending put off, a lease given
//! back), and the operator's requeue (dead -> pending). Every update is
//! guarded by the state it leaves and, for the relay's, by the lease its
//! claim set; callers check what it returns. (Pruning deletes published
//! events: see [`crate::retention`].)

use sqlx::PgConnection;

use sqlx::types::Json;

use crate::outbox::{EventState, EventType};
use crate::transfer::TransferId;

/// An event as the claim returns it.
pub(crate) struct ClaimRow {
    pub id: i64,
    pub event_id: String,
    pub transfer_id: TransferId,
    pub event_type: EventType,
    pub data: Json<serde_json::Value>,
    pub attempts: i32,
    pub transient_failures: i32,
    pub replays: i32,
    pub lease: String,
    pub occurred_epoch: f64,
    pub occurred_at: String,
    pub traceparent: Option<String>,
}

/// Which rows a destination's relay claims (see `route::Routing`).
pub(crate) struct ClaimScope<'a> {
    /// Its `outbox.destination`.
    pub destination: &'a str,
    /// The event types its route takes (of the unrouted events).
    pub types: &'a [String],
    /// The other destinations each of those types goes to: an unrouted
    /// event this claim routes gets a copy for each (pairs, as two arrays).
    pub copy_types: &'a [String],
    pub copy_destinations: &'a [String],
}

/// Claims up to `limit` of a destination's events under a lease of
/// `lease_ms`: the earliest undelivered event of each transfer for this
/// destination, only when its retry time has come and no live lease is on
/// it. Those are the destination's own pending rows and the unrouted rows
/// its route takes; an unrouted row claimed here becomes the destination's,
/// and a copy is inserted for each other destination it goes to (same
/// event_id, body and times; `event_seq` keeps its place in its transfer's
/// order). SKIP LOCKED: a concurrent claim's rows are not ours. One
/// statement, committed at once.
///
/// The heads come from the partial index of pending events by destination,
/// in id order (another destination's backlog is never walked). The
/// earlier-event check (pending or dead: a dead event holds the later ones
/// of its destination) can only go through `(transfer_id, id)`, a few rows
/// per head: no partial index's predicate follows from `state <>
/// 'published'`. (When one did, statistics from before an outage's backlog
/// made the planner walk the whole backlog once per head: 2.3 s a claim
/// with 50,000 pending, instead of 4.6 ms.)
pub(crate) async fn claim_heads(
    conn: &mut PgConnection,
    limit: i64,
    lease_ms: f64,
    scope: &ClaimScope<'_>,
) -> sqlx::Result<Vec<ClaimRow>> {
    // In id order from the index, never a sort of the backlog: the relay's
    // sessions run with BEGIN_CLAIM's settings (see `db::for_relay`).
    let rows = sqlx::query_as!(
        ClaimRow,
        r#"WITH own AS (
               SELECT o.id FROM outbox o
                WHERE o.state = 'pending' AND o.destination = $3
                  AND o.next_attempt_at <= now()
                  AND (o.claimed_until IS NULL OR o.claimed_until < now())
                  AND NOT EXISTS (SELECT 1 FROM outbox e
                                   WHERE e.transfer_id = o.transfer_id
                                     AND COALESCE(e.event_seq, e.id) < COALESCE(o.event_seq, o.id)
                                     AND e.state <> 'published'
                                     AND (e.destination = $3 OR (e.destination IS NULL AND e.event_type = ANY($4))))
                ORDER BY o.id
                LIMIT $1
                  FOR NO KEY UPDATE OF o SKIP LOCKED
           ), unrouted AS (
               SELECT o.id FROM outbox o
                WHERE o.state = 'pending' AND o.destination IS NULL AND o.event_type = ANY($4)
                  AND o.next_attempt_at <= now()
                  AND (o.claimed_until IS NULL OR o.claimed_until < now())
                  AND NOT EXISTS (SELECT 1 FROM outbox e
                                   WHERE e.transfer_id = o.transfer_id
                                     AND COALESCE(e.event_seq, e.id) < o.id
                                     AND e.state <> 'published'
                                     AND (e.destination = $3 OR (e.destination IS NULL AND e.event_type = ANY($4))))
                ORDER BY o.id
                LIMIT $1
                  FOR NO KEY UPDATE OF o SKIP LOCKED
           ), heads AS (
               -- The destination's own (retries, held-over) first, then new
               -- ones; no sort (see BEGIN_CLAIM).
               SELECT id FROM own UNION ALL SELECT id FROM unrouted LIMIT $1
           ), copies AS (
               INSERT INTO outbox (event_id, transfer_id, event_type, data, occurred_at, destination, event_seq)
               SELECT o.event_id, o.transfer_id, o.event_type, o.data, o.occurred_at, r.destination, o.id
                 FROM heads h
                 JOIN outbox o ON o.id = h.id AND o.destination IS NULL
                 JOIN unnest($5::text[], $6::text[]) AS r(event_type, destination) ON r.event_type = o.event_type
           )
           UPDATE outbox o SET claimed_until = now() + $2 * interval '1 millisecond', destination = $3
             FROM heads h
            WHERE o.id = h.id
        RETURNING (SELECT t.traceparent FROM transfers t WHERE t.id = o.transfer_id) AS traceparent,
                  o.id, o.event_id::text AS "event_id!", o.transfer_id AS "transfer_id: TransferId",
                  o.event_type AS "event_type: EventType", o.data AS "data: Json<serde_json::Value>",
                  o.attempts, o.transient_failures, o.replays,
                  o.claimed_until::text AS "lease!",
                  extract(epoch FROM o.occurred_at)::float8 AS "occurred_epoch!",
                  to_char(o.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS "occurred_at!""#,
        limit,
        lease_ms,
        scope.destination,
        scope.types,
        scope.copy_types,
        scope.copy_destinations
    )
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// Records the unrouted events of `types` (those no route takes) as such:
/// destination '' and published, in batches of `limit`; how many.
pub(crate) async fn mark_unrouted(conn: &mut PgConnection, types: &[String], limit: i64) -> sqlx::Result<u64> {
    if types.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query!(
        "UPDATE outbox SET destination = '', state = 'published', published_at = now(), claimed_until = NULL
          WHERE id IN (SELECT id FROM outbox
                        WHERE state = 'pending' AND destination IS NULL AND event_type = ANY($1)
                        ORDER BY id LIMIT $2
                          FOR NO KEY UPDATE SKIP LOCKED)",
        types,
        limit
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Events (ids), their errors, and (for retries) their delays in ms.
///
/// The statements that join these to the outbox write their state guard as
/// `state || '' = 'pending'`, so that the partial index of unpublished
/// events cannot serve it: with statistics from before an outage's backlog
/// the planner takes that index for empty and hashes the whole backlog per
/// pass (measured: 465 ms instead of 4 with 100,000 pending). The rows are
/// reached from their ids through the primary key instead. (`mark_published`
/// needs no such care: its `id = ANY($1)` is an index condition on either.)
pub(crate) type Outcomes<'a> = (&'a [i64], &'a [String], &'a [i64]);

/// pending -> published, where the lease holds; the ids it moved.
///
/// Each published event comes back with whether another event of its
/// transfer is still pending (a later one, at this or another destination,
/// which this publication may have made claimable).
pub(crate) async fn mark_published(conn: &mut PgConnection, ids: &[i64], lease: &str) -> sqlx::Result<Vec<Published>> {
    sqlx::query_as!(
        Published,
        r#"UPDATE outbox o SET state = 'published', published_at = now(), last_error = NULL, claimed_until = NULL,
                               first_published_at = COALESCE(first_published_at, now()),
                               publications = publications || now()
            WHERE id = ANY($1) AND state = 'pending' AND claimed_until = $2::text::timestamptz
        RETURNING id, EXISTS (SELECT 1 FROM outbox n
                               WHERE n.transfer_id = o.transfer_id AND n.id <> o.id AND n.state = 'pending') AS "more!""#,
        ids,
        lease
    )
    .fetch_all(conn)
    .await
}

/// An event just marked published.
pub(crate) struct Published {
    pub id: i64,
    /// Another event of its transfer is pending.
    pub more: bool,
}

/// A rejection SQS blamed on the message: the attempt counted, dead at
/// `max_attempts`, otherwise retried after its delay; where the lease holds.
pub(crate) struct Rejected {
    pub id: i64,
    pub state: EventState,
}

pub(crate) async fn count_rejections(
    conn: &mut PgConnection,
    (ids, errors, delays): Outcomes<'_>,
    max_attempts: i32,
    lease: &str,
) -> sqlx::Result<Vec<Rejected>> {
    sqlx::query_as!(
        Rejected,
        r#"UPDATE outbox o
              SET attempts = o.attempts + 1,
                  last_error = r.error,
                  state = CASE WHEN o.attempts + 1 >= $4 THEN 'dead' ELSE 'pending' END,
                  next_attempt_at = now() + r.delay_ms * interval '1 millisecond',
                  claimed_until = NULL
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS r(id, error, delay_ms)
            WHERE o.id = r.id AND o.state || '' = 'pending' AND o.claimed_until = $5::text::timestamptz
        RETURNING o.id, o.state AS "state: EventState""#,
        ids,
        errors,
        delays,
        max_attempts,
        lease
    )
    .fetch_all(conn)
    .await
}

/// A per-entry failure that was not the message's fault: retried after its
/// delay, never counted; where the lease holds. How many it moved.
pub(crate) async fn defer(
    conn: &mut PgConnection,
    (ids, errors, delays): Outcomes<'_>,
    lease: &str,
) -> sqlx::Result<usize> {
    Ok(sqlx::query!(
        "UPDATE outbox o
            SET transient_failures = o.transient_failures + 1,
                last_error = r.error,
                next_attempt_at = now() + r.delay_ms * interval '1 millisecond',
                claimed_until = NULL
           FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS r(id, error, delay_ms)
          WHERE o.id = r.id AND o.state || '' = 'pending' AND o.claimed_until = $4::text::timestamptz",
        ids,
        errors,
        delays,
        lease
    )
    .execute(conn)
    .await?
    .rows_affected() as usize)
}

/// An outage: attempts stay as they are, the error is noted and the lease
/// given back, so that the next pass (after the loop's backoff) may take
/// them at once; where the lease holds. How many it moved.
pub(crate) async fn give_back(
    conn: &mut PgConnection,
    ids: &[i64],
    errors: &[String],
    lease: &str,
) -> sqlx::Result<usize> {
    Ok(sqlx::query!(
        "UPDATE outbox o SET last_error = r.error, claimed_until = NULL
           FROM unnest($1::bigint[], $2::text[]) AS r(id, error)
          WHERE o.id = r.id AND o.state || '' = 'pending' AND o.claimed_until = $3::text::timestamptz",
        ids,
        errors,
        lease
    )
    .execute(conn)
    .await?
    .rows_affected() as usize)
}

/// Gives back every lease in `leases` (an abandoned pass's).
pub(crate) async fn release_leases(conn: &mut PgConnection, leases: &[String]) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "UPDATE outbox SET claimed_until = NULL
          WHERE state = 'pending' AND claimed_until = ANY($1::text[]::timestamptz[])",
        leases
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// dead -> pending, starting over (no attempts, no lease, due now): every
/// dead event, or the one with this outbox id or event id. How many it moved.
pub(crate) async fn requeue_dead(
    conn: &mut PgConnection,
    outbox_id: Option<i64>,
    event_id: Option<&str>,
    destination: Option<&str>,
) -> sqlx::Result<u64> {
    // With no event given, both keys are NULL and every dead event matches.
    Ok(sqlx::query!(
        "UPDATE outbox SET state = 'pending', attempts = 0, transient_failures = 0, next_attempt_at = now(),
                last_error = NULL, claimed_until = NULL
          WHERE state = 'dead'
            AND (($1::bigint IS NULL AND $2::text IS NULL) OR id = $1 OR event_id = $2::text::uuid)
            AND ($3::text IS NULL OR destination = $3)",
        outbox_id,
        event_id,
        destination
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// An event's state (to say why a requeue did not apply).
pub(crate) async fn state_of(
    conn: &mut PgConnection,
    outbox_id: Option<i64>,
    event_id: Option<&str>,
) -> sqlx::Result<Option<EventState>> {
    sqlx::query_scalar!(
        r#"SELECT state AS "state: EventState" FROM outbox WHERE id = $1 OR event_id = $2::text::uuid
            ORDER BY state = 'dead' DESC LIMIT 1"#,
        outbox_id,
        event_id
    )
    .fetch_optional(conn)
    .await
}

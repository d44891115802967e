//! Replay: already-published events go out again, with their original
//! `event_id`, body and attributes, through the normal relay (leases,
//! backoff, per-entry failures, dead after N, per-transfer order), for a
//! consumer that lost its data or a new consumer that needs history.
//! Consumers deduplicate by `event_id`, so a replay is safe for them.
//!
//! A replayed event goes back to `pending` (its `published_at` with it), its
//! first publication kept in `first_published_at` and every publication in
//! `publications`; `replays` counts the replays, and a replay's FIFO
//! deduplication id is `<event_id>:replay-<n>`, because SQS drops a FIFO
//! message whose deduplication id it saw in the last five minutes (the
//! first publication's was the `event_id`). Events of one transfer go out
//! in their original order (the relay claims only a transfer's earliest
//! unpublished event). Only published events are replayed; pending and dead
//! ones are on their way, or waiting for `outbox requeue`. Pruned events are
//! gone: a range that reaches into pruned history says how many transfers
//! in it have no events left.

use serde::Serialize;
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::outbox::EventType;
use crate::transfer::TransferId;
use crate::wake;

/// Which published events to replay.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// One transfer's events (then `since`/`until` must be None).
    pub transfer: Option<TransferId>,
    /// Events that occurred at or after this.
    pub since: Option<Moment>,
    /// Events that occurred before this (default now; needs `since`).
    pub until: Option<Moment>,
    /// Only these types (all if None; never empty: see [`glob::event_types`](super::glob::event_types)).
    pub types: Option<Vec<EventType>>,
    /// Only the deliveries to this destination (all if None).
    pub destination: Option<String>,
}

/// A point in time as operators write it: RFC 3339, or an age (`15m` = 15
/// minutes ago; the units `prune` takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Moment {
    /// RFC 3339 (`2026-12-02T06:00:00Z`, `2026-12-02T07:00:00.5+01:00`).
    At(String),
    /// This long before now (the database's clock).
    Ago(std::time::Duration),
}

impl std::str::FromStr for Moment {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let t = text.trim();
        if looks_like_rfc3339(t) {
            return Ok(Moment::At(t.to_owned()));
        }
        crate::retention::parse_age(t).map(Moment::Ago).map_err(|_| {
            format!("a time is RFC 3339 (like 2026-12-02T06:00:00Z) or an age (30s, 15m, 12h, 7d: that long ago); got {text:?}")
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; the database checks the values.
fn looks_like_rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    if b.len() < 20 || !digits(0..4) || b[4] != b'-' || !digits(5..7) || b[7] != b'-' || !digits(8..10) {
        return false;
    }
    if !matches!(b[10], b'T' | b't' | b' ') || !digits(11..13) || b[13] != b':' || !digits(14..16) || b[16] != b':' {
        return false;
    }
    if !digits(17..19) {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

/// What `outbox replay` did (or, with `--dry-run`, would do). With several
/// destinations, `replayed` counts deliveries: an event going to two
/// destinations is replayed twice (once with `--destination`). Events no
/// route took are not replayed (there is nowhere to send them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Events queued for publication again.
    pub replayed: i64,
    /// Transfers they belong to.
    pub transfers: i64,
    /// Transfers in the selection whose events were pruned (nothing of
    /// them to replay).
    pub transfers_without_events: i64,
    /// Transfers in the range that were pruned themselves (their keys kept).
    pub pruned_transfers: i64,
    pub dry_run: bool,
}

/// Replays the selected published events (or counts them, `dry_run`).
pub async fn replay(pool: &PgPool, selection: &Selection, dry_run: bool) -> Result<Replayed> {
    if selection.transfer.is_some() && (selection.since.is_some() || selection.until.is_some()) {
        return Err(Error::invalid("replay takes --transfer or --since/--until, not both"));
    }
    if selection.transfer.is_none() && selection.since.is_none() {
        return Err(Error::invalid("replay needs --transfer ID or --since T (RFC 3339, or an age like 15m)"));
    }
    if selection.types.as_ref().is_some_and(Vec::is_empty) {
        return Err(Error::invalid("--type matches no event type"));
    }
    let types: Option<Vec<String>> =
        selection.types.as_ref().map(|t| t.iter().map(|t| t.as_str().to_owned()).collect());
    let mut tx = pool.begin().await?;
    let since = match &selection.since {
        Some(m) => Some(resolve(&mut tx, "--since", m).await?),
        None => None,
    };
    let until = match &selection.until {
        Some(m) => Some(resolve(&mut tx, "--until", m).await?),
        None => None,
    };
    if let (Some(s), Some(u)) = (&since, &until) {
        if u.micros < s.micros {
            return Err(Error::invalid(format!("--until ({}) is before --since ({}); nothing replayed", u.utc, s.utc)));
        }
    }
    let (since, until) = (since.map(|m| m.utc), until.map(|m| m.utc));
    if let Some(id) = selection.transfer {
        let exists = sqlx::query_scalar!("SELECT count(*) AS \"n!\" FROM transfers WHERE id = $1", id.0)
            .fetch_one(&mut *tx)
            .await?;
        if exists == 0 {
            let pruned =
                sqlx::query_scalar!("SELECT count(*) AS \"n!\" FROM retired_keys WHERE transfer_id = $1", id.0)
                    .fetch_one(&mut *tx)
                    .await?;
            return Err(if pruned > 0 {
                Error::invalid(format!("transfer {id} was pruned: its events are gone; nothing replayed"))
            } else {
                Error::NotFound { what: "transfer", id: id.0 }
            });
        }
    }
    let transfer = selection.transfer.map(|t| t.0);
    let counted = sqlx::query!(
        r#"SELECT count(*) AS "events!", count(DISTINCT transfer_id) AS "transfers!"
             FROM outbox
            WHERE state = 'published'
              AND ($1::bigint IS NULL OR transfer_id = $1)
              AND ($2::text::timestamptz IS NULL OR occurred_at >= $2::text::timestamptz)
              AND ($3::text::timestamptz IS NULL OR occurred_at < $3::text::timestamptz)
              AND ($4::text[] IS NULL OR event_type = ANY($4))
              AND ($5::text IS NULL OR destination = $5)
              AND destination IS DISTINCT FROM ''"#,
        transfer,
        since.as_deref(),
        until.as_deref(),
        types.as_deref() as Option<&[String]>,
        selection.destination.as_deref()
    )
    .fetch_one(&mut *tx)
    .await?;
    // What the range cannot replay any more.
    let gone = sqlx::query!(
        r#"SELECT (SELECT count(*) FROM transfers t
                    WHERE ($1::bigint IS NULL OR t.id = $1)
                      AND ($2::text::timestamptz IS NULL OR t.created_at >= $2::text::timestamptz)
                      AND ($3::text::timestamptz IS NULL OR t.created_at < $3::text::timestamptz)
                      AND t.status <> 'PENDING'
                      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.transfer_id = t.id)) AS "without_events!",
                  (SELECT count(*) FROM retired_keys r
                    WHERE $1::bigint IS NULL
                      AND ($2::text::timestamptz IS NULL OR r.created_at >= $2::text::timestamptz)
                      AND ($3::text::timestamptz IS NULL OR r.created_at < $3::text::timestamptz)) AS "pruned!""#,
        transfer,
        since.as_deref(),
        until.as_deref()
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut out = Replayed {
        replayed: counted.events,
        transfers: counted.transfers,
        transfers_without_events: gone.without_events,
        pruned_transfers: gone.pruned,
        dry_run,
    };
    if dry_run || counted.events == 0 {
        tx.rollback().await?;
        return Ok(out);
    }
    let replayed = sqlx::query!(
        r#"UPDATE outbox o
              SET state = 'pending', published_at = NULL, attempts = 0, transient_failures = 0,
                  next_attempt_at = now(), last_error = NULL, claimed_until = NULL,
                  first_published_at = COALESCE(o.first_published_at, o.published_at),
                  publications = CASE WHEN cardinality(o.publications) = 0 AND o.published_at IS NOT NULL
                                      THEN ARRAY[o.published_at] ELSE o.publications END,
                  replays = o.replays + 1
            WHERE o.state = 'published'
              AND ($1::bigint IS NULL OR o.transfer_id = $1)
              AND ($2::text::timestamptz IS NULL OR o.occurred_at >= $2::text::timestamptz)
              AND ($3::text::timestamptz IS NULL OR o.occurred_at < $3::text::timestamptz)
              AND ($4::text[] IS NULL OR o.event_type = ANY($4))
              AND ($5::text IS NULL OR o.destination = $5)
              AND o.destination IS DISTINCT FROM ''"#,
        transfer,
        since.as_deref(),
        until.as_deref(),
        types.as_deref() as Option<&[String]>,
        selection.destination.as_deref()
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    wake::notify(&mut tx, wake::Work::Outbox).await?;
    tx.commit().await?;
    out.replayed = replayed as i64;
    Ok(out)
}

/// A [`Moment`] the database resolved: UTC RFC 3339 with microseconds, and
/// microseconds since the epoch (for comparing).
struct Resolved {
    utc: String,
    micros: i64,
}

/// Resolves `moment` on the database's clock; a time in the future, or one
/// the database cannot read, is bad input naming `flag`.
async fn resolve(conn: &mut sqlx::PgConnection, flag: &str, moment: &Moment) -> Result<Resolved> {
    let (text, ago) = match moment {
        Moment::At(t) => (Some(t.as_str()), None),
        Moment::Ago(d) => (None, Some(d.as_secs_f64())),
    };
    let row = sqlx::query!(
        r#"WITH m AS (SELECT COALESCE($1::text::timestamptz, now() - make_interval(secs => $2::float8)) AS at)
           SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS "utc!",
                  (extract(epoch FROM at) * 1000000)::int8 AS "micros!",
                  at > now() AS "future!"
             FROM m"#,
        text,
        ago
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("22")) => Error::invalid(format!(
            "{flag} {:?} is not a time the database can read: {}",
            text.unwrap_or(""),
            d.message()
        )),
        _ => e.into(),
    })?;
    if row.future {
        return Err(Error::invalid(format!("{flag} {} is in the future; nothing replayed", row.utc)));
    }
    Ok(Resolved { utc: row.utc, micros: row.micros })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_rfc3339_or_ages() {
        assert_eq!("15m".parse::<Moment>(), Ok(Moment::Ago(std::time::Duration::from_secs(900))));
        for t in ["2026-12-02T06:00:00Z", "2026-12-02T06:00:00.123456+01:00", "2026-12-02 06:00:00-05:30"] {
            assert_eq!(t.parse::<Moment>(), Ok(Moment::At(t.into())), "{t}");
        }
        for t in
            ["", "yesterday", "2026-12-02", "2026-12-02T06:00:00", "2026-12-02T06:00Z", "15", "2026-12-02T06:00:00.Z"]
        {
            assert!(t.parse::<Moment>().is_err(), "{t}");
        }
    }
}

//! Pause and resume: the operator's brake, per part of the worker, for
//! every replica at once.
//!
//! The state lives in `worker_controls` (one row per [`Part`]), so it holds
//! for every replica, survives restarts, and a replica started while paused
//! stays idle from its first pass. [`set`] updates the rows and NOTIFYs in
//! the same transaction; each `run` process keeps a [`Paused`] that its
//! control watcher refreshes on that notification and at least every
//! second, and its apply tasks and relays look at it before each pass: a
//! pass already under way (a claimed batch) finishes normally, and no new
//! one starts. Producers can still enqueue while apply is paused
//! (transfers wait as PENDING); events wait in the outbox while the relay
//! is paused, with nothing counted against them.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::wake;

/// A part of the worker that can be paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// Claiming and applying transfers and refunds.
    Apply,
    /// Publishing outbox events.
    Relay,
}

impl Part {
    pub const ALL: [Part; 2] = [Part::Apply, Part::Relay];

    pub fn as_str(self) -> &'static str {
        match self {
            Part::Apply => "apply",
            Part::Relay => "relay",
        }
    }
}

/// What is paused, as `status --json` shows it: `reason` and `since` are the
/// latest pause's (null when nothing is paused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PauseState {
    pub apply: bool,
    pub relay: bool,
    pub reason: Option<String>,
    /// RFC 3339, UTC.
    pub since: Option<String>,
}

impl PauseState {
    pub fn is_paused(&self, part: Part) -> bool {
        match part {
            Part::Apply => self.apply,
            Part::Relay => self.relay,
        }
    }
}

/// Reads the pause state.
pub async fn read(conn: &mut PgConnection) -> Result<PauseState> {
    let rows = sqlx::query!(
        r#"SELECT part, paused, reason,
                  to_char(since AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS since
             FROM worker_controls ORDER BY since DESC NULLS LAST"#
    )
    .fetch_all(conn)
    .await?;
    let mut state = PauseState::default();
    for r in rows {
        match r.part.as_str() {
            "apply" => state.apply = r.paused,
            "relay" => state.relay = r.paused,
            _ => continue,
        }
        if r.paused && state.since.is_none() {
            state.reason = r.reason;
            state.since = r.since;
        }
    }
    Ok(state)
}

/// Pauses (or resumes) `parts`, with `reason` (shown by `status` and the
/// console), and tells every replica at once; returns the new state.
pub async fn set(pool: &PgPool, parts: &[Part], paused: bool, reason: Option<&str>) -> Result<PauseState> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if let Some(r) = reason {
        check_reason(r)?;
    }
    let names: Vec<&str> = parts.iter().map(|p| p.as_str()).collect();
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "UPDATE worker_controls
            SET paused = $2,
                reason = CASE WHEN $2 THEN $3 ELSE NULL END,
                since = CASE WHEN $2 THEN COALESCE(CASE WHEN paused THEN since END, now()) ELSE NULL END
          WHERE part = ANY($1)",
        &names as &[&str],
        paused,
        reason
    )
    .execute(&mut *tx)
    .await?;
    wake::notify(&mut tx, wake::Work::Control).await?;
    let state = read(&mut tx).await?;
    tx.commit().await?;
    Ok(state)
}

/// The longest reason kept.
pub const REASON_MAX: usize = 500;

/// A reason is one line of at most [`REASON_MAX`] characters.
pub fn check_reason(reason: &str) -> Result<()> {
    if reason.chars().count() > REASON_MAX {
        return Err(Error::invalid(format!("the reason is longer than {REASON_MAX} characters")));
    }
    if reason.chars().any(char::is_control) {
        return Err(Error::invalid(
            "the reason has a control character (a newline, a tab, an escape): keep it to one line",
        ));
    }
    Ok(())
}

/// A process's view of the pause state, refreshed by its control watcher
/// (see `worker`), read before every pass.
#[derive(Debug, Default)]
pub struct Paused {
    apply: AtomicBool,
    relay: AtomicBool,
}

impl Paused {
    pub fn is_paused(&self, part: Part) -> bool {
        match part {
            Part::Apply => self.apply.load(Ordering::Relaxed),
            Part::Relay => self.relay.load(Ordering::Relaxed),
        }
    }

    /// Takes in a state read from the database; returns the parts that were
    /// just resumed (their loops should be woken).
    pub fn update(&self, state: &PauseState) -> Vec<Part> {
        let mut resumed = Vec::new();
        for (part, flag) in [(Part::Apply, &self.apply), (Part::Relay, &self.relay)] {
            let now = state.is_paused(part);
            let was = flag.swap(now, Ordering::Relaxed);
            if was != now {
                tracing::warn!(part = part.as_str(), paused = now, reason = ?state.reason, "pause state changed");
                if !now {
                    resumed.push(part);
                }
            }
        }
        resumed
    }
}

//! `outbox requeue`: dead events back to pending, once the cause is fixed.
//!
//! A requeued event starts over (attempts 0) and, since it is the earliest
//! unpublished event of its transfer, goes out before the events it held.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sqlx::PgPool;

use crate::error::{Error, Refusal, Result};
use crate::outbox::store;
use crate::wake;

/// Which event: its `outbox.id` or its `event_id` (UUID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventRef {
    OutboxId(i64),
    EventId(String),
}

impl FromStr for EventRef {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if let Ok(id) = s.parse::<i64>() {
            return Ok(EventRef::OutboxId(id));
        }
        let is_uuid = s.len() == 36
            && s.char_indices()
                .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
        if is_uuid {
            Ok(EventRef::EventId(s.to_ascii_lowercase()))
        } else {
            Err(format!("event must be an outbox id (integer) or an event_id (UUID), got {s:?}"))
        }
    }
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventRef::OutboxId(id) => write!(f, "{id}"),
            EventRef::EventId(id) => f.write_str(id),
        }
    }
}

/// What `outbox requeue` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Requeued {
    pub requeued: u64,
}

/// Requeues every dead event, or just `event`, which must exist (exit 2) and
/// be dead (exit 3 otherwise, nothing written); only those of `destination`
/// when one is given (an event sent to several destinations is dead only
/// where it was refused).
pub async fn requeue(pool: &PgPool, event: Option<&EventRef>, destination: Option<&str>) -> Result<Requeued> {
    let (outbox_id, event_id) = match event {
        None => (None, None),
        Some(EventRef::OutboxId(id)) => (Some(*id), None),
        Some(EventRef::EventId(id)) => (None, Some(id.as_str())),
    };
    let mut tx = pool.begin().await?;
    let n = store::requeue_dead(&mut tx, outbox_id, event_id, destination).await?;
    if n == 0 {
        if let Some(e) = event {
            let state = store::state_of(&mut tx, outbox_id, event_id).await?;
            tx.rollback().await?;
            return Err(match state {
                None => Error::invalid(format!("event {e} does not exist")),
                Some(state) => Refusal::NotDead { event: e.to_string(), state }.into(),
            });
        }
    } else {
        wake::notify(&mut tx, wake::Work::Outbox).await?;
    }
    tx.commit().await?;
    Ok(Requeued { requeued: n })
}

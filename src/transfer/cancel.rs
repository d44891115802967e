//! Cancels: PENDING -> CANCELLED, one guarded UPDATE (in [`super::store`]).
//!
//! The guard `status = 'PENDING'` is in the UPDATE itself: a cancel racing the
//! worker that is applying the same transfer waits for the worker's row lock,
//! then PostgreSQL re-checks the guard on the committed row (now SUCCEEDED or
//! FAILED) and updates nothing. The `transfer.cancelled` event is inserted by
//! the same statement from the rows actually updated, so a cancel that came
//! too late writes nothing and exits 3 naming the state it found.

use serde::Serialize;
use sqlx::{Acquire, Postgres};

use crate::error::{Error, Refusal, Result};
use crate::transfer::{store, TransferId, TransferStatus};
use crate::wake;

/// What `cancel` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cancelled {
    pub transfer_id: TransferId,
    pub status: TransferStatus,
}

pub async fn cancel<'a, A>(db: A, id: TransferId) -> Result<Cancelled>
where
    A: Acquire<'a, Database = Postgres>,
{
    let mut conn = db.acquire().await?;
    let cancelled = store::cancel_pending(&mut conn, id).await?;
    if cancelled {
        // Its event was written by this process: wake the workers' relays.
        wake::notify(&mut conn, wake::Work::Outbox).await?;
        return Ok(Cancelled { transfer_id: id, status: TransferStatus::Cancelled });
    }
    Err(match store::status_of(&mut conn, id).await? {
        None => Error::NotFound { what: "transfer", id: id.0 },
        Some(status) => Refusal::NotCancellable { transfer: id, status }.into(),
    })
}

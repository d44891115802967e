//! Cancels: PENDING -> CANCELLED, one guarded UPDATE (in `transfer::store`).
//!
//! The guard `status = 'PENDING'` is in the UPDATE itself: a cancel racing the
//! worker that is applying the same transfer waits for the worker's row lock,
//! then PostgreSQL re-checks the guard on the committed row (now SUCCEEDED or
//! FAILED) and updates nothing. The `transfer.cancelled` event is inserted by
//! the same statement from the rows actually updated, so a cancel that came
//! too late writes nothing and exits 3 naming the state it found.

use serde::Serialize;
use sqlx::{Acquire, Postgres};

use crate::concurrency::advisory::Guard;
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
    cancel_guarded(db, id, None).await
}

/// [`cancel`] under a duplicate-request guard: refused at once (nothing
/// written) while another transaction holds it.
pub async fn cancel_guarded<'a, A>(db: A, id: TransferId, guard: Option<&Guard>) -> Result<Cancelled>
where
    A: Acquire<'a, Database = Postgres>,
{
    // A transaction of its own (or a savepoint in the caller's), so that a
    // guard is held until the cancel is committed.
    let mut tx = db.begin().await?;
    if let Some(guard) = guard {
        if let Err(refused) = guard.take(&mut tx).await {
            tx.rollback().await?;
            return Err(refused);
        }
    }
    if store::cancel_pending(&mut tx, id).await? {
        // Its event was written by this process: wake the workers' relays.
        wake::notify(&mut tx, wake::Work::Outbox).await?;
        tx.commit().await?;
        return Ok(Cancelled { transfer_id: id, status: TransferStatus::Cancelled });
    }
    let status = store::status_of(&mut tx, id).await?;
    tx.rollback().await?;
    Err(match status {
        None => Error::NotFound { what: "transfer", id: id.0 },
        Some(status) => Refusal::NotCancellable { transfer: id, status }.into(),
    })
}

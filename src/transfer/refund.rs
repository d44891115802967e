//! Refund requests: NONE -> REQUESTED, one guarded UPDATE.
//!
//! A refund is accepted only for a SUCCEEDED transfer whose refund_status is
//! NONE, for 0 < amount <= the transfer's amount. The request first takes the
//! transfer's row lock, then runs one UPDATE with that guard in its WHERE
//! clause and checks what it updated. The lock comes first because a
//! READ COMMITTED UPDATE skips, without waiting, a row whose snapshot version
//! fails its WHERE: a refund asked for while the worker is applying the
//! transfer would otherwise see PENDING and give up. Locking makes it wait for
//! the worker's commit, and the UPDATE, a new statement, then judges the
//! committed row. Two requests at once serialize the same way: the second
//! finds REQUESTED and updates nothing. The `refund.requested` event is
//! inserted by the same statement, from the rows it actually updated, so a
//! request that did not apply writes nothing. Completing the refund (moving
//! the money back) is the worker's: see [`crate::transfer::apply::Step::Refund`].
//!
//! # Example
//!
//! ```rust,ignore
//! match request_refund(&pool, TransferId(42), None).await {
//!     Ok(r) => println!("refund of {} requested", r.refund_amount),
//!     Err(Error::Refused(why)) => println!("not applied, nothing written: {why}"), // e.g. already refunded
//!     Err(e) => return Err(e),
//! }
//! ```

use serde::Serialize;
use sqlx::{Acquire, PgConnection, Postgres};

use crate::concurrency::advisory::Guard;
use crate::error::{Error, Refusal, Result};
use crate::transfer::{store, Amount, RefundStatus, TransferId};
use crate::wake;

/// What `refund` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefundRequested {
    pub transfer_id: TransferId,
    pub refund_status: RefundStatus,
    pub refund_amount: i64,
}

/// Requests a refund of `amount` (the full amount if `None`).
pub async fn request_refund<'a, A>(db: A, id: TransferId, amount: Option<Amount>) -> Result<RefundRequested>
where
    A: Acquire<'a, Database = Postgres>,
{
    request_refund_guarded(db, id, amount, None).await
}

/// [`request_refund`] under a duplicate-request guard: refused at once
/// (nothing written) while another transaction holds it.
pub async fn request_refund_guarded<'a, A>(
    db: A,
    id: TransferId,
    amount: Option<Amount>,
    guard: Option<&Guard>,
) -> Result<RefundRequested>
where
    A: Acquire<'a, Database = Postgres>,
{
    // A transaction of its own, or a savepoint inside the caller's.
    let mut tx = db.begin().await?;
    if let Some(guard) = guard {
        if let Err(refused) = guard.take(&mut tx).await {
            tx.rollback().await?;
            return Err(refused);
        }
    }
    if !store::lock_for_request(&mut tx, id).await? {
        tx.rollback().await?;
        return Err(Error::NotFound { what: "transfer", id: id.0 });
    }
    let requested = store::request_refund(&mut tx, id, amount.map(Amount::get)).await?;
    match requested {
        Some(refund_amount) => {
            wake::notify(&mut tx, wake::Work::Refund).await?;
            tx.commit().await?;
            Ok(RefundRequested { transfer_id: id, refund_status: RefundStatus::Requested, refund_amount })
        }
        None => {
            let err = why_not(&mut tx, id, amount).await?;
            tx.rollback().await?;
            Err(err)
        }
    }
}

/// The error for a refund that did not apply, from the transfer's current state.
async fn why_not(conn: &mut PgConnection, id: TransferId, amount: Option<Amount>) -> Result<Error> {
    let current = store::refund_state(conn, id).await?;
    let Some(current) = current else {
        return Ok(Error::NotFound { what: "transfer", id: id.0 });
    };
    if let Some(a) = amount.filter(|a| a.get() > current.amount) {
        return Ok(Error::invalid(format!(
            "refund amount {a} exceeds transfer {id}'s amount {}; nothing written",
            current.amount
        )));
    }
    Ok(if current.refund_status != RefundStatus::None {
        Refusal::AlreadyRefunded { transfer: id, refund_status: current.refund_status }.into()
    } else {
        Refusal::NotRefundable { transfer: id, status: current.status }.into()
    })
}

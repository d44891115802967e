//! Wake-ups: LISTEN/NOTIFY, with polling as the fallback.
//!
//! A statement-level trigger (see the migrations) NOTIFYs `transfer_worker_work`
//! when transfers are inserted (unless a worker polls for them: see
//! [`crate::transfer::polling`]), and `refund`, `cancel` and `outbox requeue`
//! notify explicitly; one listener connection per process turns that into a
//! [`Notify`] for the apply tasks or the relay. Events the worker itself
//! writes wake its relay in-process (no NOTIFY: it would take PostgreSQL's
//! cluster-wide notify lock at every commit of the hot path). Why both: NOTIFY makes a new transfer start within
//! milliseconds instead of a poll interval, and costs one notification per
//! statement, not per row; polling covers what NOTIFY cannot promise (a
//! notification sent while the listener was reconnecting is lost, and rows
//! whose retry time passes notify nobody).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The channel the migration's triggers notify.
pub const CHANNEL: &str = "transfer_worker_work";

/// What there is to do, as the NOTIFY payload says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A refund was requested: the apply tasks (and the relay, for its
    /// `refund.requested` event).
    Refund,
    /// Events were written or put back to pending by another process: the relay.
    Outbox,
    /// An operator paused or resumed a part of the worker: the control watcher.
    Control,
}

/// NOTIFYs the workers from inside the caller's transaction (delivered at
/// commit), for changes the insert triggers do not see.
pub async fn notify(conn: &mut sqlx::PgConnection, work: Work) -> sqlx::Result<()> {
    let payload = match work {
        Work::Refund => "refund",
        Work::Outbox => "outbox",
        Work::Control => "control",
    };
    sqlx::query!("SELECT pg_notify($1, $2)::text", CHANNEL, payload).fetch_one(conn).await?;
    Ok(())
}

/// Who to wake for which table.
///
/// One task is woken per notification (`notify_one`): a task that then finds
/// a full batch wakes a peer in turn (see [`crate::service::run_loop`]), so
/// a burst gets every task and a trickle gets one. Waking them all for each
/// of 1,000 single-row inserts a second would make 1,000 x tasks passes that
/// mostly find nothing, and starve the machine of the CPU the work needs.
#[derive(Clone, Default)]
pub struct Wakers {
    /// New transfers or refund requests: the apply tasks.
    pub work: Arc<Notify>,
    /// New outbox events: the relay.
    pub outbox: Arc<Notify>,
    /// A refund was requested since the apply tasks last looked.
    pub refunds: Arc<AtomicBool>,
    /// The pause state changed: the control watcher.
    pub control: Arc<Notify>,
}

impl Wakers {
    fn wake_all(&self) {
        self.refunds.store(true, Ordering::Relaxed);
        self.work.notify_waiters();
        self.outbox.notify_waiters();
        self.control.notify_waiters();
    }

    /// Listens until `shutdown`; reconnects (waking everyone, since
    /// notifications may have been missed) when the connection drops.
    pub async fn listen(self, pool: PgPool, shutdown: CancellationToken) {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; polling until it is back");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "LISTEN failed; polling until it is back");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            self.wake_all();
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) if n.payload() == "outbox" => self.outbox.notify_one(),
                    Ok(Some(n)) if n.payload() == "control" => self.control.notify_waiters(),
                    Ok(Some(n)) if n.payload() == "refund" => {
                        self.refunds.store(true, Ordering::Relaxed);
                        self.work.notify_one();
                        self.outbox.notify_one();
                    }
                    Ok(Some(_)) => self.work.notify_one(),
                    // The connection dropped; try_recv reconnects on the next call.
                    Ok(None) => self.wake_all(),
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost");
                        break;
                    }
                }
            }
        }
    }
}

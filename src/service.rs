//! The one shape of every background loop (apply tasks, the relay).
//!
//! Each service has a `run_once()` that does one pass and reports how it went;
//! [`run_loop`] turns that into a long-running task: back to back while there
//! is a backlog, otherwise asleep until a NOTIFY or the poll tick, with a
//! growing delay (never giving up) while a dependency is down. Shutdown is only
//! looked at between passes, so a pass in progress always finishes: its
//! transaction commits or rolls back, never half of it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::retry::RetryPolicy;

/// How a pass went, which decides when the next one starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A full batch: there is probably more, go again at once.
    Busy,
    /// Less than a batch: sleep until notified or the poll interval passes.
    Idle,
    /// A dependency (database, SQS) was unavailable: back off, and do not let
    /// notifications cut the backoff short.
    Unavailable,
}

/// Runs `pass` until `shutdown` is cancelled.
/// (`pass` returns a boxed future: a generic future type here trips rustc's
/// `Send` inference for spawned tasks.)
pub async fn run_loop<F>(
    shutdown: CancellationToken,
    wake: Arc<Notify>,
    poll: Duration,
    retry: RetryPolicy,
    mut pass: F,
) where
    F: FnMut() -> BoxFuture<'static, Pass> + Send,
{
    let mut backoff = retry.backoff();
    while !shutdown.is_cancelled() {
        // Register for wake-ups *before* the pass, so a notification that
        // arrives while it runs is not lost.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (delay, wake_early) = match pass().await {
            Pass::Busy => {
                backoff.reset();
                continue;
            }
            Pass::Idle => {
                backoff.reset();
                (poll, true)
            }
            Pass::Unavailable => (backoff.next_delay(), false),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
            _ = &mut notified, if wake_early => {}
        }
    }
}

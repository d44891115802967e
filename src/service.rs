//! The one shape of every background loop (apply tasks, the relay).
//!
//! A [`Service`] has a `run_once()` that does one pass and reports what it
//! did; from that it gets [`Service::pass`] (how soon the next pass should
//! start), [`Service::drain`] (passes until there is nothing left: tests,
//! tools, and shutdown with [`Service::drain_until`]) and [`run`] (the
//! long-running task): back to back while there is a backlog, otherwise asleep
//! until a wake-up or the poll tick, with a growing delay (never giving up)
//! while a dependency is down. Shutdown is only looked at between passes, so
//! a pass in progress always finishes: its transaction commits or rolls back,
//! never half of it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::retry::RetryPolicy;

/// What a pass reports, as far as the loop cares.
pub trait Progress: Default + std::ops::AddAssign + Send {
    /// Rows the pass took (a full batch means there is probably more).
    fn claimed(&self) -> usize;
    /// Whether a dependency was unavailable (back off).
    fn unavailable(&self) -> bool {
        false
    }
    /// Whether it left claimed work for a moment because another session
    /// held what it needed (another replica's batch, usually, which is done
    /// in milliseconds): look again soon rather than at the next poll.
    fn contended(&self) -> bool {
        false
    }
}

/// A background service: one pass at a time, the loop around it shared.
pub trait Service: Send + Sync + 'static {
    type Counts: Progress;

    /// For logs.
    const NAME: &'static str;

    /// One pass. An `Err` is the database's trouble (retried with backoff);
    /// everything else is in the counts.
    fn run_once(&self) -> BoxFuture<'_, Result<Self::Counts>>;

    /// Rows a pass takes at most.
    fn batch_size(&self) -> i64;

    /// How its loop polls and backs off.
    fn timing(&self) -> Timing;

    /// What wakes its loop before the poll interval passes.
    fn wake(&self) -> Arc<Notify>;

    /// Records what a pass did in the process's metrics; the loop calls it
    /// after every pass, so the work itself never touches a global registry.
    fn record(&self, _counts: &Self::Counts) {}

    /// One pass, judged for the loop: how soon the next one should start.
    fn pass(&self) -> BoxFuture<'_, Pass> {
        Box::pin(async move {
            let outcome = self.run_once().await;
            self.judge(outcome)
        })
    }

    /// How soon the next pass should start after one that ended so (its
    /// counts recorded in the metrics first).
    fn judge(&self, outcome: Result<Self::Counts>) -> Pass {
        if let Ok(c) = &outcome {
            self.record(c);
        }
        match outcome {
            Ok(c) if c.unavailable() => Pass::Unavailable,
            Ok(c) if c.claimed() as i64 >= self.batch_size() => Pass::Busy,
            Ok(c) if c.contended() => Pass::Contended,
            Ok(_) => Pass::Idle,
            Err(e) => {
                if let Some(db_err) = e.sql() {
                    crate::metrics::metrics().db_retry(crate::db::sqlstate(db_err).as_deref());
                }
                tracing::warn!(service = Self::NAME, error = %e, "pass failed; will retry");
                Pass::Unavailable
            }
        }
    }

    /// Waits for work the loop's passes left running in the background (a
    /// relay's sends in flight) and returns what it did; nothing by default.
    fn settle(&self) -> BoxFuture<'_, Result<Self::Counts>> {
        Box::pin(async { Ok(Self::Counts::default()) })
    }

    /// What the loop left running settled, then passes until one takes
    /// nothing (or a dependency is unavailable); what they did, summed.
    fn drain(&self) -> BoxFuture<'_, Result<Self::Counts>> {
        Box::pin(async move {
            let mut total = self.settle().await?;
            self.record(&total);
            loop {
                let c = self.run_once().await?;
                self.record(&c);
                let (claimed, unavailable) = (c.claimed(), c.unavailable());
                total += c;
                if claimed == 0 || unavailable {
                    return Ok(total);
                }
            }
        })
    }

    /// [`Service::drain`], stopped at `deadline` (a pass cut short there is
    /// abandoned: its transaction rolls back, its claims are given back).
    fn drain_until(&self, deadline: tokio::time::Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, self.drain()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(service = Self::NAME, error = %e, "final pass failed; the rest waits"),
                Err(_) => {
                    tracing::warn!(service = Self::NAME, "final passes cut short by the deadline; the rest waits")
                }
            }
        })
    }
}

/// How a service's loop paces itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// The longest idle sleep (a wake-up cuts it short).
    pub poll_interval: Duration,
    /// Backoff while a dependency is unavailable.
    pub outage_retry: RetryPolicy,
}

impl Default for Timing {
    /// 500 ms polls; 100 ms doubling to 30 s while a dependency is down.
    fn default() -> Self {
        Timing { poll_interval: Duration::from_millis(500), outage_retry: RetryPolicy::default() }
    }
}

/// Runs `service` until `shutdown` is cancelled (see the module docs): the
/// service says how it is paced and woken.
pub async fn run<S: Service>(service: Arc<S>, shutdown: CancellationToken) {
    let Timing { poll_interval, outage_retry } = service.timing();
    let wake = service.wake();
    run_loop(shutdown, wake, poll_interval, outage_retry, move || {
        let service = service.clone();
        Box::pin(async move { service.pass().await })
    })
    .await
}

/// How soon a pass that found some of its work held elsewhere looks again.
/// (Work held by a session outside the worker for longer stops being
/// claimed after a few tries: see `transfer::busy`.)
pub const CONTENDED_RETRY: Duration = Duration::from_millis(25);

/// How a pass went, which decides when the next one starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A full batch: there is probably more, go again at once.
    Busy,
    /// Less than a batch: sleep until notified or the poll interval passes.
    Idle,
    /// Less than a batch, but some of it was held by another session: try
    /// again after [`CONTENDED_RETRY`] (or when notified).
    Contended,
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
                // More than one batch waits: bring a sleeping peer in too.
                wake.notify_one();
                continue;
            }
            Pass::Idle => {
                backoff.reset();
                (poll, true)
            }
            Pass::Contended => {
                backoff.reset();
                (poll.min(CONTENDED_RETRY), true)
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

/// Waits until `shutdown` is cancelled, or until one of `tasks` ends first.
/// Background tasks run until shutdown, so one that ends before it has
/// panicked (or returned by mistake): the process must not stay up, looking
/// ready, while a part of it is gone. Returns what ended and why, for the
/// caller to stop the rest and exit non-zero (so that an orchestrator
/// restarts it).
pub async fn watch(shutdown: &CancellationToken, tasks: &mut [(&str, &mut JoinSet<()>)]) -> Option<String> {
    let ended = futures::future::select_all(tasks.iter_mut().map(|(name, set)| {
        let name = *name;
        Box::pin(async move {
            match set.join_next().await {
                Some(Err(e)) if e.is_panic() => Some(format!("{name} panicked: {}", panic_message(e.into_panic()))),
                Some(Err(e)) => Some(format!("{name} was cancelled: {e}")),
                Some(Ok(())) => Some(format!("{name} stopped on its own")),
                // An empty set never ends anything: wait for shutdown.
                None => std::future::pending().await,
            }
        })
    }));
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        (why, _, _) = ended => {
            // Tasks end when shutdown is asked for: that is not a death.
            if shutdown.is_cancelled() {
                if let Some(why) = why.filter(|w| !w.ends_with("stopped on its own")) {
                    tracing::error!(%why, "a task failed while stopping");
                }
                None
            } else {
                why
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_before_shutdown_is_reported() {
        let shutdown = CancellationToken::new();
        let mut steady = JoinSet::new();
        let token = shutdown.clone();
        steady.spawn(async move { token.cancelled().await });
        let mut failing = JoinSet::new();
        failing.spawn(async { panic!("boom in a pass") });
        let why = watch(&shutdown, &mut [("apply task", &mut steady), ("relay task", &mut failing)]).await;
        assert_eq!(why.as_deref(), Some("relay task panicked: boom in a pass"));
    }

    #[tokio::test]
    async fn shutdown_ends_the_watch_quietly() {
        let shutdown = CancellationToken::new();
        let mut steady = JoinSet::new();
        let token = shutdown.clone();
        steady.spawn(async move { token.cancelled().await });
        shutdown.cancel();
        assert_eq!(watch(&shutdown, &mut [("apply task", &mut steady)]).await, None);
    }
}

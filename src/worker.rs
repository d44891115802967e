//! The `run` process: apply tasks, relay tasks and the wake-up listener, their
//! supervision, and their orderly, bounded shutdown.
//!
//! Supervision: every task runs until shutdown. One that ends before (a
//! panic) stops the process with an error, so the orchestrator restarts it
//! rather than leaving a replica up and ready that no longer applies or
//! relays anything.
//!
//! Shutdown, within `shutdown_timeout` of the signal whatever SQS and
//! PostgreSQL are doing:
//! 1. the apply tasks stop claiming and finish (commit or roll back) the
//!    batch they hold;
//! 2. the relay finishes its pass and drains what those last batches wrote;
//! 3. at the deadline, whatever still runs is abandoned: an apply task's
//!    transaction rolls back (its transfers are claimed again by the next
//!    worker); a relay's claimed events have their leases given back (they go
//!    out again, possibly a second time, never zero times).
//!
//! Nothing is lost at any point, since every step is a committed transaction.
//!
//! # Example: the worker in-process
//!
//! ```rust,ignore
//! let pool = transfer_worker::db::connect(&url, 10, SessionLimits::default()).await?;
//! let client = transfer_worker::outbox::sqs::client_from_env(Duration::from_secs(10)).await;
//! let publisher = Publisher::new(client, &SqsConfig { queue_url, call_timeout: Duration::from_secs(10), concurrency: 10 });
//! let health = Arc::new(Health::new(transfer_worker::shutdown::on_signals()));
//! let stopped = worker::run(pool, publisher, WorkerConfig::default(), health).await?;
//! ```

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::controls::{self, Part, Paused};
use crate::error::{Error, Result};
use crate::health::Health;
use crate::maintenance::MaintenanceConfig;
use crate::outbox::publisher::Publisher;
use crate::outbox::relay::{Relay, RelayConfig};
use crate::outbox::route::{Route, Routing};
use crate::retry::RetryPolicy;
use crate::service::{self, Service, Timing};
use crate::transfer::apply::{Applier, ApplyConfig, CommitObserver};
use crate::transfer::busy::BusyAccounts;
use crate::wake::Wakers;

/// Where events go: a publisher per destination, and the routes that say
/// which events each takes.
#[derive(Clone)]
pub struct Outlets {
    pub publishers: Vec<Publisher>,
    pub routing: Routing,
}

impl From<Publisher> for Outlets {
    /// Every event to one destination.
    fn from(publisher: Publisher) -> Outlets {
        let routing = Routing::new(vec![Route::everything_to(publisher.target().clone())]);
        Outlets { publishers: vec![publisher], routing }
    }
}

/// Everything `run` can be tuned with (see `transfer-worker run --help`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Apply tasks in this process (default 4).
    pub workers: usize,
    /// Relay tasks per destination in this process (default 2; each claims
    /// while its earlier claims are with SQS, see `relay`'s "Pipelining").
    pub relays: usize,
    pub apply: ApplyConfig,
    pub relay: RelayConfig,
    /// Longest idle sleep of an apply task; NOTIFY wakes it sooner.
    pub poll_interval: Duration,
    /// Backoff while the database is unavailable.
    pub db_retry: RetryPolicy,
    /// How long shutdown waits for in-flight work before abandoning it.
    pub shutdown_timeout: Duration,
    /// Told of every apply commit (the benchmark measures latency with it).
    pub observer: Option<CommitObserver>,
    /// Counter folding and retention.
    pub maintenance: MaintenanceConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            workers: 4,
            relays: 2,
            apply: ApplyConfig::default(),
            relay: RelayConfig::default(),
            poll_interval: Duration::from_millis(500),
            db_retry: RetryPolicy::default(),
            shutdown_timeout: Duration::from_secs(30),
            observer: None,
            maintenance: MaintenanceConfig::default(),
        }
    }
}

/// How the worker stopped after a shutdown request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stopped {
    /// Apply tasks still inside a pass at the deadline (their transactions rolled back).
    pub abandoned_apply_tasks: usize,
    /// Relay tasks still inside a pass at the deadline.
    pub abandoned_relay_tasks: usize,
    /// Events whose leases were given back at the deadline.
    pub leases_released: u64,
}

/// Runs until `health`'s shutdown token is cancelled, then stops in order
/// (see the module docs), reporting to `health` (which the admin server
/// reads). The one entry point of the worker: `run`, `demo` and `bench` all
/// start it here. An `Err` means a task died (see "Supervision"): the
/// process should exit non-zero.
pub async fn run(
    pool: PgPool,
    outlets: impl Into<Outlets>,
    config: WorkerConfig,
    health: Arc<Health>,
) -> Result<Stopped> {
    let outlets = outlets.into();
    let shutdown = health.shutdown_token();
    let wakers = Wakers::default();
    // The operator's pause, read before anything starts: a replica started
    // while paused stays idle from its first pass.
    let paused = Arc::new(Paused::default());
    paused.update(&controls::read(&mut *pool.acquire().await?).await?);
    let mut background = JoinSet::new();
    background.spawn(watch_controls(pool.clone(), paused.clone(), wakers.clone(), shutdown.clone()));
    background.spawn(wakers.clone().listen(pool.clone(), shutdown.clone()));
    background.spawn(crate::maintenance::run(pool.clone(), config.maintenance, shutdown.clone(), config.db_retry));

    // The relay stops only after the apply tasks, so it can drain their last events.
    let relay_stop = CancellationToken::new();
    // The relay's own pool: its writes need not wait for the disk (see
    // `db::for_relay`), and its connections are never the ones
    // the apply tasks wait for.
    let per_destination = config.relays.max(1);
    // Each relay task claims on one connection and records each send in
    // flight on another.
    let per_relay = config.relay.passes_in_flight.max(1) + 1;
    let relay_pool = crate::db::for_relay(&pool, (per_destination * per_relay) as u32 + 1);
    // Each destination has relays of its own, so an outage of one never
    // delays another's deliveries. With several, the one wake-up for
    // written events is passed on to each destination's relays.
    let mut relays_of = Vec::new();
    for publisher in outlets.publishers {
        // The destination's relay tasks share their calls in flight.
        let calls = publisher.concurrency() * per_destination;
        let publisher = publisher.with_calls_in_flight(calls);
        let wake = if outlets.routing.routes().len() == 1 { wakers.outbox.clone() } else { Default::default() };
        let relay = Arc::new(
            Relay::new(relay_pool.clone(), publisher, config.relay.clone(), wake)
                .routed(&outlets.routing, wakers.outbox.clone())
                .with_health(health.clone())
                .pausable(paused.clone()),
        );
        relays_of.push(relay);
    }
    // A transfer batch's events go straight to the relay whose destination
    // alone takes them, if one does (see `outbox::handoff`).
    let handoff_relay = relays_of.iter().find(|r| r.takes_handoffs()).cloned();
    let mut appliers = JoinSet::new();
    // What one apply task learns about accounts held elsewhere, all know.
    let busy = Arc::new(BusyAccounts::default());
    let timing = Timing { poll_interval: config.poll_interval, outage_retry: config.db_retry };
    // One task at a time waits for more transfers at high rates (see
    // `transfer::gather`), and above that rate the process polls instead of
    // asking producers for a NOTIFY per insert (see `transfer::polling`).
    let gather = config.apply.gather();
    // Its own set: at shutdown it is waited for (it hands its lease back),
    // not aborted with the other background tasks.
    let mut poller = JoinSet::new();
    poller.spawn(crate::transfer::polling::run(pool.clone(), gather.clone(), wakers.work.clone(), shutdown.clone()));
    for _ in 0..config.workers.max(1) {
        let mut applier = Applier::new(pool.clone(), config.apply.clone())
            .with_timing(timing)
            .woken_by(wakers.work.clone())
            .sharing_busy_accounts(busy.clone())
            .gathering_with(gather.clone())
            .waking_on_events(wakers.outbox.clone())
            .with_refund_hint(wakers.refunds.clone())
            .pausable(paused.clone())
            .observing(config.observer.clone());
        if let Some(relay) = &handoff_relay {
            applier = applier.handing_events_to(relay.clone());
        }
        appliers.spawn(service::run(Arc::new(applier), shutdown.clone()));
    }

    if relays_of.len() > 1 {
        let wakes: Vec<_> = relays_of.iter().map(|r| r.wake()).collect();
        background.spawn(fan_out(wakers.outbox.clone(), wakes, shutdown.clone()));
    }
    let mut relays = JoinSet::new();
    for relay in &relays_of {
        for _ in 0..per_destination {
            relays.spawn(service::run(relay.clone(), relay_stop.clone()));
        }
    }
    tracing::info!(workers = config.workers, relays = config.relays, "worker running");

    let died = service::watch(
        &shutdown,
        &mut [
            ("an apply task", &mut appliers),
            ("a relay task", &mut relays),
            ("a background task (LISTEN, upkeep)", &mut background),
            ("the poller", &mut poller),
        ],
    )
    .await;
    if let Some(why) = died {
        shutdown.cancel();
        relay_stop.cancel();
        tracing::error!(%why, "a worker task died; stopping the process so that it is restarted");
        appliers.abort_all();
        relays.abort_all();
        background.abort_all();
        poller.abort_all();
        for relay in &relays_of {
            let _ = tokio::time::timeout(Duration::from_secs(1), relay.release_open_leases()).await;
        }
        return Err(Error::Failed(format!("{why}; the worker stopped")));
    }

    let deadline = Instant::now() + config.shutdown_timeout;
    let mut stopped = Stopped::default();
    // The poller stops at the signal and ends its lease (bounded to 1 s),
    // while the apply tasks finish their batches.
    if !join_until(&mut poller, deadline.min(Instant::now() + Duration::from_millis(1_500)), "the poller").await {
        poller.abort_all();
    }
    if !join_until(&mut appliers, deadline, "apply task").await {
        stopped.abandoned_apply_tasks = appliers.len();
        tracing::warn!(
            tasks = appliers.len(),
            "shutdown deadline: abandoning apply tasks mid-pass; their open transactions roll back and their \
             transfers stay PENDING for the next worker (a COMMIT already sent may have landed: either way nothing is half-applied)"
        );
        appliers.abort_all();
    }
    relay_stop.cancel();
    // An idle relay stops at once when told; give it that moment even when
    // the apply tasks used up the whole bound.
    let relay_deadline = deadline.max(Instant::now() + Duration::from_millis(200));
    if join_until(&mut relays, relay_deadline, "relay task").await {
        futures::future::join_all(relays_of.iter().map(|r| r.drain_until(deadline))).await;
    } else {
        stopped.abandoned_relay_tasks = relays.len();
        relays.abort_all();
    }
    // Whatever the relays still had claimed (an abandoned send, a drain cut
    // short) goes back now rather than when its lease expires.
    for relay in &relays_of {
        match tokio::time::timeout(Duration::from_secs(1), relay.release_open_leases()).await {
            Ok(Ok(n)) => stopped.leases_released += n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not give back the relay's leases; they expire on their own")
            }
            Err(_) => tracing::warn!("giving back the relay's leases timed out; they expire on their own"),
        }
    }
    if stopped.abandoned_relay_tasks > 0 || stopped.leases_released > 0 {
        tracing::warn!(
            tasks = stopped.abandoned_relay_tasks,
            events = stopped.leases_released,
            "shutdown deadline: the relay was stopped mid-pass; its claimed events stay pending and go out on the next start \
             (one SQS had already accepted goes out twice; consumers drop it by event_id)"
        );
    }
    background.abort_all();
    // Wait for the aborted tasks to be dropped, so their transactions are
    // released before the caller closes the pool.
    let cleanup = async {
        while appliers.join_next().await.is_some() {}
        while relays.join_next().await.is_some() {}
        while background.join_next().await.is_some() {}
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), cleanup).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), relay_pool.close()).await;
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        futures::future::join_all(relays_of.iter().map(|r| r.close())),
    )
    .await;
    tracing::info!(?stopped, "worker stopped");
    Ok(stopped)
}

/// Keeps `paused` up to date: on the NOTIFY `pause`/`resume` send, and at
/// least every [`CONTROL_POLL`] (a notification can be lost). A part just
/// resumed has its loops woken at once.
async fn watch_controls(pool: PgPool, paused: Arc<Paused>, wakers: Wakers, shutdown: CancellationToken) {
    loop {
        match pool.acquire().await {
            Ok(mut conn) => match controls::read(&mut conn).await {
                Ok(state) => {
                    for part in paused.update(&state) {
                        match part {
                            Part::Apply => wakers.work.notify_waiters(),
                            Part::Relay => wakers.outbox.notify_waiters(),
                        }
                    }
                    for part in Part::ALL {
                        crate::metrics::metrics().set_paused(part.as_str(), state.is_paused(part));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the pause state failed; keeping the last one"),
            },
            Err(e) => tracing::warn!(error = %e, "reading the pause state failed; keeping the last one"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wakers.control.notified() => {}
            _ = tokio::time::sleep(CONTROL_POLL) => {}
        }
    }
}

/// Passes each wake-up for written events on to every destination's relays.
async fn fan_out(
    written: Arc<tokio::sync::Notify>,
    relays: Vec<Arc<tokio::sync::Notify>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = written.notified() => relays.iter().for_each(|r| r.notify_one()),
        }
    }
}

/// The longest a replica goes without reading the pause state.
pub const CONTROL_POLL: Duration = Duration::from_secs(1);

/// Waits for every task of `set` until `deadline`; true if they all ended.
/// A task that panics while stopping is logged and counted as ended.
async fn join_until(set: &mut JoinSet<()>, deadline: Instant, what: &str) -> bool {
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(None) => return true,
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => tracing::error!(error = %e, "{what} failed while stopping"),
            Err(_) => return false,
        }
    }
}

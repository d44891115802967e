//! Applying work: PENDING transfers and REQUESTED refunds, the worker's
//! claim and the money movement. Both are a [`Step`]: the same algorithm with
//! their own columns and guard. This file is the algorithm; its rooms are
//! next to it: the statements in `store`, the account locks in `locks`, the
//! decision in `decide`, the pacing in `pacing`, spans and the metrics report
//! in `telemetry`.
//!
//! One pass of a step ([`Applier::run_step`]) is one transaction over a batch:
//!
//! 1. **claim** up to `batch_size` rows waiting for the step (transfer
//!    `status = 'PENDING'`, or `refund_status = 'REQUESTED'`) whose retry time
//!    has come, in id order, `FOR NO KEY UPDATE SKIP LOCKED`: concurrent workers
//!    (tasks or processes) take disjoint batches and never wait on each
//!    other's rows;
//! 2. **lock the accounts** involved in one statement, in ascending id order.
//!    Every writer of balances locks accounts this way and only after its
//!    transfer rows, so batches that share accounts queue up instead of
//!    deadlocking (and a deadlock, were one possible, is retried as transient);
//! 3. **decide** in memory, in id order, which rows succeed and which fail
//!    (insufficient funds, daily limit), tracking running balances;
//! 4. **write** set-based, in one statement (one round trip): an `UPDATE
//!    accounts ... FROM unnest(...)` for all balance changes, the rows moved
//!    out of the waiting state (guarded by it), and exactly one outbox event
//!    inserted per row it actually updated. Both counts are checked;
//! 5. commit. A crash anywhere before this rolls everything back, and the
//!    rows are claimed again: nothing is applied twice or lost.
//!
//! If the batch fails for a reason that is not transient (an overflow, a
//! constraint), nothing of it is applied; each row is then retried alone, so
//! one bad row cannot block or roll back the others. The one that still fails
//! has its attempt counted and is retried later with backoff; after
//! `max_attempts` it FAILS with reason `processing_error` and the error kept
//! in `last_error`. Transient failures (connection lost, deadlock,
//! serialization) count nothing: the pass is simply retried.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;

use crate::account::AccountId;
use crate::controls::{Part, Paused};
use crate::db::{self, Fault};
use crate::error::{Error, Result};
use crate::outbox::handoff::{Handed, Offer};
use crate::outbox::relay::Relay;
use crate::retry::RetryPolicy;
use crate::service::{Service, Timing};
use crate::transfer::busy::{BusyAccounts, TURN_WAIT};
use crate::transfer::decide::decide;
use crate::transfer::gather::{Gather, Turn};
use crate::transfer::locks::{lock_accounts, Locking, Locks};
use crate::transfer::pacing::Pacing;
use crate::transfer::step::{Claimed, Outcome};
use crate::transfer::store::End;
use crate::transfer::telemetry::{self, Finished, TracedRows};
use crate::transfer::{store, FailureReason, TransferId};

pub use crate::transfer::step::Step;
pub use crate::transfer::telemetry::{ApplyCounts, CommitObserver, Committed};

/// Tuning of the transfer applier.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// Transfers claimed per transaction (default 100).
    pub batch_size: i64,
    /// Unexpected errors before a transfer FAILS with `processing_error` (default 5).
    pub max_attempts: i32,
    /// Delay before a transfer that hit an unexpected error is tried again.
    pub retry: RetryPolicy,
    /// How many times a batch may leave a row for later because another
    /// batch holds one of its accounts, before the row waits for them in lock
    /// order (default 3). 0: every batch waits for all its accounts.
    pub max_skips: u32,
    /// Transfers a second (claimed by the process's apply tasks) above which
    /// a pass woken for new transfers first waits `gather_wait`, so that
    /// one batch carries several (default 200; 0: never). Above it, `run`
    /// also polls instead of asking for a NOTIFY per insert. See [`gather`]
    /// and [`polling`].
    ///
    /// [`gather`]: crate::transfer::gather
    /// [`polling`]: crate::transfer::polling
    pub gather_above: u32,
    /// How long such a pass waits, and the poller's tick (default 20 ms).
    pub gather_wait: Duration,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_size: 100,
            max_attempts: 5,
            retry: RetryPolicy::default(),
            max_skips: 3,
            gather_above: 200,
            gather_wait: Duration::from_millis(20),
        }
    }
}

impl ApplyConfig {
    /// The gathering state the apply tasks of one process share.
    pub fn gather(&self) -> Arc<Gather> {
        Arc::new(Gather::new(self.gather_above, self.gather_wait))
    }
}

/// The applier: one pass claims and applies a batch of transfers (and,
/// paced, of refunds).
pub struct Applier {
    /// The connection of its passes, kept between them (see [`db::Kept`]).
    conns: db::Kept,
    config: ApplyConfig,
    /// When to claim what (floors, skips, busy accounts, refund cadence).
    pacing: Pacing,
    /// Its loop's timing, and what wakes it (new work committed).
    timing: Timing,
    wake: Arc<Notify>,
    /// Woken after a batch that wrote events commits: the relay of this
    /// process, which then need not wait for a NOTIFY or its poll.
    events_written: Option<Arc<Notify>>,
    /// The relay of this process, offered a transfer batch's events before
    /// its write (see [`crate::outbox::handoff`]).
    relay: Option<Arc<Relay>>,
    observer: Option<CommitObserver>,
    /// The operator's pause (no new pass while apply is paused).
    paused: Option<Arc<Paused>>,
    /// Whether a woken pass waits first, shared by the process's apply tasks.
    gather: Arc<Gather>,
    /// Its last pass took a full batch: the next comes at once, not woken.
    after_full: AtomicBool,
}

impl Service for Applier {
    type Counts = ApplyCounts;
    const NAME: &'static str = "apply";

    /// One pass of each step: a batch of transfers, then (see
    /// `apply_pass`) a batch of refunds.
    fn run_once(&self) -> BoxFuture<'_, Result<ApplyCounts>> {
        Box::pin(self.apply_pass())
    }

    fn batch_size(&self) -> i64 {
        self.config.batch_size
    }

    fn timing(&self) -> Timing {
        self.timing
    }

    fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    fn record(&self, counts: &ApplyCounts) {
        telemetry::record(&counts.report);
    }
}

impl Applier {
    pub fn new(pool: PgPool, config: ApplyConfig) -> Self {
        let pacing = Pacing::new(config.max_skips);
        Applier {
            conns: db::Kept::new(pool),
            gather: config.gather(),
            after_full: AtomicBool::new(false),
            config,
            pacing,
            timing: Timing::default(),
            wake: Arc::new(Notify::new()),
            events_written: None,
            relay: None,
            observer: None,
            paused: None,
        }
    }

    /// Shares `gather` (see [`crate::transfer::gather`]) with the process's
    /// other apply tasks, instead of a state of its own.
    pub fn gathering_with(mut self, gather: Arc<Gather>) -> Self {
        self.gather = gather;
        self
    }

    /// Starts no pass while `paused` says apply is paused.
    pub fn pausable(mut self, paused: Arc<Paused>) -> Self {
        self.paused = Some(paused);
        self
    }

    /// How its loop polls and backs off while the database is down.
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// What wakes its loop (a NOTIFY of new work).
    pub fn woken_by(mut self, wake: Arc<Notify>) -> Self {
        self.wake = wake;
        self
    }

    /// Shares what this applier learns about accounts held elsewhere with
    /// the other apply tasks of the process (and theirs with it).
    pub fn sharing_busy_accounts(mut self, busy: Arc<BusyAccounts>) -> Self {
        self.pacing.share_busy(busy);
        self
    }

    /// Wakes `notify` whenever a batch that wrote events commits.
    pub fn waking_on_events(mut self, notify: Arc<Notify>) -> Self {
        self.events_written = Some(notify);
        self
    }

    /// Hands a transfer batch's events to `relay` when it takes them (see
    /// [`crate::outbox::handoff`]); it is not woken for those.
    pub fn handing_events_to(mut self, relay: Arc<Relay>) -> Self {
        self.relay = Some(relay);
        self
    }

    /// Looks for refunds only when `hint` is set (and every `REFUND_POLL`).
    pub fn with_refund_hint(mut self, hint: Arc<AtomicBool>) -> Self {
        self.pacing.set_refund_hint(hint);
        self
    }

    /// Reports every commit that finished rows to `observer`.
    pub fn observing(mut self, observer: Option<CommitObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// One pass of each step: a batch of transfers, then, as the pacing
    /// says, a batch of refunds. Unless the last pass took a full batch, it
    /// may first wait for more transfers, or leave them to the task already
    /// waiting (see [`crate::transfer::gather`]). An `Err` is a transient
    /// database failure; what committed before it stays.
    async fn apply_pass(&self) -> Result<ApplyCounts> {
        if self.paused.as_ref().is_some_and(|p| p.is_paused(Part::Apply)) {
            return Ok(ApplyCounts::default());
        }
        if !self.after_full.load(Ordering::Relaxed) && self.gather.turn().await == Turn::Skip {
            return Ok(ApplyCounts::default());
        }
        let mut counts = self.run_step(Step::Transfer).await.map_err(|e| e.at("applying a batch of transfers"))?;
        self.gather.claimed(counts.claimed);
        let backlog = counts.claimed as i64 >= self.config.batch_size;
        self.after_full.store(backlog, Ordering::Relaxed);
        if self.pacing.look_for_refunds(backlog) {
            let refunds = self.run_step(Step::Refund).await.map_err(|e| e.at("applying a batch of refunds"))?;
            self.pacing.refunds_found(refunds.claimed);
            counts += refunds;
        }
        Ok(counts)
    }

    /// Claims and applies one batch of `step`: in two round trips
    /// (`store::begin_and_claim`, then the write and its COMMIT), unless a
    /// row must wait its turn for its accounts (then the locks are taken
    /// between them, in order).
    pub async fn run_step(&self, step: Step) -> Result<ApplyCounts> {
        let started = Instant::now();
        let limit = self.config.batch_size;
        let mut conn = self.conns.take().await?;
        // SKIP LOCKED: a row another worker holds is simply not ours this time.
        let busy = self.pacing.busy().current();
        let lock_with_claim = self.config.max_skips > 0 && !self.pacing.turns_due(step);
        // Dropped from here until the transaction ends (an error, a shutdown
        // deadline), the connection is closed, and the transaction with it.
        conn.transaction_opened();
        let claim =
            store::begin_and_claim(&mut conn, step, limit, self.pacing.floor(step), &busy, lock_with_claim).await?;
        let claimed = claim.rows;
        self.pacing.set_floor(step, &claimed, limit);
        if claimed.is_empty() {
            store::end(&mut conn, End::Commit).await?;
            conn.transaction_ended();
            conn.give_back();
            return Ok(ApplyCounts::default());
        }
        let must_wait = self.pacing.must_wait(step, &claimed);
        let locking = match (claim.accounts, self.config.max_skips) {
            (Some(taken), _) => Locking::Taken(taken),
            (None, 0) => Locking::Wait,
            (None, _) => Locking::SkipLocked { must_wait: &must_wait },
        };
        let traced = TracedRows::open(step, &claimed);
        let offer = self.relay.as_ref().filter(|_| step == Step::Transfer).and_then(|r| r.offer(claimed.len()));
        match apply_claimed(&mut conn, step, &claimed, locking, Then::Commit(offer.as_ref())).await {
            Ok(mut applied) => {
                conn.transaction_ended();
                conn.give_back();
                traced.close(step, &applied.finished);
                let handed = self.hand_over(offer, applied.handed.take(), &claimed);
                self.committed(step, &applied.finished, started, &mut applied.counts, !handed);
                self.pacing.note_skips(step, &claimed, &applied.skipped);
                self.pacing.note_locks(&applied.locks);
                Ok(applied.counts)
            }
            Err(e) => match fault(&e) {
                // The database itself is in trouble: nothing a row did; the
                // whole pass is retried with backoff.
                Fault::Unavailable => Err(e),
                // A row's fault, or a lock someone else holds too long on
                // some of the accounts: one by one, so that only the rows
                // concerned are held back and the others go through.
                Fault::Row | Fault::Contention => {
                    store::end(&mut conn, End::Rollback).await?;
                    conn.transaction_ended();
                    conn.give_back();
                    let mut counts = ApplyCounts::default();
                    if let Some(db_err) = e.sql().filter(|e| db::fault(e) == Fault::Contention) {
                        counts.report.db_retries.push(db::sqlstate(db_err));
                    }
                    tracing::warn!(error = %e, ?step, rows = claimed.len(), "batch failed; applying its rows one by one");
                    for t in &claimed {
                        let one = self.apply_alone(step, t.id).await;
                        counts += one.map_err(|e| e.at(format_args!("applying {} {} alone", step.name(), t.id)))?;
                    }
                    Ok(counts)
                }
            },
        }
    }

    /// The per-row path: the row in its own transaction. If that fails
    /// because of the row itself, the attempt is counted (and the row FAILS
    /// for good after `max_attempts`); if it fails on contention (a lock
    /// timeout, a statement timeout, a deadlock), the row is only put off,
    /// never counted: it is not the transfer's fault.
    async fn apply_alone(&self, step: Step, id: TransferId) -> Result<ApplyCounts> {
        let started = Instant::now();
        let mut conn = self.conns.take().await?;
        let mut tx = Connection::begin(&mut *conn).await?;
        let Some(t) = store::claim_one(&mut tx, step, id).await? else {
            tx.rollback().await?;
            conn.give_back();
            return Ok(ApplyCounts::default()); // another worker has it, or it is done
        };
        // An account known to be held elsewhere: no need to wait to know.
        let busy: Vec<AccountId> = t.accounts().into_iter().filter(|a| self.pacing.busy().is_busy(*a)).collect();
        if !busy.is_empty() {
            tx.rollback().await?;
            conn.give_back();
            return self.put_off_held(step, &t, &busy).await;
        }
        let traced = TracedRows::open(step, std::slice::from_ref(&t));
        // Its turn: it waits for its accounts, but at most TURN_WAIT.
        let turn = HashSet::from([t.id]);
        let locking = Locking::SkipLocked { must_wait: &turn };
        match apply_claimed(&mut tx, step, std::slice::from_ref(&t), locking, Then::Stay).await {
            Ok(applied) if applied.finished.is_empty() => {
                tx.rollback().await?;
                conn.give_back();
                self.pacing.note_locks(&applied.locks);
                self.put_off_held(step, &t, &applied.locks.held_elsewhere).await
            }
            Ok(mut applied) => {
                tx.commit().await?;
                conn.give_back();
                traced.close(step, &applied.finished);
                self.committed(step, &applied.finished, started, &mut applied.counts, true);
                self.pacing.note_locks(&applied.locks);
                Ok(applied.counts)
            }
            Err(e) => match fault(&e) {
                Fault::Unavailable => Err(e),
                Fault::Contention => {
                    tx.rollback().await?;
                    conn.give_back();
                    self.put_off(step, &t, &e).await
                }
                Fault::Row => {
                    tx.rollback().await?;
                    conn.give_back();
                    self.record_error(step, &t, &e).await
                }
            },
        }
    }

    /// Gives the relay the events a committed batch wrote under its offer;
    /// whether it did.
    fn hand_over(&self, offer: Option<Offer>, handed: Option<Handed>, claimed: &[Claimed]) -> bool {
        let (Some(relay), Some(offer), Some(mut handed)) = (&self.relay, offer, handed) else { return false };
        for e in &mut handed.events {
            let row = claimed.binary_search_by_key(&e.transfer_id, |t| t.id).ok();
            e.traceparent = row.and_then(|i| claimed[i].traceparent.clone());
        }
        relay.take(offer, handed);
        true
    }

    /// After a commit that moved `finished` out of `step`'s waiting state:
    /// wakes the relay (unless it was handed the events), reports to the
    /// observer, and notes it in the pass's report.
    fn committed(&self, step: Step, finished: &[Finished], started: Instant, counts: &mut ApplyCounts, wake: bool) {
        if finished.is_empty() {
            return;
        }
        if let Some(n) = self.events_written.as_ref().filter(|_| wake) {
            n.notify_one();
        }
        if let Some(o) = &self.observer {
            let ids = finished.iter().map(|f| f.id.0).collect();
            let _ = o.send(Committed { step, ids, at: std::time::SystemTime::now() });
        }
        counts.report.committed(step, finished, started.elapsed());
    }

    /// Retries a row that met contention later, without counting an attempt.
    async fn put_off(&self, step: Step, t: &Claimed, err: &Error) -> Result<ApplyCounts> {
        let mut counts = self.put_off_with(step, t, &format!("{err} (contention: retried, not counted)")).await?;
        if let Some(db_err) = err.sql() {
            counts.report.db_retries.push(db::sqlstate(db_err));
        }
        Ok(counts)
    }

    /// Retries a row whose accounts another session holds later, without
    /// counting an attempt.
    async fn put_off_held(&self, step: Step, t: &Claimed, held: &[AccountId]) -> Result<ApplyCounts> {
        let held: Vec<i64> = held.iter().map(|a| a.0).collect();
        let note = format!(
            "account(s) {held:?} held by another session (lock not granted within {} ms, lock_timeout): \
             put off, not counted",
            TURN_WAIT.as_millis()
        );
        self.put_off_with(step, t, &note).await
    }

    async fn put_off_with(&self, step: Step, t: &Claimed, note: &str) -> Result<ApplyCounts> {
        let delay = self.config.retry.delay_for_attempt(CONTENTION_RETRY_ATTEMPT);
        tracing::warn!(transfer_id = t.id.0, ?step, retry_in = ?delay, why = note, "contention; put off, not counted");
        let mut conn = self.conns.take().await?;
        store::put_off(&mut conn, step, t.id, delay, note).await?;
        conn.give_back();
        Ok(ApplyCounts { claimed: 1, put_off: 1, ..Default::default() })
    }

    async fn record_error(&self, step: Step, t: &Claimed, err: &Error) -> Result<ApplyCounts> {
        let mut conn = self.conns.take().await?;
        let mut tx = Connection::begin(&mut *conn).await?;
        // The row lock taken by the UPDATE makes the count exact even if
        // another worker hit the same error at the same time.
        let Some(attempt) = store::record_error(&mut tx, step, t.id, &err.to_string()).await? else {
            tx.commit().await?;
            conn.give_back();
            return Ok(ApplyCounts::default());
        };
        let mut counts = ApplyCounts { claimed: 1, ..Default::default() };
        if attempt >= self.config.max_attempts {
            tracing::error!(transfer_id = t.id.0, ?step, attempt, error = %err, "failed for good after repeated errors");
            let started = Instant::now();
            let outcome = Outcome::Failed(FailureReason::ProcessingError);
            let money = store::Money::default();
            counts.failed = store::finish(&mut tx, step, &[(t.id, outcome)], &money, false, None).await?.rows as usize;
            tx.commit().await?;
            conn.give_back();
            let failed = Finished { id: t.id, outcome, created_epoch: t.created_epoch };
            self.committed(step, &[failed], started, &mut counts, true);
            return Ok(counts);
        }
        let delay = self.config.retry.delay_for_attempt(attempt as u32);
        tracing::warn!(transfer_id = t.id.0, ?step, attempt, retry_in = ?delay, error = %err, "errored; will retry");
        store::put_off(&mut tx, step, t.id, delay, &err.to_string()).await?;
        counts.errored = 1;
        tx.commit().await?;
        conn.give_back();
        Ok(counts)
    }
}

/// A row put off for contention waits about as long as a row on its third
/// counted error would (400 ms with the default policy, with jitter).
const CONTENTION_RETRY_ATTEMPT: u32 = 3;

fn fault(e: &Error) -> Fault {
    e.sql().map(db::fault).unwrap_or(Fault::Row)
}

/// What [`apply_claimed`] did, for the caller to commit and report.
struct Applied {
    counts: ApplyCounts,
    /// Rows left PENDING because another transaction held one of their accounts.
    skipped: Vec<TransferId>,
    finished: Vec<Finished>,
    /// What the batch learnt about its accounts (the locked rows themselves
    /// are not kept).
    locks: Locks,
    /// The events written leased to the relay offered them.
    handed: Option<Handed>,
}

/// Whether [`apply_claimed`] ends the transaction.
#[derive(Clone, Copy)]
enum Then<'a> {
    /// With its write, in the same message (the caller's transaction is
    /// `store::begin_and_claim`'s), the events handed to the relay that
    /// offered to take them, if one did.
    Commit(Option<&'a Offer>),
    /// The caller commits (a sqlx transaction).
    Stay,
}

/// Steps 2 to 4 for rows claimed (locked) by the caller's transaction; with
/// [`Then::Commit`], an `Ok` means committed. The write checks its own
/// counts (see `store::finish`): a mismatch, which cannot happen while the
/// batch holds its row locks, fails it rather than move money without its
/// state change.
async fn apply_claimed(
    conn: &mut PgConnection,
    step: Step,
    claimed: &[Claimed],
    locking: Locking<'_>,
    then: Then<'_>,
) -> Result<Applied> {
    let skip_locked = !matches!(locking, Locking::Wait);
    let mut locks = lock_accounts(conn, claimed, locking).await?;
    let (ready, skipped): (Vec<Claimed>, Vec<Claimed>) = match skip_locked {
        false => (claimed.to_vec(), Vec::new()),
        true => claimed.iter().cloned().partition(|t| locks.covers(t)),
    };
    let skipped: Vec<TransferId> = skipped.into_iter().map(|t| t.id).collect();
    let accounts = std::mem::take(&mut locks.accounts);
    let mut counts = ApplyCounts { claimed: claimed.len(), skipped: skipped.len(), ..Default::default() };
    if let Some(sqlstate) = locks.waited_out.clone() {
        counts.report.db_retries.push(Some(sqlstate));
    }
    if ready.is_empty() {
        if let Then::Commit(_) = then {
            store::end(conn, End::Commit).await?;
        }
        return Ok(Applied { counts, skipped, finished: Vec::new(), locks, handed: None });
    }

    // Step 3. Daily limits bound what leaves an account by transfer; a
    // refund moves money back and is neither limited nor counted.
    let plan = decide(&ready, &accounts, step == Step::Transfer)?;

    // Step 4, one statement: the balances, the rows' new state, their events.
    let money = store::Money {
        accounts: plan.changes.iter().map(|c| c.account.0).collect(),
        deltas: plan.changes.iter().map(|c| c.delta).collect(),
        spent: plan.changes.iter().map(|c| c.spent).collect(),
    };
    let (commit, hand_to) = match then {
        Then::Commit(offer) => (true, offer),
        Then::Stay => (false, None),
    };
    let handed = store::finish(conn, step, &plan.outcomes, &money, commit, hand_to).await?.handed;
    counts.succeeded = plan.outcomes.iter().filter(|(_, o)| *o == Outcome::Succeeded).count();
    counts.failed = ready.len() - counts.succeeded;
    let finished = plan
        .outcomes
        .iter()
        .zip(&ready)
        .map(|((id, outcome), t)| Finished { id: *id, outcome: *outcome, created_epoch: t.created_epoch })
        .collect();
    Ok(Applied { counts, skipped, finished, locks, handed })
}

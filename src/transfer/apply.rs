//! Applying work: PENDING transfers and REQUESTED refunds, the worker's
//! claim and the money movement. Both are a [`Step`]: the same algorithm with
//! their own columns and guard.
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
//! 4. **write** set-based: one `UPDATE accounts ... FROM unnest(...)` for all
//!    balance changes, and one statement that moves the rows out of the
//!    waiting state (guarded by it) and inserts exactly one outbox event per
//!    row it actually updated. Both row counts are checked;
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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

use crate::db::{self, Fault};
use crate::error::{Error, Result};
use crate::metrics::metrics;
use crate::retry::RetryPolicy;
use crate::service::{Progress, Service};
use crate::transfer::busy::{BusyAccounts, TURN_WAIT};
use crate::transfer::store::{Claimed, Outcome};
use crate::transfer::{reason, TraceParent};
use futures::future::BoxFuture;

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
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig { batch_size: 100, max_attempts: 5, retry: RetryPolicy::default(), max_skips: 3 }
    }
}

/// Rows of one step that a committed transaction moved out of their waiting
/// state, and when it committed: for observers (the benchmark's latency).
#[derive(Debug, Clone)]
pub struct Committed {
    pub step: Step,
    pub ids: Vec<i64>,
    pub at: std::time::SystemTime,
}

/// Where an [`Applier`] reports what it committed.
pub type CommitObserver = tokio::sync::mpsc::UnboundedSender<Committed>;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyCounts {
    pub claimed: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Hit an unexpected error; attempt counted, retried later.
    pub errored: usize,
    /// Met contention (a lock held elsewhere, a timeout); retried later,
    /// not counted.
    pub put_off: usize,
    /// Left PENDING by this pass because another batch held one of their
    /// accounts (taken by a later pass; never counted).
    pub skipped: usize,
}

impl Progress for ApplyCounts {
    fn claimed(&self) -> usize {
        self.claimed
    }
}

impl Service for Applier {
    type Counts = ApplyCounts;
    const NAME: &'static str = "apply";

    /// One pass of each step: a batch of transfers, then (see
    /// [`Applier::apply_pass`]) a batch of refunds.
    fn run_once(&self) -> BoxFuture<'_, Result<ApplyCounts>> {
        Box::pin(self.apply_pass())
    }

    fn batch_size(&self) -> i64 {
        self.config.batch_size
    }
}

impl std::ops::AddAssign for ApplyCounts {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.errored += o.errored;
        self.put_off += o.put_off;
        self.skipped += o.skipped;
    }
}

/// The two kinds of work the applier does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// PENDING -> SUCCEEDED | FAILED: `amount` from `from_account` to `to_account`.
    Transfer,
    /// refund REQUESTED -> COMPLETED | FAILED: `refund_amount` back from
    /// `to_account` to `from_account`.
    Refund,
}

impl Step {
    /// For logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Step::Transfer => "transfer",
            Step::Refund => "refund",
        }
    }
}

/// An account as a batch read it under its row lock.
#[derive(Debug)]
pub(crate) struct LockedAccount {
    pub id: i64,
    pub balance: i64,
    pub daily_limit: Option<i64>,
    /// What left it by transfer so far on the current UTC day (every
    /// account keeps this, limited or not: a limit may be set at any time).
    pub spent_today: i64,
}

pub struct Applier {
    pool: PgPool,
    config: ApplyConfig,
    /// Where each step's next claim starts scanning (see [`ClaimFloor`]).
    floors: std::sync::Mutex<[ClaimFloor; 2]>,
    /// Woken after a batch that wrote events commits: the relay of this
    /// process, which then need not wait for a NOTIFY or its poll.
    events_written: Option<Arc<Notify>>,
    /// Per step, how often each row was skipped for a held account.
    skips: std::sync::Mutex<[HashMap<i64, u32>; 2]>,
    /// Passes run, to look for refunds every so often during a backlog.
    passes: std::sync::atomic::AtomicU64,
    observer: Option<CommitObserver>,
    refund_hint: Option<Arc<std::sync::atomic::AtomicBool>>,
    last_refund_look: std::sync::Mutex<Instant>,
    /// Accounts another session holds: claims leave their transfers alone
    /// for a while (shared by the process's apply tasks; see [`BusyAccounts`]).
    busy: Arc<BusyAccounts>,
}

/// With a refund hint, refunds are looked for at least this often.
const REFUND_POLL: Duration = Duration::from_millis(500);

/// During a backlog of transfers, one pass in this many also looks for refunds.
const REFUND_EVERY: u64 = 8;

/// Bound on the skip bookkeeping.
const MAX_TRACKED_SKIPS: usize = 100_000;

/// Where a claim starts in the pending index. Rows a batch moves out of
/// PENDING leave dead entries at the head of the partial index until vacuum
/// removes them, and a claim from the start walks past all of them: with a
/// large backlog that walk grows with every batch. While batches come back
/// full, the next claim starts at the lowest id the last one took; anything
/// below was done, put off, or held by another worker then. Rows that become
/// claimable below the floor (a retry time passing, a batch rolled back, a
/// producer committing late) are found when the floor resets: as soon as a
/// claim comes back short, and at least every [`FLOOR_TTL`].
#[derive(Debug, Clone, Copy)]
struct ClaimFloor {
    id: i64,
    since: Instant,
}

/// The longest a claim floor stands before a claim scans from the start again.
const FLOOR_TTL: Duration = Duration::from_secs(1);

impl Applier {
    pub fn new(pool: PgPool, config: ApplyConfig) -> Self {
        let start = ClaimFloor { id: 0, since: Instant::now() };
        Applier {
            pool,
            config,
            floors: std::sync::Mutex::new([start, start]),
            events_written: None,
            skips: std::sync::Mutex::new([HashMap::new(), HashMap::new()]),
            passes: std::sync::atomic::AtomicU64::new(0),
            observer: None,
            refund_hint: None,
            last_refund_look: std::sync::Mutex::new(Instant::now()),
            busy: Arc::new(BusyAccounts::default()),
        }
    }

    /// Shares what this applier learns about accounts held elsewhere with
    /// the other apply tasks of the process (and theirs with it).
    pub fn sharing_busy_accounts(mut self, busy: Arc<BusyAccounts>) -> Self {
        self.busy = busy;
        self
    }

    /// Wakes `notify` whenever a batch that wrote events commits.
    pub fn waking_on_events(mut self, notify: Arc<Notify>) -> Self {
        self.events_written = Some(notify);
        self
    }

    fn floor(&self, step: Step) -> i64 {
        let floors = self.floors.lock().expect("floor lock");
        let f = floors[step as usize];
        if f.id > 0 && f.since.elapsed() < FLOOR_TTL {
            f.id
        } else {
            0
        }
    }

    fn set_floor(&self, step: Step, claimed: &[Claimed], limit: i64) {
        let mut floors = self.floors.lock().expect("floor lock");
        let f = &mut floors[step as usize];
        match claimed.iter().map(|t| t.id).min() {
            Some(lowest) if claimed.len() as i64 >= limit => {
                if f.id == 0 || f.since.elapsed() >= FLOOR_TTL {
                    f.since = Instant::now();
                }
                f.id = lowest;
            }
            _ => f.id = 0,
        }
    }

    /// One pass of each step: a batch of transfers, then a batch of refunds.
    /// An `Err` is a transient database failure; what committed before it stays.
    ///
    /// While transfers come in full batches (a backlog), refunds are looked
    /// for on every [`REFUND_EVERY`]th pass only: each look is three round
    /// trips, and the next pass comes at once anyway. Otherwise every pass
    /// looks, so a refund never waits behind an idle worker.
    ///
    /// With a refund hint (the `run` loop's), refunds are looked for only when
    /// a refund was requested, when the last look found some, or at least
    /// every [`REFUND_POLL`] (a notification can be lost): a look is three
    /// round trips, and at 1,000 passes a second they add up.
    async fn apply_pass(&self) -> Result<ApplyCounts> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut counts = self.run_step(Step::Transfer).await.map_err(|e| e.at("applying a batch of transfers"))?;
        let backlog = counts.claimed as i64 >= self.config.batch_size;
        let pass = self.passes.fetch_add(1, Relaxed);
        let due = !backlog || pass % REFUND_EVERY == 0;
        let look = match &self.refund_hint {
            None => due,
            Some(hint) => {
                let overdue = self.last_refund_look.lock().expect("refund look").elapsed() >= REFUND_POLL;
                (hint.swap(false, Relaxed) || overdue) && (due || overdue)
            }
        };
        if look {
            *self.last_refund_look.lock().expect("refund look") = Instant::now();
            let refunds = self.run_step(Step::Refund).await.map_err(|e| e.at("applying a batch of refunds"))?;
            if refunds.claimed > 0 {
                if let Some(hint) = &self.refund_hint {
                    hint.store(true, Relaxed);
                }
            }
            counts += refunds;
        }
        Ok(counts)
    }

    /// Looks for refunds only when `hint` is set (and every [`REFUND_POLL`]).
    pub fn with_refund_hint(mut self, hint: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.refund_hint = Some(hint);
        self
    }

    /// Claims and applies one batch of `step`.
    pub async fn run_step(&self, step: Step) -> Result<ApplyCounts> {
        let started = Instant::now();
        let mut tx = self.pool.begin_with(db::BEGIN_CLAIM).await?;
        // SKIP LOCKED: a row another worker holds is simply not ours this time.
        let busy = self.busy.current();
        let claimed = step.claim(&mut tx, self.config.batch_size, self.floor(step), &busy).await?;
        self.set_floor(step, &claimed, self.config.batch_size);
        if claimed.is_empty() {
            tx.commit().await?;
            return Ok(ApplyCounts::default());
        }
        let must_wait = self.must_wait(step, &claimed);
        let locking =
            if self.config.max_skips == 0 { Locking::Wait } else { Locking::SkipLocked { must_wait: &must_wait } };
        let traced = TracedRows::open(step, &claimed);
        match apply_claimed(&mut tx, step, &claimed, locking).await {
            Ok(applied) => {
                tx.commit().await?;
                traced.close(step, &applied);
                self.committed(step, &applied.finished, started);
                self.note_skips(step, &claimed, &applied.skipped);
                self.note_locks(&applied.locks);
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
                    tx.rollback().await?;
                    if let Some(db_err) = e.sql() {
                        if db::fault(db_err) == Fault::Contention {
                            metrics().db_retry(db::sqlstate(db_err).as_deref());
                        }
                    }
                    tracing::warn!(error = %e, ?step, rows = claimed.len(), "batch failed; applying its rows one by one");
                    let mut counts = ApplyCounts::default();
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
    async fn apply_alone(&self, step: Step, id: i64) -> Result<ApplyCounts> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let Some(t) = step.claim_one(&mut tx, id).await? else {
            return Ok(ApplyCounts::default()); // another worker has it, or it is done
        };
        // An account known to be held elsewhere: no need to wait to know.
        let busy: Vec<i64> =
            [t.debit_account, t.credit_account].into_iter().filter(|a| self.busy.is_busy(*a)).collect();
        if !busy.is_empty() {
            tx.rollback().await?;
            return self.put_off_held(step, &t, &busy).await;
        }
        let traced = TracedRows::open(step, std::slice::from_ref(&t));
        // Its turn: it waits for its accounts, but at most TURN_WAIT.
        let turn = HashSet::from([t.id]);
        match apply_claimed(&mut tx, step, std::slice::from_ref(&t), Locking::SkipLocked { must_wait: &turn }).await {
            Ok(applied) if applied.finished.is_empty() => {
                tx.rollback().await?;
                self.note_locks(&applied.locks);
                self.put_off_held(step, &t, &applied.locks.held_elsewhere).await
            }
            Ok(applied) => {
                tx.commit().await?;
                traced.close(step, &applied);
                self.committed(step, &applied.finished, started);
                self.note_locks(&applied.locks);
                Ok(applied.counts)
            }
            Err(e) => match fault(&e) {
                Fault::Unavailable => Err(e),
                Fault::Contention => {
                    tx.rollback().await?;
                    self.put_off(step, &t, &e).await
                }
                Fault::Row => {
                    tx.rollback().await?;
                    self.record_error(step, &t, &e).await
                }
            },
        }
    }

    /// What a batch learnt about its accounts, for the claims that follow.
    fn note_locks(&self, locks: &Locks) {
        self.busy.held(&locks.held_elsewhere);
        self.busy.skipped(&locks.not_taken);
        self.busy.taken(locks.taken.iter().copied());
    }

    /// The claimed rows that were skipped `max_skips` times already: this
    /// time they wait for their accounts.
    fn must_wait(&self, step: Step, claimed: &[Claimed]) -> HashSet<i64> {
        let skips = self.skips.lock().expect("skips lock");
        let max = self.config.max_skips;
        claimed.iter().filter(|t| skips[step as usize].get(&t.id).is_some_and(|n| *n >= max)).map(|t| t.id).collect()
    }

    fn note_skips(&self, step: Step, claimed: &[Claimed], skipped: &[i64]) {
        let mut skips = self.skips.lock().expect("skips lock");
        let map = &mut skips[step as usize];
        let skipped: HashSet<i64> = skipped.iter().copied().collect();
        for t in claimed.iter().filter(|t| !skipped.contains(&t.id)) {
            map.remove(&t.id);
        }
        if map.len() > MAX_TRACKED_SKIPS {
            // Rows that other workers applied since: forget them all; the
            // worst case is a few more skips before a row waits its turn.
            map.clear();
        }
        for id in skipped {
            *map.entry(id).or_default() += 1;
        }
    }

    /// Reports every commit that finished rows to `observer`.
    pub fn observing(mut self, observer: Option<CommitObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// After a commit that moved `finished` out of `step`'s waiting state:
    /// wakes the relay, reports to the observer, counts in the metrics, and
    /// at debug level logs the ids.
    fn committed(&self, step: Step, finished: &[Finished], started: Instant) {
        if finished.is_empty() {
            return;
        }
        if let Some(n) = &self.events_written {
            n.notify_one();
        }
        let now = std::time::SystemTime::now();
        if let Some(o) = &self.observer {
            let _ = o.send(Committed { step, ids: finished.iter().map(|f| f.id).collect(), at: now });
        }
        let m = metrics();
        m.apply_batch(step.name(), finished.len(), started.elapsed());
        let now_epoch = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        for f in finished {
            let (outcome, reason) = step.outcome_name(f.outcome);
            match step {
                Step::Transfer => {
                    m.transfer_finished(outcome, reason);
                    m.applied_after(Duration::from_secs_f64((now_epoch - f.created_epoch).max(0.0)));
                }
                Step::Refund => m.refund_finished(outcome, reason),
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let ids: Vec<i64> = finished.iter().map(|f| f.id).collect();
            tracing::debug!(step = step.name(), transfer_ids = ?ids, took_ms = started.elapsed().as_secs_f64() * 1e3, "batch applied");
        }
    }

    /// Retries a row that met contention later, without counting an attempt.
    async fn put_off(&self, step: Step, t: &Claimed, err: &Error) -> Result<ApplyCounts> {
        if let Some(db_err) = err.sql() {
            metrics().db_retry(db::sqlstate(db_err).as_deref());
        }
        self.put_off_with(step, t, &format!("{err} (contention: retried, not counted)")).await
    }

    /// Retries a row whose accounts another session holds later, without
    /// counting an attempt.
    async fn put_off_held(&self, step: Step, t: &Claimed, held: &[i64]) -> Result<ApplyCounts> {
        let note = format!(
            "account(s) {held:?} held by another session (lock not granted within {} ms, lock_timeout): \
             put off, not counted",
            TURN_WAIT.as_millis()
        );
        self.put_off_with(step, t, &note).await
    }

    async fn put_off_with(&self, step: Step, t: &Claimed, note: &str) -> Result<ApplyCounts> {
        let delay = self.config.retry.delay_for_attempt(CONTENTION_RETRY_ATTEMPT);
        tracing::warn!(transfer_id = t.id, ?step, retry_in = ?delay, why = note, "contention; put off, not counted");
        let mut conn = self.pool.acquire().await?;
        step.put_off(&mut conn, t.id, delay, note).await?;
        Ok(ApplyCounts { claimed: 1, put_off: 1, ..Default::default() })
    }

    async fn record_error(&self, step: Step, t: &Claimed, err: &Error) -> Result<ApplyCounts> {
        let mut tx = self.pool.begin().await?;
        // The row lock taken by the UPDATE makes the count exact even if
        // another worker hit the same error at the same time.
        let Some(attempt) = step.record_error(&mut tx, t.id, &err.to_string()).await? else {
            tx.commit().await?;
            return Ok(ApplyCounts::default());
        };
        let mut counts = ApplyCounts { claimed: 1, ..Default::default() };
        if attempt >= self.config.max_attempts {
            tracing::error!(transfer_id = t.id, ?step, attempt, error = %err, "failed for good after repeated errors");
            let started = Instant::now();
            counts.failed = finish(&mut tx, step, &[(t.id, Outcome::Failed(reason::PROCESSING_ERROR))]).await?;
            tx.commit().await?;
            let failed = Finished {
                id: t.id,
                outcome: Outcome::Failed(reason::PROCESSING_ERROR),
                created_epoch: t.created_epoch,
            };
            self.committed(step, &[failed], started);
            return Ok(counts);
        } else {
            let delay = self.config.retry.delay_for_attempt(attempt as u32);
            tracing::warn!(transfer_id = t.id, ?step, attempt, retry_in = ?delay, error = %err, "errored; will retry");
            step.put_off(&mut tx, t.id, delay, &err.to_string()).await?;
            counts.errored = 1;
        }
        tx.commit().await?;
        Ok(counts)
    }
}

/// A row put off for contention waits about as long as a row on its third
/// counted error would (400 ms with the default policy, with jitter).
const CONTENTION_RETRY_ATTEMPT: u32 = 3;

fn fault(e: &Error) -> Fault {
    e.sql().map(db::fault).unwrap_or(Fault::Row)
}

/// How a batch takes its accounts' row locks.
#[derive(Debug, Clone, Copy)]
enum Locking<'a> {
    /// Wait for every account, in ascending id order (the per-row path).
    Wait,
    /// Take the accounts nobody holds (`SKIP LOCKED`) and apply only the rows
    /// whose accounts were all taken; the others stay PENDING for a later
    /// pass. Rows in `must_wait` (skipped too often already) wait their turn
    /// instead, so that a hot account cannot starve them, but at most
    /// [`TURN_WAIT`] (see [`wait_turn`]).
    SkipLocked { must_wait: &'a HashSet<i64> },
}

/// Steps 2 to 4 for rows claimed (locked) by the caller's transaction.
async fn apply_claimed(
    conn: &mut PgConnection,
    step: Step,
    claimed: &[Claimed],
    locking: Locking<'_>,
) -> Result<Applied> {
    let locks = lock_accounts(conn, claimed, locking).await?;
    let held: HashSet<i64> = locks.taken.iter().copied().collect();
    let (ready, skipped): (Vec<Claimed>, Vec<Claimed>) = match locking {
        Locking::Wait => (claimed.to_vec(), Vec::new()),
        Locking::SkipLocked { .. } => {
            claimed.iter().cloned().partition(|t| held.contains(&t.debit_account) && held.contains(&t.credit_account))
        }
    };
    let skipped: Vec<i64> = skipped.into_iter().map(|t| t.id).collect();
    let accounts = locks.accounts;
    let locks = Locks { accounts: Vec::new(), ..locks };
    if ready.is_empty() {
        let counts = ApplyCounts { claimed: claimed.len(), skipped: skipped.len(), ..Default::default() };
        return Ok(Applied { counts, skipped, finished: Vec::new(), locks });
    }
    let claimed = ready.as_slice();

    // Daily limits bound what leaves an account by transfer; a refund moves
    // money back and is neither limited nor counted.
    let plan = decide(claimed, &accounts, step == Step::Transfer)?;

    if !plan.changes.is_empty() {
        let ids: Vec<i64> = plan.changes.iter().map(|c| c.account).collect();
        let deltas: Vec<i64> = plan.changes.iter().map(|c| c.delta).collect();
        let spent: Vec<i64> = plan.changes.iter().map(|c| c.spent).collect();
        // The day's total follows the balance in the same statement, under
        // the same row lock: `now()` is this transaction's start, the same
        // instant the totals were read at. It saturates (an unlimited
        // account may send more than i64::MAX in a day; that is just "over
        // any limit").
        let updated = sqlx::query!(
            "UPDATE accounts a
                SET balance = a.balance + d.delta,
                    spent_today = CASE WHEN d.spent = 0 THEN a.spent_today
                                       WHEN a.spent_day = (now() AT TIME ZONE 'UTC')::date
                                       THEN LEAST(a.spent_today::numeric + d.spent, 9223372036854775807)::bigint
                                       ELSE d.spent END,
                    spent_day = CASE WHEN d.spent = 0 THEN a.spent_day ELSE (now() AT TIME ZONE 'UTC')::date END
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS d(id, delta, spent)
              WHERE a.id = d.id",
            &ids,
            &deltas,
            &spent
        )
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if updated as usize != ids.len() {
            return Err(Error::Inconsistent(format!("expected to update {} accounts, updated {updated}", ids.len())));
        }
    }

    let applied = finish(conn, step, &plan.outcomes).await?;
    if applied != claimed.len() {
        // Cannot happen while we hold the row locks; if it does, roll back
        // rather than move money without its state change.
        return Err(Error::Inconsistent(format!("guarded update applied {applied} of {} claimed rows", claimed.len())));
    }
    let succeeded = plan.outcomes.iter().filter(|(_, o)| *o == Outcome::Succeeded).count();
    let counts = ApplyCounts {
        claimed: claimed.len() + skipped.len(),
        succeeded,
        failed: claimed.len() - succeeded,
        skipped: skipped.len(),
        ..Default::default()
    };
    let finished = plan
        .outcomes
        .iter()
        .zip(claimed)
        .map(|((id, outcome), t)| Finished { id: *id, outcome: *outcome, created_epoch: t.created_epoch })
        .collect();
    Ok(Applied { counts, skipped, finished, locks })
}

/// The account locks a batch took, and what it learnt about the others.
#[derive(Debug, Default)]
struct Locks {
    /// The accounts it holds now, with what it read of them under the lock.
    accounts: Vec<LockedAccount>,
    /// Their ids.
    taken: Vec<i64>,
    /// Still held by someone else after a wait of [`TURN_WAIT`].
    held_elsewhere: Vec<i64>,
    /// Held by someone else when asked with `SKIP LOCKED` (never waited for).
    not_taken: Vec<i64>,
}

/// Step 2: the row locks on the claimed rows' accounts.
///
/// FOR NO KEY UPDATE, not FOR UPDATE: a producer whose transaction inserted
/// a transfer holds a KEY SHARE lock on both accounts (the foreign-key check)
/// until it commits, and FOR UPDATE would wait for it; a balance change never
/// touches the key, so the weaker lock suffices.
///
/// Deadlock freedom: every lock a transaction *waits* for is taken in
/// ascending id order, in one statement, before it takes any lock with SKIP
/// LOCKED (which never waits). So no transaction ever waits while holding a
/// lock with a higher id than the one it waits for.
async fn lock_accounts(conn: &mut PgConnection, claimed: &[Claimed], locking: Locking<'_>) -> Result<Locks> {
    let accounts_of = |rows: &mut dyn Iterator<Item = &Claimed>| {
        let mut ids: Vec<i64> = rows.flat_map(|t| [t.debit_account, t.credit_account]).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let mut locks = Locks::default();
    let rest = match locking {
        Locking::Wait => {
            let all = accounts_of(&mut claimed.iter());
            locks.accounts = lock_waiting(conn, &all).await?;
            Vec::new()
        }
        Locking::SkipLocked { must_wait } => {
            let turn = accounts_of(&mut claimed.iter().filter(|t| must_wait.contains(&t.id)));
            if !turn.is_empty() {
                let (taken, held) = wait_turn(conn, &turn).await?;
                locks.accounts = taken;
                locks.held_elsewhere = held;
            }
            accounts_of(&mut claimed.iter()).into_iter().filter(|a| turn.binary_search(a).is_err()).collect()
        }
    };
    if !rest.is_empty() {
        let taken = lock_skipping(conn, &rest).await?;
        let got: HashSet<i64> = taken.iter().map(|a| a.id).collect();
        locks.not_taken = rest.into_iter().filter(|a| !got.contains(a)).collect();
        locks.accounts.extend(taken);
    }
    locks.taken = locks.accounts.iter().map(|a| a.id).collect();
    Ok(locks)
}

async fn lock_waiting(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<Vec<LockedAccount>> {
    sqlx::query_as!(
        LockedAccount,
        r#"SELECT id, balance, daily_limit,
                  CASE WHEN spent_day = (now() AT TIME ZONE 'UTC')::date THEN spent_today ELSE 0 END AS "spent_today!"
             FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"#,
        ids
    )
    .fetch_all(&mut *conn)
    .await
}

async fn lock_skipping(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<Vec<LockedAccount>> {
    sqlx::query_as!(
        LockedAccount,
        r#"SELECT id, balance, daily_limit,
                  CASE WHEN spent_day = (now() AT TIME ZONE 'UTC')::date THEN spent_today ELSE 0 END AS "spent_today!"
             FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED"#,
        ids
    )
    .fetch_all(&mut *conn)
    .await
}

/// Opens a savepoint and lowers `lock_timeout` to [`TURN_WAIT`] inside it
/// (both undone by a rollback to the savepoint).
const TURN_BEGIN: &str = "SAVEPOINT turn; SET LOCAL lock_timeout = '250ms'";
/// Keeps what the wait took; the rest of the batch runs with the session's
/// own `lock_timeout` again.
const TURN_TAKEN: &str = "RELEASE SAVEPOINT turn; SET LOCAL lock_timeout TO DEFAULT";
const TURN_HELD: &str = "ROLLBACK TO SAVEPOINT turn";

/// Waits for `ids` in lock order, but at most [`TURN_WAIT`]: our own
/// batches hold an account for milliseconds, so one still held after that is
/// held by another session, for who knows how long. Then it takes what it
/// can without waiting and returns the others as held elsewhere; the batch
/// goes on without them.
async fn wait_turn(conn: &mut PgConnection, ids: &[i64]) -> Result<(Vec<LockedAccount>, Vec<i64>)> {
    sqlx::raw_sql(TURN_BEGIN).execute(&mut *conn).await?;
    match lock_waiting(conn, ids).await {
        Ok(taken) => {
            sqlx::raw_sql(TURN_TAKEN).execute(&mut *conn).await?;
            Ok((taken, Vec::new()))
        }
        Err(e) if db::fault(&e) == Fault::Contention => {
            sqlx::raw_sql(TURN_HELD).execute(&mut *conn).await?;
            metrics().db_retry(db::sqlstate(&e).as_deref());
            let taken = lock_skipping(conn, ids).await?;
            let held = ids.iter().copied().filter(|id| !taken.iter().any(|a| a.id == *id)).collect();
            Ok((taken, held))
        }
        Err(e) => Err(e.into()),
    }
}

impl Step {
    /// How an outcome is named in metrics and spans, and its reason.
    fn outcome_name(self, outcome: Outcome) -> (&'static str, Option<&'static str>) {
        match (self, outcome) {
            (Step::Transfer, Outcome::Succeeded) => ("succeeded", None),
            (Step::Refund, Outcome::Succeeded) => ("completed", None),
            (_, Outcome::Failed(r)) => ("failed", Some(r)),
        }
    }
}

/// The spans of claimed rows whose producers sent a trace context (see
/// [`crate::trace`]), open from the claim to the commit. Untraced rows get
/// none.
struct TracedRows(Vec<(i64, tracing::Span)>);

impl TracedRows {
    fn open(step: Step, claimed: &[Claimed]) -> Self {
        let name = match step {
            Step::Transfer => "transfer.apply",
            Step::Refund => "refund.apply",
        };
        TracedRows(
            claimed
                .iter()
                .filter_map(|t| {
                    let traceparent = t.traceparent.as_deref().filter(|t| TraceParent::new(t).is_ok())?;
                    let span = tracing::info_span!(
                        "apply",
                        otel.name = name,
                        transfer_id = t.id,
                        amount = t.amount,
                        outcome = tracing::field::Empty,
                        reason = tracing::field::Empty,
                    );
                    crate::trace::continue_remote(&span, traceparent);
                    Some((t.id, span))
                })
                .collect(),
        )
    }

    /// Records each row's outcome once its transaction committed; the spans
    /// end here. (Dropped without this, after a rollback, they end with no
    /// outcome: the rows are tried again under new spans.)
    fn close(self, step: Step, applied: &Applied) {
        for (id, span) in self.0 {
            match applied.finished.iter().find(|f| f.id == id) {
                Some(f) => {
                    let (outcome, reason) = step.outcome_name(f.outcome);
                    span.record("outcome", outcome);
                    if let Some(r) = reason {
                        span.record("reason", r);
                    }
                }
                None => {
                    span.record("outcome", "skipped: an account was busy; left pending for the next pass");
                }
            }
        }
    }
}

/// What [`apply_claimed`] did, for the caller to commit and report.
struct Applied {
    counts: ApplyCounts,
    /// Rows left PENDING because another transaction held one of their accounts.
    skipped: Vec<i64>,
    finished: Vec<Finished>,
    /// What the batch learnt about its accounts (the locked rows themselves
    /// are not kept).
    locks: Locks,
}

/// A row moved out of its waiting state.
#[derive(Debug, Clone, Copy)]
struct Finished {
    id: i64,
    outcome: Outcome,
    created_epoch: f64,
}

/// Moves rows out of the step's waiting state and writes one outbox event
/// per row that actually changed, in one statement. The guard in the SQL
/// makes a row that is no longer waiting produce neither a change nor an
/// event. Returns how many rows it moved.
async fn finish(conn: &mut PgConnection, step: Step, outcomes: &[(i64, Outcome)]) -> Result<usize> {
    let ids: Vec<i64> = outcomes.iter().map(|(id, _)| *id).collect();
    let states: Vec<String> = outcomes.iter().map(|(_, o)| step.state(*o).to_owned()).collect();
    let reasons: Vec<Option<String>> = outcomes
        .iter()
        .map(|(_, o)| match o {
            Outcome::Succeeded => None,
            Outcome::Failed(r) => Some((*r).to_owned()),
        })
        .collect();
    // Time-ordered ids (UUIDv7): each new one lands at the right edge of the
    // event_id index instead of on a random page of it.
    let event_ids: Vec<String> = outcomes.iter().map(|_| uuid::Uuid::now_v7().to_string()).collect();
    Ok(step.finish(conn, &ids, &states, &reasons, &event_ids).await? as usize)
}

struct Plan {
    outcomes: Vec<(i64, Outcome)>,
    /// Per account that changes: its net balance change and what it sent
    /// by transfer (for the day's total), in account order.
    changes: Vec<AccountChange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AccountChange {
    account: i64,
    delta: i64,
    spent: i64,
}

/// Step 3: decides each row in id order against running balances, and, for
/// transfers (`limited`), against the source's daily limit: what it sent
/// today (read under its lock) plus what this batch already took from it.
/// Pure, so the rules are unit-tested without a database.
fn decide(claimed: &[Claimed], accounts: &[LockedAccount], limited: bool) -> Result<Plan> {
    let mut balance: HashMap<i64, i64> = accounts.iter().map(|a| (a.id, a.balance)).collect();
    let mut spent: HashMap<i64, i64> = accounts.iter().map(|a| (a.id, a.spent_today)).collect();
    let limits: HashMap<i64, Option<i64>> = accounts.iter().map(|a| (a.id, a.daily_limit)).collect();
    let mut changes: HashMap<i64, AccountChange> = HashMap::new();
    let mut outcomes = Vec::with_capacity(claimed.len());
    for t in claimed {
        let (debit, credit) = (t.debit_account, t.credit_account);
        let from = *balance.get(&debit).ok_or(Error::NotFound { what: "account", id: debit })?;
        let to = *balance.get(&credit).ok_or(Error::NotFound { what: "account", id: credit })?;
        let over_limit = limited && limits[&debit].is_some_and(|limit| spent[&debit].saturating_add(t.amount) > limit);
        let outcome = if from < t.amount {
            Outcome::Failed(reason::INSUFFICIENT_FUNDS)
        } else if over_limit {
            Outcome::Failed(reason::DAILY_LIMIT_EXCEEDED)
        } else {
            let credited = to
                .checked_add(t.amount)
                .ok_or_else(|| Error::invalid(format!("balance of account {credit} would overflow")))?;
            balance.insert(debit, from - t.amount);
            balance.insert(credit, credited);
            let change = |id| AccountChange { account: id, delta: 0, spent: 0 };
            let d = changes.entry(debit).or_insert_with(|| change(debit));
            d.delta -= t.amount;
            if limited {
                d.spent = d.spent.saturating_add(t.amount);
                let total = spent.get_mut(&debit).expect("every claimed account was read");
                *total = total.saturating_add(t.amount);
            }
            changes.entry(credit).or_insert_with(|| change(credit)).delta += t.amount;
            Outcome::Succeeded
        };
        outcomes.push((t.id, outcome));
    }
    let mut changes: Vec<AccountChange> = changes.into_values().filter(|c| c.delta != 0 || c.spent != 0).collect();
    changes.sort_unstable_by_key(|c| c.account);
    Ok(Plan { outcomes, changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: i64, from: i64, to: i64, amount: i64) -> Claimed {
        Claimed { id, debit_account: from, credit_account: to, amount, created_epoch: 0.0, traceparent: None }
    }

    fn acct(id: i64, balance: i64, daily_limit: Option<i64>, spent_today: i64) -> LockedAccount {
        LockedAccount { id, balance, daily_limit, spent_today }
    }

    fn change(account: i64, delta: i64, spent: i64) -> AccountChange {
        AccountChange { account, delta, spent }
    }

    #[test]
    fn later_transfers_see_the_balances_left_by_earlier_ones() {
        let claimed = [t(1, 1, 2, 60), t(2, 1, 2, 60), t(3, 2, 1, 100)];
        let plan = decide(&claimed, &[acct(1, 100, None, 0), acct(2, 50, None, 0)], true).unwrap();
        assert_eq!(
            plan.outcomes,
            vec![(1, Outcome::Succeeded), (2, Outcome::Failed(reason::INSUFFICIENT_FUNDS)), (3, Outcome::Succeeded)]
        );
        // 1 -> 2: 60, 2 -> 1: 100; net +40 / -40; each sent what it sent.
        assert_eq!(plan.changes, vec![change(1, 40, 60), change(2, -40, 100)]);
    }

    #[test]
    fn daily_limit_counts_what_already_left_the_account_that_day() {
        let claimed = [t(1, 1, 2, 30), t(2, 1, 2, 30)];
        let accounts = [acct(1, 1000, Some(100), 50), acct(2, 0, None, 0)];
        let plan = decide(&claimed, &accounts, true).unwrap();
        assert_eq!(plan.outcomes, vec![(1, Outcome::Succeeded), (2, Outcome::Failed(reason::DAILY_LIMIT_EXCEEDED))]);
        assert_eq!(plan.changes, vec![change(1, -30, 30), change(2, 30, 0)]);
        // Refunds are not limited, and not counted as sent.
        let plan = decide(&claimed, &accounts, false).unwrap();
        assert_eq!(plan.outcomes, vec![(1, Outcome::Succeeded), (2, Outcome::Succeeded)]);
        assert_eq!(plan.changes, vec![change(1, -60, 0), change(2, 60, 0)]);
    }

    #[test]
    fn an_account_that_sends_and_receives_as_much_still_counts_what_it_sent() {
        let claimed = [t(1, 1, 2, 10), t(2, 2, 1, 10)];
        let plan = decide(&claimed, &[acct(1, 10, None, 0), acct(2, 0, None, 0)], true).unwrap();
        assert_eq!(plan.changes, vec![change(1, 0, 10), change(2, 0, 10)]);
    }

    #[test]
    fn a_days_total_saturates_instead_of_overflowing() {
        let claimed = [t(1, 1, 2, 10)];
        let plan = decide(&claimed, &[acct(1, 10, Some(100), i64::MAX - 5), acct(2, 0, None, 0)], true).unwrap();
        assert_eq!(plan.outcomes, vec![(1, Outcome::Failed(reason::DAILY_LIMIT_EXCEEDED))]);
        let plan = decide(&claimed, &[acct(1, 10, None, i64::MAX - 5), acct(2, 0, None, 0)], true).unwrap();
        assert_eq!(plan.outcomes, vec![(1, Outcome::Succeeded)]);
    }

    #[test]
    fn a_turn_waits_as_long_as_documented() {
        assert!(TURN_BEGIN.contains(&format!("'{}ms'", TURN_WAIT.as_millis())), "{TURN_BEGIN}");
    }

    #[test]
    fn an_overflowing_credit_is_an_error_not_a_wrap() {
        let claimed = [t(1, 1, 2, 10)];
        assert!(decide(&claimed, &[acct(1, 10, None, 0), acct(2, i64::MAX - 5, None, 0)], true).is_err());
    }
}

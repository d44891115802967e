//! What the applier tells the outside: the spans of traced rows, the
//! commits reported to an observer (the benchmark's latency), a debug line
//! per batch, and what a pass did ([`ApplyCounts`], for the service loop),
//! with an [`ApplyReport`] in it, which the
//! service loop records in the metrics ([`record`]): the money path itself
//! never reaches a process-global registry.

use std::time::{Duration, SystemTime};

use crate::metrics::metrics;
use crate::service::Progress;
use crate::transfer::step::{Claimed, Outcome, Step};
use crate::transfer::{FailureReason, TraceParent, TransferId};

/// Rows of one step that a committed transaction moved out of their waiting
/// state, and when it committed: for observers (the benchmark's latency).
#[derive(Debug, Clone)]
pub struct Committed {
    pub step: Step,
    pub ids: Vec<i64>,
    pub at: SystemTime,
}

/// Where an applier reports what it committed.
pub type CommitObserver = tokio::sync::mpsc::UnboundedSender<Committed>;

/// A row moved out of its waiting state by a commit.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub id: TransferId,
    pub outcome: Outcome,
    pub created_epoch: f64,
}

/// What a pass did, for the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Committed batches: step, rows finished, how long from claim to commit.
    pub batches: Vec<(Step, usize, Duration)>,
    /// Rows finished: step, outcome name, reason, and (transfers) how long
    /// after their enqueue.
    pub finished: Vec<(Step, &'static str, Option<FailureReason>, Option<Duration>)>,
    /// Contention retried (a lock or statement timeout, a deadlock), by SQLSTATE.
    pub db_retries: Vec<Option<String>>,
}

impl ApplyReport {
    /// A commit that moved `finished` out of `step`'s waiting state,
    /// `took` after its claim.
    pub fn committed(&mut self, step: Step, finished: &[Finished], took: Duration) {
        if finished.is_empty() {
            return;
        }
        self.batches.push((step, finished.len(), took));
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        for f in finished {
            let since_enqueue =
                (step == Step::Transfer).then(|| Duration::from_secs_f64((now - f.created_epoch).max(0.0)));
            self.finished.push((step, step.outcome_name(f.outcome), f.outcome.reason(), since_enqueue));
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let ids: Vec<i64> = finished.iter().map(|f| f.id.0).collect();
            tracing::debug!(step = step.name(), transfer_ids = ?ids, took_ms = took.as_secs_f64() * 1e3, "batch applied");
        }
    }

    pub fn merge(&mut self, other: ApplyReport) {
        self.batches.extend(other.batches);
        self.finished.extend(other.finished);
        self.db_retries.extend(other.db_retries);
    }
}

/// Records a pass's report in the process's metrics (called by the loop).
pub fn record(report: &ApplyReport) {
    let m = metrics();
    for (step, rows, took) in &report.batches {
        m.apply_batch(step.name(), *rows, *took);
    }
    for (step, outcome, reason, since_enqueue) in &report.finished {
        let reason = reason.map(FailureReason::as_str);
        match step {
            Step::Transfer => m.transfer_finished(outcome, reason),
            Step::Refund => m.refund_finished(outcome, reason),
        }
        if let Some(d) = since_enqueue {
            m.applied_after(*d);
        }
    }
    for sqlstate in &report.db_retries {
        m.db_retry(sqlstate.as_deref());
    }
}

/// The spans of claimed rows whose producers sent a trace context (see
/// [`crate::trace`]), open from the claim to the commit. Untraced rows get
/// none.
pub struct TracedRows(Vec<(TransferId, tracing::Span)>);

impl TracedRows {
    pub fn open(step: Step, claimed: &[Claimed]) -> Self {
        TracedRows(
            claimed
                .iter()
                .filter_map(|t| {
                    let traceparent = t.traceparent.as_deref().filter(|t| TraceParent::new(t).is_ok())?;
                    let span = tracing::info_span!(
                        "apply",
                        otel.name = step.span_name(),
                        transfer_id = t.id.0,
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
    pub fn close(self, step: Step, finished: &[Finished]) {
        for (id, span) in self.0 {
            match finished.iter().find(|f| f.id == id) {
                Some(f) => {
                    span.record("outcome", step.outcome_name(f.outcome));
                    if let Some(r) = f.outcome.reason() {
                        span.record("reason", r.as_str());
                    }
                }
                None => {
                    span.record("outcome", "skipped: an account was busy; left pending for the next pass");
                }
            }
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
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
    /// For the metrics (recorded by the service loop).
    pub report: ApplyReport,
}

impl Progress for ApplyCounts {
    fn claimed(&self) -> usize {
        self.claimed
    }

    fn contended(&self) -> bool {
        self.skipped > 0
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
        self.report.merge(o.report);
    }
}

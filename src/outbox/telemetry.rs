//! What a relay pass reports for the metrics: the pass's counts carry a
//! [`RelayReport`], which the service loop records ([`record`]); neither the
//! relay nor the SQS client reaches the process-global registry.

use std::time::Duration;

use crate::metrics::metrics;

/// What a pass did, for the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelayReport {
    /// The destination's `outbox.destination`.
    pub destination: String,
    /// Events by outcome: published, rejected, dead, deferred, unavailable.
    pub outcomes: [u64; 5],
    /// Per event published: how long after it was written.
    pub published_ages: Vec<Duration>,
    /// Per rejection: SQS's code, and whether the event is now dead.
    pub rejected: Vec<(String, bool)>,
    /// Per deferred event: SQS's code.
    pub deferred: Vec<String>,
    /// Per SQS call: how it ended (`ok`, `throttled`, `unavailable`) and how long it took.
    pub calls: Vec<(&'static str, Duration)>,
}

impl RelayReport {
    pub fn merge(&mut self, other: RelayReport) {
        if self.destination.is_empty() {
            self.destination = other.destination;
        }
        for (mine, theirs) in self.outcomes.iter_mut().zip(other.outcomes) {
            *mine += theirs;
        }
        self.published_ages.extend(other.published_ages);
        self.rejected.extend(other.rejected);
        self.deferred.extend(other.deferred);
        self.calls.extend(other.calls);
    }
}

/// Records a pass's report in the process's metrics (called by the loop).
pub fn record(report: &RelayReport) {
    let m = metrics();
    for age in &report.published_ages {
        m.event_published(*age);
    }
    for (code, dead) in &report.rejected {
        m.event_rejected(code, *dead);
    }
    for code in &report.deferred {
        m.event_deferred(code);
    }
    for (result, took) in &report.calls {
        m.sqs_call(result, *took);
    }
    for (outcome, n) in OUTCOMES.iter().zip(report.outcomes) {
        m.delivered(&report.destination, outcome, n);
    }
}

/// The `outcome` labels of [`RelayReport::outcomes`], in order.
pub const OUTCOMES: [&str; 5] = ["published", "rejected", "dead", "deferred", "unavailable"];

//! The process's Prometheus metrics, on the `prometheus-client` crate (the
//! Prometheus project's own Rust client: OpenMetrics text, typed counters,
//! histograms and label sets, no global macros).
//!
//! Counters and histograms count what this process did since it started
//! (Prometheus sums replicas and handles restarts with `rate()`); gauges
//! describe the database, read at scrape time from cheap sources only (see
//! [`crate::status`]; `admin` sets them from a status reading and renders
//! the exposition). The work itself never touches this registry: each
//! service's loop records what a pass reports (`Service::record`). No label ever holds a transfer, account or event id:
//! every label has a handful of values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// A label set: a few fixed names, values from small fixed sets.
pub type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// Every metric the process exports.
pub struct Metrics {
    registry: Registry,
    transfers_finished: Family<Labels, Counter>,
    refunds_finished: Family<Labels, Counter>,
    events_published: Counter,
    events_rejected: Family<Labels, Counter>,
    events_deferred: Family<Labels, Counter>,
    events_dead: Counter,
    events_requeued: Counter,
    sqs_calls: Family<Labels, Counter>,
    db_retries: Family<Labels, Counter>,
    apply_batches: Family<Labels, Counter>,
    apply_batch_duration: Family<Labels, Histogram>,
    apply_batch_size: Family<Labels, Histogram>,
    enqueue_to_applied: Histogram,
    event_publish_age: Histogram,
    sqs_call_duration: Histogram,
    transfers: Family<Labels, Gauge>,
    refunds: Family<Labels, Gauge>,
    outbox_events: Family<Labels, Gauge>,
    oldest_unpublished_age: Gauge<f64, AtomicU64>,
    consumer_messages: Family<Labels, Counter>,
    consumer_lag: Histogram,
    paused: Family<Labels, Gauge>,
    apply_polling: Gauge,
    deliveries: Family<Labels, Counter>,
    destination_events: Family<Labels, Gauge>,
    /// Running totals for the console's rates.
    applied_total: AtomicU64,
    published_total: AtomicU64,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 1 ms to ~65 s.
    exponential_buckets(0.001, 2.0, 17)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("transfer_worker");
        let m = Metrics {
            registry: Registry::default(),
            transfers_finished: Family::default(),
            refunds_finished: Family::default(),
            events_published: Counter::default(),
            events_rejected: Family::default(),
            events_deferred: Family::default(),
            events_dead: Counter::default(),
            events_requeued: Counter::default(),
            sqs_calls: Family::default(),
            db_retries: Family::default(),
            apply_batches: Family::default(),
            apply_batch_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            apply_batch_size: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 14))),
            enqueue_to_applied: Histogram::new(latency_buckets()),
            event_publish_age: Histogram::new(latency_buckets()),
            sqs_call_duration: Histogram::new(latency_buckets()),
            transfers: Family::default(),
            refunds: Family::default(),
            outbox_events: Family::default(),
            oldest_unpublished_age: Gauge::default(),
            consumer_messages: Family::default(),
            consumer_lag: Histogram::new(latency_buckets()),
            paused: Family::default(),
            apply_polling: Gauge::default(),
            deliveries: Family::default(),
            destination_events: Family::default(),
            applied_total: AtomicU64::new(0),
            published_total: AtomicU64::new(0),
        };
        registry.register(
            "transfers_finished",
            "Transfers this process moved out of PENDING, by outcome (succeeded, failed) and failure reason",
            m.transfers_finished.clone(),
        );
        registry.register(
            "refunds_finished",
            "Refunds this process completed or failed, by outcome and failure reason",
            m.refunds_finished.clone(),
        );
        registry.register("events_published", "Outbox events SQS accepted", m.events_published.clone());
        registry.register(
            "events_rejected",
            "Outbox events SQS refused for their content, by error code (each counts toward dead)",
            m.events_rejected.clone(),
        );
        registry.register(
            "events_deferred",
            "Outbox events SQS failed one by one for reasons not theirs (throttling, internal errors), by code; not counted toward dead",
            m.events_deferred.clone(),
        );
        registry.register("events_dead", "Outbox events marked dead after too many rejections", m.events_dead.clone());
        registry.register(
            "events_requeued",
            "Dead events put back to pending from the console",
            m.events_requeued.clone(),
        );
        registry.register(
            "sqs_calls",
            "SendMessageBatch calls by result: ok (answered; entries may still have failed), throttled, unavailable",
            m.sqs_calls.clone(),
        );
        registry.register(
            "db_retries",
            "Database operations retried because of the database, not the row, by SQLSTATE class (io: no SQLSTATE)",
            m.db_retries.clone(),
        );
        registry.register(
            "apply_batches",
            "Apply transactions committed, by step (transfer, refund)",
            m.apply_batches.clone(),
        );
        registry.register_with_unit(
            "apply_batch_duration",
            "Duration of a committed apply transaction, from claim to commit",
            Unit::Seconds,
            m.apply_batch_duration.clone(),
        );
        registry.register(
            "apply_batch_size",
            "Rows moved out of their waiting state by one apply transaction",
            m.apply_batch_size.clone(),
        );
        registry.register_with_unit(
            "enqueue_to_applied",
            "Time from a transfer's insert to the commit that applied it",
            Unit::Seconds,
            m.enqueue_to_applied.clone(),
        );
        registry.register_with_unit(
            "event_publish_age",
            "Age of an event when SQS accepted it (written -> accepted)",
            Unit::Seconds,
            m.event_publish_age.clone(),
        );
        registry.register_with_unit(
            "sqs_call_duration",
            "Duration of one SendMessageBatch call",
            Unit::Seconds,
            m.sqs_call_duration.clone(),
        );
        registry.register(
            "transfers",
            "Transfers in the database per status (maintained counters)",
            m.transfers.clone(),
        );
        registry.register("refunds", "Refunds in the database per status (maintained counters)", m.refunds.clone());
        registry.register(
            "outbox_events",
            "Outbox events per state; held = pending behind a dead event of the same transfer",
            m.outbox_events.clone(),
        );
        registry.register_with_unit(
            "oldest_unpublished_age",
            "Age of the oldest event not yet published (0 when all are): the alert to set",
            Unit::Seconds,
            m.oldest_unpublished_age.clone(),
        );
        registry.register(
            "consumer_messages",
            "Messages `consume` received, by outcome: landed (new, handled, committed), duplicate (dropped), \
             failed (handler error: rolled back, retried later), foreign (not our event: left for the redrive policy)",
            m.consumer_messages.clone(),
        );
        registry.register_with_unit(
            "consumer_lag",
            "How long after it happened an event landed in the consumer's inbox (now - occurred_at)",
            Unit::Seconds,
            m.consumer_lag.clone(),
        );
        registry.register(
            "deliveries",
            "What each destination (queue URL or topic ARN) did with the events this process sent it, by outcome \
             (published, rejected, dead, deferred, unavailable)",
            m.deliveries.clone(),
        );
        registry.register(
            "destination_events",
            "Each destination's events by state (pending, published, dead, held), for every replica",
            m.destination_events.clone(),
        );
        registry.register(
            "apply_polling",
            "1 while this process claims new transfers on a tick of its own and producers' inserts skip their NOTIFY \
             (above --gather-above transfers a second)",
            m.apply_polling.clone(),
        );
        registry.register(
            "paused",
            "1 while an operator has paused this part of the worker (apply, relay) for every replica",
            m.paused.clone(),
        );
        // Every series a dashboard or an alert expects exists from the start
        // (a rate() over a series that appears late misses its first step).
        for reason in ["", "insufficient_funds", "daily_limit_exceeded", "processing_error"] {
            let outcome = if reason.is_empty() { "succeeded" } else { "failed" };
            let _ = m.transfers_finished.get_or_create(&labels(&[("outcome", outcome), ("reason", reason)]));
        }
        for (outcome, reason) in [("completed", ""), ("failed", "insufficient_funds"), ("failed", "processing_error")] {
            let _ = m.refunds_finished.get_or_create(&labels(&[("outcome", outcome), ("reason", reason)]));
        }
        for result in ["ok", "throttled", "unavailable"] {
            let _ = m.sqs_calls.get_or_create(&labels(&[("result", result)]));
        }
        for class in ["08", "40", "53", "55", "57", "58", "25", "io"] {
            let _ = m.db_retries.get_or_create(&labels(&[("class", class)]));
        }
        for part in ["apply", "relay"] {
            let _ = m.paused.get_or_create(&labels(&[("part", part)]));
        }
        for step in ["transfer", "refund"] {
            let l = labels(&[("step", step)]);
            let _ = m.apply_batches.get_or_create(&l);
            let _ = m.apply_batch_duration.get_or_create(&l);
            let _ = m.apply_batch_size.get_or_create(&l);
        }
        Metrics { registry, ..m }
    }

    pub fn transfer_finished(&self, outcome: &str, reason: Option<&str>) {
        let l = labels(&[("outcome", outcome), ("reason", reason.unwrap_or(""))]);
        self.transfers_finished.get_or_create(&l).inc();
        self.applied_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refund_finished(&self, outcome: &str, reason: Option<&str>) {
        let l = labels(&[("outcome", outcome), ("reason", reason.unwrap_or(""))]);
        self.refunds_finished.get_or_create(&l).inc();
    }

    pub fn apply_batch(&self, step: &str, rows: usize, took: Duration) {
        let l = labels(&[("step", step)]);
        self.apply_batches.get_or_create(&l).inc();
        self.apply_batch_duration.get_or_create(&l).observe(took.as_secs_f64());
        self.apply_batch_size.get_or_create(&l).observe(rows as f64);
    }

    pub fn applied_after(&self, since_enqueue: Duration) {
        self.enqueue_to_applied.observe(since_enqueue.as_secs_f64());
    }

    pub fn event_published(&self, age: Duration) {
        self.events_published.inc();
        self.published_total.fetch_add(1, Ordering::Relaxed);
        self.event_publish_age.observe(age.as_secs_f64());
    }

    pub fn event_rejected(&self, code: &str, dead: bool) {
        self.events_rejected.get_or_create(&labels(&[("code", code)])).inc();
        if dead {
            self.events_dead.inc();
        }
    }

    pub fn event_deferred(&self, code: &str) {
        self.events_deferred.get_or_create(&labels(&[("code", code)])).inc();
    }

    pub fn events_requeued(&self, n: u64) {
        self.events_requeued.inc_by(n);
    }

    pub fn sqs_call(&self, result: &str, took: Duration) {
        self.sqs_calls.get_or_create(&labels(&[("result", result)])).inc();
        self.sqs_call_duration.observe(took.as_secs_f64());
    }

    /// What a destination did with `n` events of a pass.
    pub fn delivered(&self, destination: &str, outcome: &str, n: u64) {
        if n > 0 {
            self.deliveries.get_or_create(&labels(&[("destination", destination), ("outcome", outcome)])).inc_by(n);
        }
    }

    /// Whether a part of the worker is paused (the control watcher's reading).
    pub fn set_paused(&self, part: &str, paused: bool) {
        self.paused.get_or_create(&labels(&[("part", part)])).set(i64::from(paused));
    }

    /// Whether this process polls for new transfers (see `transfer::polling`).
    pub fn set_apply_polling(&self, polling: bool) {
        self.apply_polling.set(i64::from(polling));
    }

    /// What a consumer's pass did with the messages it received.
    pub fn consumed(&self, received: u64, landed: u64, duplicates: u64, failed: u64, foreign: u64) {
        for (outcome, n) in [
            ("received", received),
            ("landed", landed),
            ("duplicate", duplicates),
            ("failed", failed),
            ("foreign", foreign),
        ] {
            if n > 0 {
                self.consumer_messages.get_or_create(&labels(&[("outcome", outcome)])).inc_by(n);
            }
        }
    }

    pub fn consumer_lag(&self, lag: Duration) {
        self.consumer_lag.observe(lag.as_secs_f64());
    }

    /// A database error that was retried; `sqlstate` None for I/O-level ones.
    pub fn db_retry(&self, sqlstate: Option<&str>) {
        let class = sqlstate.map(|s| s.get(..2).unwrap_or(s)).unwrap_or("io");
        self.db_retries.get_or_create(&labels(&[("class", class)])).inc();
    }

    /// Transfers finished and events published by this process so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.applied_total.load(Ordering::Relaxed), self.published_total.load(Ordering::Relaxed))
    }

    /// Sets the database gauges (from a status reading: see `admin`).
    pub fn set_database_gauges(&self, gauges: &DatabaseGauges<'_>) {
        for (status, n) in gauges.transfers {
            self.transfers.get_or_create(&labels(&[("status", status)])).set(*n);
        }
        for (status, n) in gauges.refunds {
            self.refunds.get_or_create(&labels(&[("status", status)])).set(*n);
        }
        for (state, n) in gauges.outbox {
            self.outbox_events.get_or_create(&labels(&[("state", state)])).set(*n);
        }
        self.oldest_unpublished_age.set(gauges.oldest_unpublished_age_s);
        for (destination, state, n) in gauges.destinations {
            let l = labels(&[("destination", destination), ("state", state)]);
            self.destination_events.get_or_create(&l).set(*n);
        }
    }

    /// The OpenMetrics exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// What the database gauges show: counts per state, by the state's name.
pub struct DatabaseGauges<'a> {
    pub transfers: &'a [(&'static str, i64)],
    pub refunds: &'a [(&'static str, i64)],
    pub outbox: &'a [(&'static str, i64)],
    pub oldest_unpublished_age_s: f64,
    /// (destination, state, count).
    pub destinations: &'a [(&'a str, &'static str, i64)],
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

//! The console's memory of the last hour: every [`SAMPLE_EVERY`], this
//! process's running totals (transfers applied, events published) and the
//! backlog everyone shares (pending transfers and unpublished events, from
//! the status read `/metrics` also uses), kept for [`KEPT`]. From it come
//! the rates table (per minute over 1, 5, 15 minutes) and the chart (per
//! second and backlog over the hour; see `chart`).
//!
//! Samples are taken whether or not anyone looks, so the chart is there the
//! first time an operator opens the page during an incident; an hour of them
//! is 360 small tuples.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::metrics::metrics;

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How far back the chart looks.
pub const SPAN: Duration = Duration::from_secs(3_600);
/// How long samples are kept (the span and one more sample).
const KEPT: Duration = Duration::from_secs(3_600 + 10);

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at: Instant,
    applied: u64,
    published: u64,
    /// Pending transfers plus unpublished events, if the database answered.
    backlog: Option<i64>,
}

/// A point of the chart: seconds before now, rates over the interval that
/// ends there, and the backlog then.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub ago_s: f64,
    pub applied_per_s: f64,
    pub published_per_s: f64,
    pub backlog: Option<i64>,
}

/// The samples of the last hour.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Takes a sample of this process's totals and `backlog` now.
    pub fn sample(&mut self, backlog: Option<i64>) {
        let (applied, published) = metrics().totals();
        self.push(Sample { at: Instant::now(), applied, published, backlog });
    }

    fn push(&mut self, sample: Sample) {
        // Two samples closer than a second apart say nothing more: keep the newer.
        if self.samples.back().is_some_and(|s| sample.at.duration_since(s.at) < Duration::from_secs(1)) {
            self.samples.pop_back();
        }
        self.samples.push_back(sample);
        while self.samples.front().is_some_and(|s| sample.at.duration_since(s.at) > KEPT) {
            self.samples.pop_front();
        }
    }

    /// Per minute over `window`: (applied, published), from the oldest
    /// sample inside the window to the newest.
    pub fn per_minute(&self, window: Duration) -> Option<(f64, f64)> {
        let last = self.samples.back()?;
        let first = self.samples.iter().find(|s| last.at.duration_since(s.at) <= window)?;
        let minutes = last.at.duration_since(first.at).as_secs_f64() / 60.0;
        (minutes > 0.0).then(|| {
            (
                last.applied.saturating_sub(first.applied) as f64 / minutes,
                last.published.saturating_sub(first.published) as f64 / minutes,
            )
        })
    }

    /// The chart's points, oldest first, measured from `now`.
    pub fn points(&self, now: Instant) -> Vec<Point> {
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(a, b)| {
                let secs = b.at.duration_since(a.at).as_secs_f64().max(f64::EPSILON);
                Point {
                    ago_s: now.saturating_duration_since(b.at).as_secs_f64(),
                    applied_per_s: b.applied.saturating_sub(a.applied) as f64 / secs,
                    published_per_s: b.published.saturating_sub(a.published) as f64 / secs,
                    backlog: b.backlog,
                }
            })
            .filter(|p| p.ago_s <= SPAN.as_secs_f64())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(samples: &[(u64, u64, u64, Option<i64>)], start: Instant) -> History {
        let mut h = History::default();
        for &(secs, applied, published, backlog) in samples {
            h.push(Sample { at: start + Duration::from_secs(secs), applied, published, backlog });
        }
        h
    }

    #[test]
    fn rates_and_points_come_from_the_differences_between_samples() {
        let start = Instant::now();
        let h = history(&[(0, 0, 0, Some(50)), (10, 100, 50, Some(40)), (20, 300, 250, None)], start);
        let now = start + Duration::from_secs(20);
        let points = h.points(now);
        assert_eq!(points.len(), 2);
        assert_eq!((points[0].ago_s, points[0].applied_per_s, points[0].published_per_s), (10.0, 10.0, 5.0));
        assert_eq!(points[0].backlog, Some(40));
        assert_eq!((points[1].ago_s, points[1].applied_per_s, points[1].published_per_s), (0.0, 20.0, 20.0));
        assert_eq!(points[1].backlog, None, "the database did not answer then");
        assert_eq!(h.per_minute(Duration::from_secs(60)), Some((900.0, 750.0)));
        assert_eq!(History::default().per_minute(Duration::from_secs(60)), None);
    }

    #[test]
    fn an_hour_is_kept_and_close_samples_are_merged() {
        let start = Instant::now();
        let mut h = History::default();
        for i in 0..400u64 {
            h.push(Sample { at: start + Duration::from_secs(i * 10), applied: i, published: i, backlog: Some(0) });
        }
        assert_eq!(h.samples.len(), 362, "an hour and one sample more");
        let now = start + Duration::from_secs(3_990);
        assert!(h.points(now).iter().all(|p| p.ago_s <= 3_600.0));
        // A page view right after a scheduled sample replaces it.
        h.push(Sample { at: now + Duration::from_millis(300), applied: 500, published: 500, backlog: Some(1) });
        assert_eq!(h.samples.len(), 361, "(and the oldest fell out of the hour)");
        assert_eq!(h.samples.back().unwrap().applied, 500);
    }
}

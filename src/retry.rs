//! The retry policy, in one place: exponential backoff with jitter.
//!
//! Callers see only [`RetryPolicy`] and [`Backoff`]; the `backoff` crate sits
//! behind them (RustSec lists it as unmaintained, RUSTSEC-2025-0012), so it can
//! be swapped without touching the worker or the relay. Our loops never give
//! up: `max_elapsed_time` is `None`, because an outage of any length must not
//! kill an event or a transfer.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use rand::Rng;

/// Bounds of an exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The first delay.
    pub initial: Duration,
    /// No delay is ever longer than this.
    pub max: Duration,
    /// Each delay is this many times the previous one (before jitter).
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(30), multiplier: 2.0 }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based) of a row whose
    /// attempts are counted in the database: `initial * multiplier^(attempt-1)`,
    /// capped at `max`, with ±50% jitter so rows that failed together do not
    /// come back together.
    pub fn delay_for_attempt(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(62) as i32);
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = rand::thread_rng().gen_range(0.5..=1.5);
        Duration::from_secs_f64((base * jitter).min(self.max.as_secs_f64()))
    }

    /// A stateful backoff for a loop that retries until it succeeds.
    pub fn backoff(&self) -> Backoff {
        Backoff(
            backoff::ExponentialBackoffBuilder::new()
                .with_initial_interval(self.initial)
                .with_max_interval(self.max)
                .with_multiplier(self.multiplier)
                .with_randomization_factor(0.5)
                .with_max_elapsed_time(None)
                .build(),
        )
    }
}

/// Successive delays of one retry loop; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff(backoff::ExponentialBackoff);

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        // With max_elapsed_time = None the crate never returns None; its jitter
        // may overshoot the cap, so clamp.
        let max = self.0.max_interval;
        self.0.next_backoff().unwrap_or(max).min(max)
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_within_bounds() {
        let p = RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(2), multiplier: 2.0 };
        for attempt in 1..100 {
            let d = p.delay_for_attempt(attempt);
            assert!(d <= p.max, "attempt {attempt}: {d:?}");
            assert!(d >= Duration::from_millis(50), "attempt {attempt}: {d:?}");
        }
        let mut b = p.backoff();
        for _ in 0..1000 {
            assert!(b.next_delay() <= p.max);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }
}

//! Gathering: above a steady rate, a pass woken for new transfers waits a
//! few milliseconds before it claims, so that one batch carries several.
//!
//! A producer inserting one transfer at a time wakes an apply task per
//! insert. Below a few hundred a second each wake-up is best met at once: the
//! batch is one transfer, and nothing waits. Above that, claiming at once
//! makes one transaction (two round trips), one SQS call and one record per
//! one or two transfers, and that per-batch work is most of the worker's CPU.
//! Waiting first lets the transfers of that moment share them: at 500 a
//! second, the default 20 ms is about ten transfers a batch, for at most
//! 20 ms more latency.
//!
//! - **The rate** is what the apply tasks of the process claimed over the
//!   last [`WINDOW`] (and the one before it, while the current one is young):
//!   a lull drops it at once, so a trickle after a burst is not held back.
//! - **One task gathers at a time.** Wake-ups that arrive while one waits
//!   are for rows it is about to claim, so their tasks go back to sleep.
//!   The waiting task stops counting as gathering *before* it sends its
//!   claim: a task that saw it gathering was woken for a row committed
//!   before that claim's snapshot, so the claim sees the row.
//! - **Only after a wake-up.** A pass that follows a full batch (a backlog)
//!   never waits.
//! - **Not while polling.** Above the rate, the process stops asking for a
//!   NOTIFY per insert and wakes a task every `wait` itself (see
//!   [`crate::transfer::polling`]): that tick is the wait, and its pass
//!   claims at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long the rate is counted over.
pub const WINDOW: Duration = Duration::from_millis(250);

/// The apply tasks' shared gathering state (see the module docs).
#[derive(Debug)]
pub struct Gather {
    /// Transfers a second from which a woken pass waits (0: never).
    above: u32,
    wait: Duration,
    counted: Mutex<Counted>,
    gathering: AtomicBool,
    /// Whether the process's poller is ticking (see [`Gather::set_polling`]).
    polling: AtomicBool,
}

#[derive(Debug)]
struct Counted {
    since: Instant,
    now: u64,
    /// The window before, per second (0 once a whole window passed unseen).
    before: f64,
}

/// Whether a woken pass goes ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// Claim (having waited, if the rate called for it).
    Claim,
    /// Another task is gathering the rows this wake-up was for: skip.
    Skip,
}

impl Gather {
    /// Woken passes wait `wait` while more than `above` transfers a second
    /// are being claimed; `above` 0 or a zero `wait` turns gathering off.
    pub fn new(above: u32, wait: Duration) -> Self {
        Gather {
            above,
            wait,
            counted: Mutex::new(Counted { since: Instant::now(), now: 0, before: 0.0 }),
            gathering: AtomicBool::new(false),
            polling: AtomicBool::new(false),
        }
    }

    /// Transfers a second from which woken passes wait (0: never).
    pub fn above(&self) -> u32 {
        self.above
    }

    /// How long a woken pass waits; also the poller's tick.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Whether gathering can happen at all.
    pub fn enabled(&self) -> bool {
        self.above > 0 && !self.wait.is_zero()
    }

    /// The poller says whether it wakes a task every [`Gather::wait`]: while
    /// it does, woken passes claim at once.
    pub fn set_polling(&self, polling: bool) {
        self.polling.store(polling, Ordering::Relaxed);
    }

    /// Counts `n` transfers claimed by a pass.
    pub fn claimed(&self, n: usize) {
        let mut c = self.counted.lock().expect("gather counts");
        c.roll(Instant::now());
        c.now += n as u64;
    }

    /// Transfers claimed a second, lately.
    pub fn rate(&self) -> f64 {
        let mut c = self.counted.lock().expect("gather counts");
        let now = Instant::now();
        c.roll(now);
        let age = now.duration_since(c.since);
        if age < WINDOW / 2 {
            // Too young a window to say much alone.
            c.before.max(c.now as f64 / WINDOW.as_secs_f64())
        } else {
            c.now as f64 / age.as_secs_f64()
        }
    }

    /// Before a pass that follows a wake-up: waits, if the rate calls for
    /// it and no other task is already gathering; skips if one is.
    pub async fn turn(&self) -> Turn {
        if !self.enabled() || self.polling.load(Ordering::Relaxed) || self.rate() < self.above as f64 {
            return Turn::Claim;
        }
        let Some(gathering) = Gathering::start(&self.gathering) else {
            return Turn::Skip;
        };
        tokio::time::sleep(self.wait).await;
        // Before the claim is sent (see the module docs); also if this future
        // is dropped mid-wait (a shutdown deadline), through the guard.
        drop(gathering);
        Turn::Claim
    }
}

impl Counted {
    /// Starts a new window once the current one is [`WINDOW`] old.
    fn roll(&mut self, now: Instant) {
        let age = now.duration_since(self.since);
        if age < WINDOW {
            return;
        }
        self.before = if age < 2 * WINDOW { self.now as f64 / age.as_secs_f64() } else { 0.0 };
        self.now = 0;
        self.since = now;
    }
}

/// The gathering flag, held while one task waits; cleared when dropped.
struct Gathering<'a>(&'a AtomicBool);

impl<'a> Gathering<'a> {
    fn start(flag: &'a AtomicBool) -> Option<Self> {
        // `then`, not `then_some`: a guard built and dropped here would clear
        // the flag another task holds.
        (!flag.swap(true, Ordering::AcqRel)).then(|| Gathering(flag))
    }
}

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn below_the_rate_a_woken_pass_claims_at_once() {
        let g = Gather::new(200, Duration::from_millis(10));
        g.claimed(10); // 40 a second over the window
        tokio::time::advance(WINDOW).await;
        let t = tokio::time::Instant::now();
        assert_eq!(g.turn().await, Turn::Claim);
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn above_it_one_task_waits_and_the_others_skip() {
        let g = std::sync::Arc::new(Gather::new(200, Duration::from_millis(10)));
        g.claimed(200); // 800 a second
        let first = tokio::spawn({
            let g = g.clone();
            async move { g.turn().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(g.turn().await, Turn::Skip, "a second task while the first gathers");
        assert_eq!(g.turn().await, Turn::Skip, "a skip leaves the first one gathering");
        assert_eq!(first.await.unwrap(), Turn::Claim);
        // The flag is down once the first has claimed: the next may gather.
        assert!(!g.gathering.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_cut_short_leaves_no_task_gathering() {
        let g = Gather::new(200, Duration::from_millis(10));
        g.claimed(200);
        let cut = tokio::time::timeout(Duration::from_millis(1), g.turn()).await;
        assert!(cut.is_err());
        assert!(!g.gathering.load(Ordering::Acquire), "a dropped wait must not block every later pass");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lull_drops_the_rate() {
        let g = Gather::new(200, Duration::from_millis(10));
        g.claimed(500);
        assert!(g.rate() >= 200.0);
        tokio::time::advance(2 * WINDOW).await;
        assert_eq!(g.rate(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn while_polling_a_woken_pass_claims_at_once() {
        let g = Gather::new(200, Duration::from_millis(10));
        g.claimed(200);
        g.set_polling(true);
        let t = tokio::time::Instant::now();
        assert_eq!(g.turn().await, Turn::Claim);
        assert_eq!(t.elapsed(), Duration::ZERO, "the poller's tick was the wait");
        g.set_polling(false);
        assert_eq!(g.turn().await, Turn::Claim);
        assert_eq!(t.elapsed(), Duration::from_millis(10));
    }

    #[test]
    fn off_when_asked() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        for g in [Gather::new(0, Duration::from_millis(10)), Gather::new(200, Duration::ZERO)] {
            g.claimed(10_000);
            assert_eq!(rt.block_on(g.turn()), Turn::Claim);
        }
    }
}

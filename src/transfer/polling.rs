//! Polling: above a steady rate, the process claims new transfers on a tick
//! of its own and asks producers not to NOTIFY.
//!
//! The insert trigger's NOTIFY takes PostgreSQL's database-wide notify lock
//! at commit and holds it through the commit's WAL flush, so producers that
//! each insert one transfer and commit wait for one another's flush: at a
//! thousand a second that lock, not the disk, is what caps them (migration
//! `20261202000008_apply_polling.sql` has the measurement). Above the rate
//! at which passes gather anyway (see [`crate::transfer::gather`]) the
//! wake-ups buy nothing: a woken pass waits `gather_wait` before it claims.
//!
//! So while the process's apply tasks claim more than `gather_above`
//! transfers a second, the poller
//! - keeps a lease in `apply_polling` (`until`, [`LEASE`] ahead, renewed
//!   every [`RENEW_EVERY`]); while any worker's lease holds, the trigger
//!   skips its NOTIFY;
//! - wakes one apply task every `gather_wait`, whose pass claims at once.
//!
//! It stops renewing once the rate falls below half of `gather_above` (so a
//! rate near the line does not flap), keeps ticking until the lease it set
//! has ended and [`GRACE`] more (a transaction that inserted just before the
//! end and commits just after), then stops: producers notify again. A
//! transaction that stays open longer than that is found by the apply tasks'
//! poll (`poll_interval`), as a lost notification always was. A worker that
//! dies stops renewing, and its lease ends within [`LEASE`]; one that stops
//! ends the lease it set at once (unless another worker has extended it
//! since), so the other replicas are woken again during a rolling restart.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::transfer::gather::{Gather, WINDOW};

/// How far ahead a renewal sets the lease.
pub const LEASE: Duration = Duration::from_secs(3);

/// How often a polling process renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// How long ticks go on after the lease has ended.
pub const GRACE: Duration = Duration::from_millis(500);

/// Runs the process's poller until `shutdown` (see the module docs): reads
/// the rate from `gather`, wakes `wake` on each tick.
pub async fn run(pool: PgPool, gather: Arc<Gather>, wake: Arc<Notify>, shutdown: CancellationToken) {
    if !gather.enabled() {
        shutdown.cancelled().await;
        return;
    }
    let mut poller = Poller::new(gather.above() as f64, Instant::now());
    let mut was_polling = false;
    // The lease's end as this process last set it (the database's text).
    let mut ours: Option<String> = None;
    loop {
        let rate = gather.rate();
        let plan = poller.plan(rate, Instant::now());
        if plan.renew {
            let asked = Instant::now();
            let renewed = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = renew(&pool) => r,
            };
            match renewed {
                Ok((left, until)) => {
                    poller.renewed(Instant::now(), left);
                    ours = Some(until);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the polling lease; polling on, producers may notify");
                    poller.renew_failed(asked);
                }
            }
        }
        if plan.polling != was_polling {
            was_polling = plan.polling;
            gather.set_polling(plan.polling);
            crate::metrics::metrics().set_apply_polling(plan.polling);
            tracing::info!(polling = plan.polling, rate = rate.round(), "polling for new transfers");
        }
        let pause = if plan.polling {
            wake.notify_one();
            gather.wait()
        } else {
            WINDOW
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    gather.set_polling(false);
    crate::metrics::metrics().set_apply_polling(false);
    if let Some(until) = ours {
        match tokio::time::timeout(Duration::from_secs(1), end_lease(&pool, &until)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not end the polling lease; it ends on its own"),
            Err(_) => tracing::warn!("ending the polling lease timed out; it ends on its own"),
        }
    }
}

/// Ends the lease now if it is still the one this process set (another
/// worker's later one is left alone).
async fn end_lease(pool: &PgPool, until: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE apply_polling SET until = clock_timestamp() WHERE until = $1::text::timestamptz AND until > clock_timestamp()",
        until
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Sets the lease [`LEASE`] ahead (never shortening another worker's);
/// returns how long it now has to run, by the database's clock, and its end.
async fn renew(pool: &PgPool) -> sqlx::Result<(Duration, String)> {
    let row = sqlx::query!(
        r#"INSERT INTO apply_polling (until) VALUES (clock_timestamp() + $1 * interval '1 millisecond')
           ON CONFLICT (only_row) DO UPDATE SET until = GREATEST(apply_polling.until, EXCLUDED.until)
           RETURNING extract(epoch FROM until - clock_timestamp())::float8 AS "left!", until::text AS "until!""#,
        LEASE.as_millis() as f64,
    )
    .fetch_one(pool)
    .await?;
    Ok((Duration::from_secs_f64(row.left.max(0.0)), row.until))
}

/// The poller's decisions, apart from the clock and the database.
#[derive(Debug)]
struct Poller {
    above: f64,
    /// The rate called for polling and has not fallen far enough since.
    renewing: bool,
    /// When the lease this process set ends (local clock, never earlier
    /// than the database's end).
    lease_end: Option<Instant>,
    next_renew: Instant,
}

/// What to do now.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    renew: bool,
    /// Tick: a lease may be holding back producers' wake-ups.
    polling: bool,
}

impl Poller {
    fn new(above: f64, now: Instant) -> Self {
        Poller { above, renewing: false, lease_end: None, next_renew: now }
    }

    fn plan(&mut self, rate: f64, now: Instant) -> Plan {
        if rate >= self.above {
            self.renewing = true;
        } else if rate < self.above / 2.0 {
            self.renewing = false;
        }
        let held = self.lease_end.is_some_and(|end| now < end + GRACE);
        Plan { renew: self.renewing && now >= self.next_renew, polling: self.renewing || held }
    }

    /// The renewal answered at `now` with `left` to run.
    fn renewed(&mut self, now: Instant, left: Duration) {
        self.lease_end = Some(now + left);
        self.next_renew = now + RENEW_EVERY;
    }

    /// The renewal asked at `asked` failed: whether the lease was set is
    /// unknown, so it is taken as set then.
    fn renew_failed(&mut self, asked: Instant) {
        self.lease_end = Some(self.lease_end.map_or(asked + LEASE, |end| end.max(asked + LEASE)));
        self.next_renew = asked + RENEW_EVERY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABOVE: f64 = 200.0;

    #[test]
    fn below_the_rate_nothing_happens() {
        let t = Instant::now();
        let mut p = Poller::new(ABOVE, t);
        assert_eq!(p.plan(150.0, t), Plan { renew: false, polling: false });
    }

    #[test]
    fn above_it_the_lease_is_renewed_every_second_while_ticking() {
        let t = Instant::now();
        let mut p = Poller::new(ABOVE, t);
        assert_eq!(p.plan(300.0, t), Plan { renew: true, polling: true });
        p.renewed(t, LEASE);
        let soon = t + Duration::from_millis(20);
        assert_eq!(p.plan(300.0, soon), Plan { renew: false, polling: true });
        assert_eq!(p.plan(300.0, t + RENEW_EVERY), Plan { renew: true, polling: true });
    }

    #[test]
    fn near_the_line_it_keeps_polling() {
        let t = Instant::now();
        let mut p = Poller::new(ABOVE, t);
        p.plan(300.0, t);
        p.renewed(t, LEASE);
        let later = t + RENEW_EVERY;
        assert_eq!(p.plan(150.0, later), Plan { renew: true, polling: true }, "between half and the rate: no flapping");
    }

    #[test]
    fn after_a_fall_it_ticks_until_its_lease_and_the_grace_have_passed() {
        let t = Instant::now();
        let mut p = Poller::new(ABOVE, t);
        p.plan(300.0, t);
        p.renewed(t, LEASE);
        let fallen = t + Duration::from_millis(100);
        assert_eq!(p.plan(10.0, fallen), Plan { renew: false, polling: true });
        assert_eq!(p.plan(10.0, t + LEASE + GRACE - Duration::from_millis(1)), Plan { renew: false, polling: true });
        assert_eq!(p.plan(10.0, t + LEASE + GRACE), Plan { renew: false, polling: false });
    }

    #[test]
    fn a_failed_renewal_counts_as_a_lease_set() {
        let t = Instant::now();
        let mut p = Poller::new(ABOVE, t);
        p.plan(300.0, t);
        p.renew_failed(t);
        let fallen = t + Duration::from_millis(100);
        assert_eq!(p.plan(0.0, fallen), Plan { renew: false, polling: true });
        assert_eq!(p.plan(0.0, t + LEASE + GRACE), Plan { renew: false, polling: false });
    }
}

//! When the applier claims what: its pacing state, in one struct it holds.
//!
//! - **Claim floors**: rows a batch moves out of PENDING leave dead entries
//!   at the head of the partial index until vacuum removes them, and a claim
//!   from the start walks past all of them: with a large backlog that walk
//!   grows with every batch. While batches come back full, the next claim
//!   starts at the lowest id the last one took; anything below was done,
//!   put off, or held by another worker then. Rows that become claimable
//!   below the floor (a retry time passing, a batch rolled back, a producer
//!   committing late) are found when the floor resets: as soon as a claim
//!   comes back short, and at least every [`FLOOR_TTL`].
//! - **Skips**: how often each row was left for later because another batch
//!   held one of its accounts; at `max_skips` it waits its turn.
//! - **Busy accounts** ([`BusyAccounts`]): accounts held elsewhere, left out
//!   of claims for a while.
//! - **Refund cadence**: during a backlog of transfers, one pass in
//!   [`REFUND_EVERY`] also looks for refunds (each look is three round trips,
//!   and the next pass comes at once anyway); with a refund hint (the `run`
//!   loop's), only when a refund was requested, when the last look found
//!   some, or at least every [`REFUND_POLL`] (a notification can be lost).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::transfer::busy::BusyAccounts;
use crate::transfer::locks::Locks;
use crate::transfer::step::{Claimed, Step};
use crate::transfer::TransferId;

/// The longest a claim floor stands before a claim scans from the start again.
pub const FLOOR_TTL: Duration = Duration::from_secs(1);
/// With a refund hint, refunds are looked for at least this often.
pub const REFUND_POLL: Duration = Duration::from_millis(500);
/// During a backlog of transfers, one pass in this many also looks for refunds.
pub const REFUND_EVERY: u64 = 8;
/// Bound on the skip bookkeeping.
const MAX_TRACKED_SKIPS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct ClaimFloor {
    id: TransferId,
    since: Instant,
}

/// The applier's pacing state (see the module docs).
pub struct Pacing {
    max_skips: u32,
    /// Per step, where its next claim starts.
    floors: Mutex<HashMap<Step, ClaimFloor>>,
    /// Per step, how often each row was skipped for a held account.
    skips: Mutex<HashMap<Step, HashMap<TransferId, u32>>>,
    busy: Arc<BusyAccounts>,
    /// Passes run, to look for refunds every so often during a backlog.
    passes: AtomicU64,
    refund_hint: Option<Arc<AtomicBool>>,
    last_refund_look: Mutex<Instant>,
}

impl Pacing {
    pub fn new(max_skips: u32) -> Self {
        Pacing {
            max_skips,
            floors: Mutex::new(HashMap::new()),
            skips: Mutex::new(HashMap::new()),
            busy: Arc::new(BusyAccounts::default()),
            passes: AtomicU64::new(0),
            refund_hint: None,
            last_refund_look: Mutex::new(Instant::now()),
        }
    }

    pub fn share_busy(&mut self, busy: Arc<BusyAccounts>) {
        self.busy = busy;
    }

    pub fn set_refund_hint(&mut self, hint: Arc<AtomicBool>) {
        self.refund_hint = Some(hint);
    }

    pub fn busy(&self) -> &BusyAccounts {
        &self.busy
    }

    /// Where `step`'s next claim starts.
    pub fn floor(&self, step: Step) -> TransferId {
        let floors = self.floors.lock().expect("floor lock");
        match floors.get(&step) {
            Some(f) if f.id.0 > 0 && f.since.elapsed() < FLOOR_TTL => f.id,
            _ => TransferId(0),
        }
    }

    /// After a claim of `claimed` with `limit`: a full batch raises the floor.
    pub fn set_floor(&self, step: Step, claimed: &[Claimed], limit: i64) {
        let mut floors = self.floors.lock().expect("floor lock");
        let f = floors.entry(step).or_insert(ClaimFloor { id: TransferId(0), since: Instant::now() });
        match claimed.iter().map(|t| t.id).min() {
            Some(lowest) if claimed.len() as i64 >= limit => {
                if f.id.0 == 0 || f.since.elapsed() >= FLOOR_TTL {
                    f.since = Instant::now();
                }
                f.id = lowest;
            }
            _ => f.id = TransferId(0),
        }
    }

    /// The claimed rows skipped `max_skips` times already: this time they
    /// wait their turn.
    pub fn must_wait(&self, step: Step, claimed: &[Claimed]) -> HashSet<TransferId> {
        let skips = self.skips.lock().expect("skips lock");
        let Some(map) = skips.get(&step) else {
            return HashSet::new();
        };
        claimed.iter().filter(|t| map.get(&t.id).is_some_and(|n| *n >= self.max_skips)).map(|t| t.id).collect()
    }

    /// Whether some row of `step` has been skipped often enough to wait its
    /// turn when claimed again: then a batch takes its accounts' locks after
    /// the claim, in order (see `locks`), not with it.
    pub fn turns_due(&self, step: Step) -> bool {
        let skips = self.skips.lock().expect("skips lock");
        skips.get(&step).is_some_and(|map| map.values().any(|n| *n >= self.max_skips))
    }

    /// After a batch: the rows it left for later count one more skip, the
    /// others are forgotten.
    pub fn note_skips(&self, step: Step, claimed: &[Claimed], skipped: &[TransferId]) {
        let mut skips = self.skips.lock().expect("skips lock");
        let map = skips.entry(step).or_default();
        let skipped: HashSet<TransferId> = skipped.iter().copied().collect();
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

    /// What a batch learnt about its accounts, for the claims that follow.
    pub fn note_locks(&self, locks: &Locks) {
        self.busy.held(&locks.held_elsewhere);
        self.busy.skipped(&locks.not_taken);
        self.busy.taken(locks.taken.iter().copied());
    }

    /// Whether this pass looks for refunds too, after a transfer batch that
    /// was full (`backlog`) or not (see the module docs).
    pub fn look_for_refunds(&self, backlog: bool) -> bool {
        let pass = self.passes.fetch_add(1, Relaxed);
        let due = !backlog || pass % REFUND_EVERY == 0;
        let look = match &self.refund_hint {
            None => due,
            Some(hint) => {
                let overdue = self.last_refund_look.lock().expect("refund look").elapsed() >= REFUND_POLL;
                // The hint is consumed whether or not this pass looks: a
                // request it stands for is found by this look or by the
                // next overdue one.
                let hinted = hint.swap(false, Relaxed);
                overdue || (hinted && due)
            }
        };
        if look {
            *self.last_refund_look.lock().expect("refund look") = Instant::now();
        }
        look
    }

    /// After a look for refunds that found `claimed` of them: some found
    /// means look again next time.
    pub fn refunds_found(&self, claimed: usize) {
        if claimed > 0 {
            if let Some(hint) = &self.refund_hint {
                hint.store(true, Relaxed);
            }
        }
    }
}

//! The relay's sends in flight: a bounded set of background tasks, each
//! holding a slot until it has recorded its outcome, so that the relay's loop
//! can claim the next events while earlier ones are still with SQS (see
//! `relay`'s module docs, "Pipelining").

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// At most `limit` tasks at once, each ending in a `T`.
pub struct InFlight<T> {
    slots: Arc<Semaphore>,
    limit: u32,
    tasks: Mutex<JoinSet<T>>,
}

impl<T: Send + 'static> InFlight<T> {
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS) as u32;
        InFlight { slots: Arc::new(Semaphore::new(limit as usize)), limit, tasks: Mutex::new(JoinSet::new()) }
    }

    /// A free slot, waiting for one if all are taken.
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        self.slots.clone().acquire_owned().await.expect("the slots are never closed")
    }

    /// A slot, if fewer than `running` tasks are running now.
    pub fn try_slot_below(&self, running: usize) -> Option<OwnedSemaphorePermit> {
        let now = (self.limit as usize).saturating_sub(self.slots.available_permits());
        if now >= running {
            return None;
        }
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Runs `work` in the background; its slot is free once it has ended.
    pub fn spawn(&self, slot: OwnedSemaphorePermit, work: impl Future<Output = T> + Send + 'static) {
        self.tasks.lock().expect("in-flight set").spawn(async move {
            let out = work.await;
            drop(slot);
            out
        });
    }

    /// What the tasks that have ended returned (none waits). A task that
    /// panicked is reported by `on_panic` and skipped.
    pub fn reap(&self, on_panic: impl Fn(String)) -> Vec<T> {
        let mut tasks = self.tasks.lock().expect("in-flight set");
        let mut out = Vec::new();
        while let Some(done) = tasks.try_join_next() {
            match done {
                Ok(t) => out.push(t),
                Err(e) => on_panic(e.to_string()),
            }
        }
        out
    }

    /// Waits until every task has ended, then returns what they returned.
    pub async fn settle(&self, on_panic: impl Fn(String)) -> Vec<T> {
        // Every slot back means every task has ended (a task frees its slot
        // last); they are then joined without waiting.
        let all = self.slots.acquire_many(self.limit).await.expect("the slots are never closed");
        let mut out = Vec::new();
        loop {
            let next = self.tasks.lock().expect("in-flight set").try_join_next();
            match next {
                Some(Ok(t)) => out.push(t),
                Some(Err(e)) => on_panic(e.to_string()),
                None if self.tasks.lock().expect("in-flight set").is_empty() => break,
                // Freed its slot, not yet seen as finished.
                None => tokio::task::yield_now().await,
            }
        }
        drop(all);
        out
    }

    /// Stops every task at its next await point (shutdown's deadline).
    pub fn abort_all(&self) {
        self.tasks.lock().expect("in-flight set").abort_all();
    }
}

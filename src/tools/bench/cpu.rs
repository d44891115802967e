//! CPU time from the kernel's own counters (`/proc`): of the whole process,
//! and of a group of threads, so that the steady mode can charge the worker
//! with its own CPU and not with the producer's, the consumer's or SQS's
//! floor running in the same process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The process's CPU time so far (user + system), in ms; 10 ms resolution.
pub fn process_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 * 10.0
}

/// The CPU time of a set of threads (a runtime's, registered as they start),
/// including that of those that ended.
#[derive(Clone, Default)]
pub struct ThreadCpu {
    live: Arc<Mutex<Vec<u32>>>,
    ended_ns: Arc<AtomicU64>,
}

impl ThreadCpu {
    /// Counts the calling thread from now on (call it as the thread starts).
    pub fn join(&self) {
        if let Some(tid) = current_tid() {
            self.live.lock().expect("thread set").push(tid);
        }
    }

    /// Keeps the calling thread's CPU time as it ends.
    pub fn leave(&self) {
        if let Some(tid) = current_tid() {
            self.ended_ns.fetch_add(thread_ns(tid), Ordering::Relaxed);
            self.live.lock().expect("thread set").retain(|t| *t != tid);
        }
    }

    /// A tokio runtime of two threads (what `run` gets on two cores), named
    /// `name`, whose threads this counts.
    pub fn runtime(&self, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
        let (start, stop) = (self.clone(), self.clone());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .on_thread_start(move || start.join())
            .on_thread_stop(move || stop.leave())
            .build()
    }

    /// CPU time of the group so far, in ms (the scheduler's ns counters).
    pub fn ms(&self) -> f64 {
        let live: u64 = self.live.lock().expect("thread set").iter().map(|t| thread_ns(*t)).sum();
        (live + self.ended_ns.load(Ordering::Relaxed)) as f64 / 1e6
    }
}

/// The calling thread's id (`/proc/thread-self` is `<pid>/task/<tid>`).
fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// A thread's time on a CPU so far, in ns (`schedstat`'s first field).
fn thread_ns(tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

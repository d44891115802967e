//! What the process knows about itself and its dependencies, for `/readyz`:
//! whether it is shutting down, and how SQS last answered (the queue's
//! `GetQueueAttributes` at start, then every relay pass). The database is not
//! remembered here: a probe asks it, with a bound.

use std::sync::Mutex;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// Shared by `run`, the relay and the admin server.
#[derive(Debug)]
pub struct Health {
    shutdown: CancellationToken,
    sqs: Mutex<SqsHealth>,
}

/// The last word from SQS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqsHealth {
    /// Nothing asked yet.
    Unknown,
    /// The last call was answered (`what` says which).
    Answered { what: String, at: Instant },
    /// The last call failed as a whole (an outage; never fatal: events wait).
    Unavailable { error: String, since: Instant },
}

impl Health {
    pub fn new(shutdown: CancellationToken) -> Self {
        Health { shutdown, sqs: Mutex::new(SqsHealth::Unknown) }
    }

    /// The token whose cancellation means "shut down".
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub fn sqs(&self) -> SqsHealth {
        self.sqs.lock().expect("health lock").clone()
    }

    pub fn sqs_answered(&self, what: impl Into<String>) {
        *self.sqs.lock().expect("health lock") = SqsHealth::Answered { what: what.into(), at: Instant::now() };
    }

    pub fn sqs_unavailable(&self, error: impl Into<String>) {
        let mut sqs = self.sqs.lock().expect("health lock");
        // Keep the start of an outage, not its latest minute.
        let since = match &*sqs {
            SqsHealth::Unavailable { since, .. } => *since,
            _ => Instant::now(),
        };
        *sqs = SqsHealth::Unavailable { error: error.into(), since };
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new(CancellationToken::new())
    }
}

impl std::fmt::Display for SqsHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SqsHealth::Unknown => f.write_str("not asked yet"),
            SqsHealth::Answered { what, at } => write!(f, "ok ({what}, {:.0} s ago)", at.elapsed().as_secs_f64()),
            SqsHealth::Unavailable { error, since } => {
                write!(f, "unavailable for {:.0} s (events wait; not fatal): {error}", since.elapsed().as_secs_f64())
            }
        }
    }
}

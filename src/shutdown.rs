//! Graceful shutdown: decide, tell, wait, and a bound on the waiting.
//!
//! *Decide*: the first SIGINT or SIGTERM cancels one [`CancellationToken`]
//! (before anything is logged: a log write must never stand between a signal
//! and the shutdown it asks for).
//! *Tell*: every task holds a clone and stops starting new passes.
//! *Wait*: the process waits for its tasks (see [`crate::worker`]) up to
//! `--shutdown-timeout-ms`, then abandons what is still running: a dropped
//! transaction rolls back, so nothing is ever half-applied, and what was in
//! flight is claimed again by the next worker.
//! A *second* signal means now: the process exits at once, with the shell's
//! convention for a signal death (130 after SIGINT, 143 after SIGTERM); the
//! database rolls back whatever was open.

use tokio_util::sync::CancellationToken;

/// Exit code after a second SIGINT (128 + 2).
pub const EXIT_SECOND_SIGINT: i32 = 130;
/// Exit code after a second SIGTERM (128 + 15).
pub const EXIT_SECOND_SIGTERM: i32 = 143;

/// Returns a token cancelled on the first SIGINT or SIGTERM; a second one
/// exits the process immediately.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers; stop the worker with SIGKILL");
                return;
            }
        };
        let first = signals.next().await;
        cancel.cancel();
        tracing::info!(
            signal = first.name(),
            "shutdown requested: finishing in-flight work; a second signal exits at once"
        );
        let second = signals.next().await;
        tracing::warn!(signal = second.name(), "second signal: exiting now; open transactions roll back");
        std::process::exit(second.exit_code());
    });
    token
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Int,
    Term,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
        }
    }

    fn exit_code(self) -> i32 {
        match self {
            Signal::Int => EXIT_SECOND_SIGINT,
            Signal::Term => EXIT_SECOND_SIGTERM,
        }
    }
}

#[cfg(unix)]
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::Int,
            _ = self.term.recv() => Signal::Term,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn next(&mut self) -> Signal {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Int
    }
}

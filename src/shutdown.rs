//! Graceful shutdown: decide, tell, wait.
//!
//! *Decide*: the first SIGINT or SIGTERM cancels one [`CancellationToken`].
//! *Tell*: every task holds a clone and stops starting new passes.
//! *Wait*: the process waits for its tasks (see [`crate::worker`]) up to a
//! bound, then logs what was still running. A transaction that is dropped
//! unfinished rolls back, so nothing is ever half-applied either way.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGINT or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing in-flight work");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

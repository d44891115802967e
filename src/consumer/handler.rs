//! What a consumer does with each new event, inside the inbox transaction:
//! a [`Handler`]. Return `Ok` to commit (the message is then deleted),
//! `Err` to roll back (the message comes back later, with backoff).
//!
//! Built in: [`Record`] (the inbox row is the whole effect: other services
//! read `consumed_events`), and [`Exec`] (runs a command with the body on
//! its stdin; exit 0 commits).

use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgConnection;
use tokio::io::AsyncWriteExt;

use crate::outbox::EventBody;

/// An event as a handler gets it.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The event, decoded (native or CloudEvents) into the one event type.
    pub event: EventBody,
    /// The event's native JSON as it arrived (what `consumed_events.body`
    /// holds; for a CloudEvent, its `data`).
    pub body: serde_json::Value,
    /// SQS's id of the message that carried it.
    pub message_id: String,
    /// How many times SQS has handed this message out (1 the first time).
    pub receive_count: u32,
}

impl Delivered {
    /// The event's native JSON as one line.
    pub fn json(&self) -> String {
        self.body.to_string()
    }
}

/// Why a handler did not apply an event (rolled back, retried later).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError(format!("database error: {e}"))
    }
}

/// Applies one new event inside the inbox transaction `tx` (whatever it
/// writes there commits with the inbox row, or not at all).
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, tx: &'a mut PgConnection, event: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// True if the inbox row is the handler's whole effect (it writes and
    /// runs nothing): a received batch then lands in one statement.
    fn records_only(&self) -> bool {
        false
    }
}

/// The inbox row is the whole effect.
pub struct Record;

impl Handler for Record {
    fn handle<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _event: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }

    fn records_only(&self) -> bool {
        true
    }
}

/// Runs a shell command per new event, with the event's JSON on stdin and
/// `TRANSFER_WORKER_EVENT_ID`, `_EVENT_TYPE`, `_TRANSFER_ID` in its
/// environment, while the inbox transaction is open: exit 0 commits, any
/// other exit (or running past the timeout, when it is killed) rolls back.
pub struct Exec {
    command: String,
    timeout: Duration,
}

impl Exec {
    /// Checks that the command's program exists (a path that is an
    /// executable file, or a name found on `PATH`), so that a typo fails at
    /// start, not on every event.
    pub fn new(command: &str, timeout: Duration) -> Result<Exec, String> {
        let program = command.split_whitespace().next().ok_or("--exec needs a command")?;
        if !program_exists(program) {
            return Err(format!("--exec: {program:?} is not an executable file or a command on PATH"));
        }
        Ok(Exec { command: command.to_owned(), timeout })
    }
}

fn program_exists(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
        .unwrap_or(false)
}

impl Handler for Exec {
    fn handle<'a>(&'a self, _tx: &'a mut PgConnection, d: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut child = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&self.command)
                .env("TRANSFER_WORKER_EVENT_ID", &d.event.event_id)
                .env("TRANSFER_WORKER_EVENT_TYPE", d.event.event_type.as_str())
                .env("TRANSFER_WORKER_TRANSFER_ID", d.event.transfer_id.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| HandlerError(format!("cannot start {:?}: {e}", self.command)))?;
            let mut stdin = child.stdin.take().expect("stdin is piped");
            let body = d.json();
            // Written concurrently with the wait: a command that does not
            // read its stdin must not hang on a full pipe.
            let feed = async move {
                let _ = stdin.write_all(body.as_bytes()).await;
                let _ = stdin.write_all(b"\n").await;
            };
            let run = async {
                let (_, status) = tokio::join!(feed, child.wait());
                status
            };
            match tokio::time::timeout(self.timeout, run).await {
                Ok(Ok(s)) if s.success() => Ok(()),
                Ok(Ok(s)) => Err(HandlerError(format!("{:?} exited with {s}", self.command))),
                Ok(Err(e)) => Err(HandlerError(format!("{:?} failed: {e}", self.command))),
                Err(_) => {
                    let _ = child.start_kill();
                    Err(HandlerError(format!("{:?} ran past {:?} and was killed", self.command, self.timeout)))
                }
            }
        })
    }
}

//! The admin server's connections: who gets served when clients crowd the
//! port, and how long anyone may take.
//!
//! The probes (`/livez`, `/readyz`) must answer within a second whatever
//! other clients do: slow headers (slowloris), slow bodies, many connections.
//! So:
//!
//! - every request head must arrive whole within [`HEAD_TIMEOUT`] of the
//!   moment the server starts reading it (hyper's `header_read_timeout`, a
//!   deadline for the whole head, not an idle timer a byte resets), and a
//!   request's body and handler within [`REQUEST_TIMEOUT`] (a middleware in
//!   [`super`]); a socket that neither reads nor writes for
//!   [`IDLE_TIMEOUT`] is closed;
//! - at most [`MAX_CONNECTIONS`] connections are served, but a new one is
//!   never turned away for the old ones: when the server is full it closes
//!   the oldest connection that is not running a probe, idle or reading
//!   first. A probe (one packet, answered in milliseconds) can only be
//!   crowded out by [`MAX_CONNECTIONS`] newer connections arriving within
//!   that time, and never by connections that are merely slow;
//! - the accept loop pauses on resource errors (`EMFILE`) instead of
//!   spinning.
//!
//! HTTP itself is hyper's (HTTP/1.1, keep-alive), serving the axum router.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Connections served at once (beyond it, the oldest non-probe one is closed).
pub const MAX_CONNECTIONS: usize = 64;
/// The whole head of a request (request line and headers) must arrive within
/// this, counted from when the server starts waiting for it (so it also ends
/// a keep-alive connection that stays silent).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// A request's body and its handler must be done within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that neither sends nor receives for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not about one connection (EMFILE...).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);
/// The most a client may send as a request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The paths that answer orchestrators; never closed to make room.
pub fn is_probe(path: &str) -> bool {
    matches!(path, "/livez" | "/readyz" | "/healthz")
}

/// What a connection is doing, for choosing whom to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Doing {
    /// Idle between requests, or still sending a request head.
    Waiting = 0,
    /// In a request other than a probe (console, metrics).
    Request = 1,
    /// In a probe.
    Probe = 2,
}

struct Entry {
    accepted: Instant,
    doing: Arc<AtomicU8>,
    close: CancellationToken,
}

/// The served connections.
#[derive(Default)]
struct Connections {
    next: u64,
    open: HashMap<u64, Entry>,
}

impl Connections {
    /// Registers a new connection, closing the one to make room for it if
    /// the server is full (see the module docs).
    fn admit(this: &Arc<Mutex<Connections>>) -> Slot {
        let mut c = this.lock().expect("connections lock");
        if c.open.len() >= MAX_CONNECTIONS {
            let victim = c
                .open
                .iter()
                .map(|(id, e)| (*id, e.doing.load(Ordering::Relaxed), e.accepted))
                .filter(|(_, doing, _)| *doing != Doing::Probe as u8)
                .min_by_key(|(_, doing, accepted)| (*doing, *accepted))
                .map(|(id, _, _)| id);
            if let Some(id) = victim {
                if let Some(e) = c.open.remove(&id) {
                    e.close.cancel();
                }
            }
        }
        let id = c.next;
        c.next += 1;
        let doing = Arc::new(AtomicU8::new(Doing::Waiting as u8));
        let close = CancellationToken::new();
        c.open.insert(id, Entry { accepted: Instant::now(), doing: doing.clone(), close: close.clone() });
        Slot { id, doing, close, connections: this.clone() }
    }
}

/// One served connection's place; gives it back when dropped.
struct Slot {
    id: u64,
    doing: Arc<AtomicU8>,
    close: CancellationToken,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.lock().expect("connections lock").open.remove(&self.id);
    }
}

/// Marks a connection busy for as long as a request runs.
struct Busy(Arc<AtomicU8>);

impl Busy {
    fn start(doing: &Arc<AtomicU8>, what: Doing) -> Busy {
        doing.store(what as u8, Ordering::Relaxed);
        Busy(doing.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(Doing::Waiting as u8, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, app: Router) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut errors_logged = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if errors_logged < 3 {
                    tracing::warn!(error = %e, pause = ?ACCEPT_ERROR_PAUSE, "admin server cannot accept; pausing");
                    errors_logged += 1;
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let slot = Connections::admit(&connections);
        tokio::spawn(serve_connection(stream, app.clone(), slot));
    }
}

async fn serve_connection(stream: TcpStream, app: Router, slot: Slot) {
    let doing = slot.doing.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let what = if is_probe(request.uri().path()) { Doing::Probe } else { Doing::Request };
        let busy = Busy::start(&doing, what);
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            drop(busy);
            response
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
    let connection = http.serve_connection(TokioIo::new(IdleStream::new(stream)), service);
    tokio::select! {
        result = connection => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended");
            }
        }
        _ = slot.close.cancelled() => tracing::debug!("admin connection closed to make room for a newer one"),
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// A socket that fails once it has been idle (no byte read or written) for
/// [`IDLE_TIMEOUT`].
struct IdleStream {
    stream: TcpStream,
    idle: Pin<Box<Sleep>>,
}

impl IdleStream {
    fn new(stream: TcpStream) -> Self {
        IdleStream { stream, idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)) }
    }

    /// Passes an I/O result through, restarting the idle clock on progress
    /// and failing the connection once it has been idle too long.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "admin connection idle"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for IdleStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.watch(cx, poll)
    }
}

impl AsyncWrite for IdleStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_server_closes_the_oldest_waiting_connection_never_a_probe() {
        let connections = Arc::new(Mutex::new(Connections::default()));
        let slots: Vec<Slot> = (0..MAX_CONNECTIONS).map(|_| Connections::admit(&connections)).collect();
        // The oldest is in a probe, the second oldest in a console request,
        // the third waiting: the third goes first.
        slots[0].doing.store(Doing::Probe as u8, Ordering::Relaxed);
        slots[1].doing.store(Doing::Request as u8, Ordering::Relaxed);
        let new = Connections::admit(&connections);
        assert!(!slots[0].close.is_cancelled() && !slots[1].close.is_cancelled());
        assert!(slots[2].close.is_cancelled());
        assert_eq!(connections.lock().unwrap().open.len(), MAX_CONNECTIONS);
        // When all others are in probes, the oldest other request goes.
        for s in slots[3..].iter().chain([&new]) {
            s.doing.store(Doing::Probe as u8, Ordering::Relaxed);
        }
        let _newer = Connections::admit(&connections);
        assert!(slots[1].close.is_cancelled() && !slots[0].close.is_cancelled());
        drop(slots);
        drop(new);
        assert_eq!(connections.lock().unwrap().open.len(), 1);
    }
}

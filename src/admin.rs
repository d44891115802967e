//! The admin HTTP server of `run`, on axum (hyper underneath: a maintained
//! HTTP stack rather than a hand-written parser):
//!
//! - `/livez`: the process answers;
//! - `/readyz`, `/healthz`: 200 when the database answers a `SELECT 1` within
//!   [`PROBE_TIMEOUT`] and the worker is not shutting down, 503 otherwise,
//!   always within about a second (Kubernetes' default probe timeout is 1 s);
//!   the body also says how SQS last answered (an SQS outage is never a
//!   reason to stop routing: transfers are still applied, events wait);
//! - `/metrics`: Prometheus text, from cheap sources only (see
//!   [`crate::status`]), read at most once a second however often it is
//!   scraped.
//!
//! It cannot hurt the worker: it has a pool of its own (two connections), at
//! most [`MAX_CONNECTIONS`] client connections (the next ones wait in the
//! kernel's backlog), an idle timeout per connection, and an accept loop that
//! pauses on resource errors (`EMFILE`) instead of spinning.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::db::SessionLimits;
use crate::health::Health;
use crate::status;

/// Bound on the database check of `/readyz`.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Client connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that neither sends nor receives for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/metrics` serves the same reading.
const METRICS_TTL: Duration = Duration::from_secs(1);
/// Pause after an accept error that is not about one connection (EMFILE...).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);

struct AdminState {
    pool: PgPool,
    health: Arc<Health>,
    /// One refresh at a time; scrapes within the TTL share the last reading.
    metrics: Mutex<Option<(Instant, String)>>,
}

/// The admin server's own small pool: probes and scrapes never take a
/// connection the worker needs, and a probe while PostgreSQL is down fails
/// within [`PROBE_TIMEOUT`] instead of waiting for a connection.
pub fn pool(options: sqlx::postgres::PgConnectOptions) -> PgPool {
    let limits = SessionLimits { statement_timeout: Some(Duration::from_secs(2)), ..SessionLimits::default() };
    PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(PROBE_TIMEOUT)
        .connect_lazy_with(limits.apply(options.application_name("transfer-worker-admin")))
}

/// Binds `addr` and serves until the task is dropped. Failing to bind is
/// logged, not fatal: the worker's job is moving money, and two replicas on
/// one host must not kill each other over a port.
pub async fn serve(addr: SocketAddr, pool: PgPool, health: Arc<Health>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "admin server not started");
            return;
        }
    };
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin server listening");
    let state = Arc::new(AdminState { pool, health, metrics: Mutex::new(None) });
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = CappedListener { inner: listener, permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)) };
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "admin server stopped");
    }
}

fn text(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let database = match tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&state.pool)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("unavailable: {e}")),
        Err(_) => Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
    };
    let shutting_down = state.health.shutting_down();
    let ready = database.is_ok() && !shutting_down;
    let mut body = String::new();
    let _ = writeln!(body, "{}", if ready { "ready" } else { "not ready" });
    let _ = writeln!(body, "database: {}", database.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| e.clone()));
    let _ = writeln!(body, "sqs: {}", state.health.sqs());
    if shutting_down {
        let _ = writeln!(body, "shutting down");
    }
    text(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut cached = state.metrics.lock().await;
    if let Some((at, body)) = cached.as_ref() {
        if at.elapsed() < METRICS_TTL {
            return metrics_response(body.clone());
        }
    }
    match tokio::time::timeout(Duration::from_secs(3), status::read(&state.pool)).await {
        Ok(Ok(s)) => {
            let body = render_metrics(&s);
            *cached = Some((Instant::now(), body.clone()));
            metrics_response(body)
        }
        Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("database unavailable: {e}\n")),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "database did not answer in time\n".into()),
    }
}

fn metrics_response(body: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

fn render_metrics(s: &status::Status) -> String {
    let mut out = String::new();
    out.push_str("# HELP transfer_worker_transfers Transfers per status.\n");
    out.push_str("# TYPE transfer_worker_transfers gauge\n");
    for (state, n) in &s.transfers {
        let _ = writeln!(out, "transfer_worker_transfers{{status=\"{state}\"}} {n}");
    }
    out.push_str("# HELP transfer_worker_refunds Refunds per refund_status.\n");
    out.push_str("# TYPE transfer_worker_refunds gauge\n");
    for (state, n) in &s.refunds {
        let _ = writeln!(out, "transfer_worker_refunds{{status=\"{state}\"}} {n}");
    }
    out.push_str("# HELP transfer_worker_outbox_events Outbox events per state (held: pending behind a dead event).\n");
    out.push_str("# TYPE transfer_worker_outbox_events gauge\n");
    let o = &s.outbox;
    for (state, n) in [("pending", o.pending), ("published", o.published), ("dead", o.dead), ("held", o.held)] {
        let _ = writeln!(out, "transfer_worker_outbox_events{{state=\"{state}\"}} {n}");
    }
    out.push_str("# HELP transfer_worker_oldest_unpublished_age_seconds Age of the oldest event not yet published.\n");
    out.push_str("# TYPE transfer_worker_oldest_unpublished_age_seconds gauge\n");
    let _ = writeln!(out, "transfer_worker_oldest_unpublished_age_seconds {}", s.oldest_unpublished_age_s);
    out
}

/// A TCP listener that serves at most as many connections as it has permits,
/// and pauses (rather than spins) on accept errors that are not about one
/// connection, such as running out of file descriptors.
struct CappedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let mut errors_logged = 0u32;
        loop {
            // Waiting for a permit leaves further connections in the
            // kernel's backlog: nothing is accepted that cannot be served.
            let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
            match self.inner.accept().await {
                Ok((stream, addr)) => return (CappedStream::new(stream, permit), addr),
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    if errors_logged < 3 {
                        tracing::warn!(error = %e, pause = ?ACCEPT_ERROR_PAUSE, "admin server cannot accept; pausing");
                        errors_logged += 1;
                    }
                    drop(permit);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// A served connection: holds its permit, and fails once it has been idle
/// (no byte read or written) for [`IDLE_TIMEOUT`], so that a client that
/// connects and says nothing cannot keep a permit forever.
struct CappedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
}

impl CappedStream {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit) -> Self {
        CappedStream { stream, _permit: permit, idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)) }
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

impl AsyncRead for CappedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.watch(cx, poll)
    }
}

impl AsyncWrite for CappedStream {
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

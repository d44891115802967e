//! The admin HTTP server of `run`, on axum (hyper underneath: a maintained
//! HTTP stack rather than a hand-written parser):
//!
//! - `/livez`: the process answers;
//! - `/readyz`, `/healthz`: 200 when the database answers a `SELECT 1` within
//!   [`PROBE_TIMEOUT`] and the worker is not shutting down, 503 otherwise,
//!   always within about a second (Kubernetes' default probe timeout is 1 s);
//!   the body also says how SQS last answered (an SQS outage is never a
//!   reason to stop routing: transfers are still applied, events wait);
//! - `/metrics`: the process's counters and histograms, and gauges from
//!   cheap sources only (see [`crate::status`] and [`crate::metrics`]), the
//!   database read at most once a second however often it is scraped;
//! - `/`: the dead-event console (see [`console`]).
//!
//! It cannot hurt the worker: it has a pool of its own (two connections), at
//! most [`MAX_CONNECTIONS`] client connections (the next ones wait in the
//! kernel's backlog), an idle timeout per connection, and an accept loop that
//! pauses on resource errors (`EMFILE`) instead of spinning.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::db::SessionLimits;
use crate::health::Health;
use crate::status;

mod console;
mod listener;

use listener::CappedListener;
pub use listener::{IDLE_TIMEOUT, MAX_CONNECTIONS};

/// Bound on the database check of `/readyz`.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How long `/metrics` serves the same reading of the database gauges.
const METRICS_TTL: Duration = Duration::from_secs(1);
/// A reading older than this is not shown (the gauges are left out).
const METRICS_STALE: Duration = Duration::from_secs(30);

struct AdminState {
    pool: PgPool,
    health: Arc<Health>,
    /// One refresh at a time; scrapes within the TTL share the last reading.
    metrics: Mutex<Option<(Instant, status::Status)>>,
    /// Who may requeue from the console.
    access: console::Access,
    rates: Mutex<console::Rates>,
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
pub async fn serve(addr: SocketAddr, pool: PgPool, health: Arc<Health>, admin_token: Option<String>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "admin server not started");
            return;
        }
    };
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin server listening");
    let access = console::Access::for_address(addr, admin_token);
    let state = Arc::new(AdminState {
        pool,
        health,
        metrics: Mutex::new(None),
        access,
        rates: Mutex::new(console::Rates::default()),
    });
    // The console's rates need samples whether or not anyone looks.
    let sampler = {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                state.rates.lock().await.sample();
                tokio::time::sleep(console::RATE_SAMPLE_EVERY).await;
            }
        })
    };
    let _stop_sampler = AbortOnDrop(sampler);
    let app = Router::new()
        .route("/", get(console::page))
        .route("/requeue", post(console::requeue_one))
        .route("/requeue-all", post(console::requeue_all))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = CappedListener::new(listener);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "admin server stopped");
    }
}

/// Aborts a task when dropped (the server's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
    // The database gauges are read at most once per METRICS_TTL, by one
    // scrape at a time; the process's own counters are always current.
    let mut cached = state.metrics.lock().await;
    let fresh = cached.as_ref().is_some_and(|(at, _)| at.elapsed() < METRICS_TTL);
    if !fresh {
        match tokio::time::timeout(Duration::from_secs(3), status::read(&state.pool)).await {
            Ok(Ok(s)) => *cached = Some((Instant::now(), s)),
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics: database gauges not read"),
            Err(_) => tracing::warn!("metrics: database gauges not read in time"),
        }
    }
    let status = cached.as_ref().filter(|(at, _)| at.elapsed() < METRICS_STALE).map(|(_, s)| s);
    let body = crate::metrics::metrics().render(status);
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response()
}

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
//! - `/`, `/transfer`: the console (see `console`).
//!
//! It cannot hurt the worker, and no client of it can starve the probes:
//! - it has connections of its own: one held for the probes' database check
//!   (which no console read can take; its answer is shared by the probes of
//!   the same [`READINESS_TTL`]) and two for the console and `/metrics`
//!   (whose status read is shared by all readers for a second);
//! - a deadline for each request's head ([`HEAD_TIMEOUT`]) and for its body
//!   and handler ([`REQUEST_TIMEOUT`]), a cap on connections that makes room
//!   for a new one by closing the oldest that is not in a probe, and an
//!   accept loop that pauses on resource errors (see `listener`);
//! - the console answers only its own host names and acts only on requests
//!   from its own pages (see [`access`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::db::SessionLimits;
use crate::health::Health;
use crate::status;

pub mod access;
mod chart;
mod console;
mod history;
mod listener;
mod metrics;
mod transfer_view;
mod views;

use access::Access;
pub use listener::{HEAD_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS, REQUEST_TIMEOUT};

/// Bound on the database check of `/readyz`.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Probes within this of a database check share its answer.
pub const READINESS_TTL: Duration = Duration::from_millis(200);
/// How long `/metrics` and the console serve the same reading of the database.
const STATUS_TTL: Duration = Duration::from_secs(1);
/// A reading older than this is not shown in `/metrics` (the gauges are left out).
const METRICS_STALE: Duration = Duration::from_secs(30);
/// The largest request body accepted (the console's forms are a few bytes).
const MAX_BODY_BYTES: usize = 16 * 1024;

/// The admin server's own connections to the database: the worker's are
/// never taken, and the probes' is never taken by the console.
#[derive(Clone)]
pub struct Pools {
    /// One connection, for the probes' `SELECT 1` only.
    pub probe: PgPool,
    /// Two connections, for `/metrics` and the console.
    pub console: PgPool,
}

impl Pools {
    /// Lazy pools: a probe while PostgreSQL is down fails within
    /// [`PROBE_TIMEOUT`] instead of waiting for a connection.
    pub fn new(options: PgConnectOptions) -> Pools {
        let limits = SessionLimits { statement_timeout: Some(Duration::from_secs(2)), ..SessionLimits::default() };
        let options = limits.apply(options.application_name("transfer-worker-admin"));
        let pool = |n| {
            PgPoolOptions::new()
                .max_connections(n)
                .min_connections(0)
                .acquire_timeout(PROBE_TIMEOUT)
                .connect_lazy_with(options.clone())
        };
        Pools { probe: pool(1), console: pool(2) }
    }

    pub async fn close(&self) {
        tokio::join!(self.probe.close(), self.console.close());
    }
}

/// What the admin server serves: the worker's (probes, metrics with the
/// database gauges, the console) or a consumer's (probes and metrics only:
/// the consumer's database has no outbox to show).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Worker,
    Consumer,
}

/// How the admin server may be reached and who may act from its console.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    pub role: Role,
    /// `--admin-token`: what the console's actions need (see [`access`]).
    pub token: Option<String>,
    /// `--admin-allowed-hosts`: names besides IP addresses and `localhost`
    /// the console answers to.
    pub allowed_hosts: Vec<String>,
}

struct AdminState {
    pool: PgPool,
    probe_pool: PgPool,
    health: Arc<Health>,
    /// The last database check of the probes, shared for [`READINESS_TTL`].
    readiness: Mutex<Option<(Instant, Result<(), String>)>>,
    /// The last status read, shared by `/metrics` and the console.
    status: StatusCache,
    access: Access,
    /// The last hour, for the console's rates and chart.
    history: Mutex<history::History>,
    role: Role,
}

/// Binds `addr` and serves until the task is dropped. Failing to bind is
/// logged, not fatal: the worker's job is moving money, and two replicas on
/// one host must not kill each other over a port.
pub async fn serve(addr: SocketAddr, pools: Pools, health: Arc<Health>, config: AdminConfig) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "admin server not started");
            return;
        }
    };
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin server listening");
    let state = Arc::new(AdminState {
        pool: pools.console,
        probe_pool: pools.probe,
        health,
        readiness: Mutex::new(None),
        status: StatusCache::default(),
        access: Access::new(addr, config.token, &config.allowed_hosts),
        history: Mutex::new(history::History::default()),
        role: config.role,
    });
    // The console's rates and chart need samples whether or not anyone looks.
    let sampler = (state.role == Role::Worker).then(|| {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                // (Its own small read, not the status cache: a sample must
                // not make the next /metrics or page view a second stale.)
                let backlog = status::backlog(&state.pool).await.ok();
                state.history.lock().await.sample(backlog);
                tokio::time::sleep(history::SAMPLE_EVERY).await;
            }
        })
    });
    let _stop_sampler = sampler.map(AbortOnDrop);
    listener::serve(listener, router(state)).await;
}

fn router(state: Arc<AdminState>) -> Router {
    let console = Router::new()
        .route("/", get(console::page))
        .route("/requeue", post(console::requeue_one))
        .route("/requeue-all", post(console::requeue_all))
        .route("/transfer", get(console::transfer))
        .route("/pause", post(console::pause))
        .route("/resume", post(console::resume))
        .route("/replay", post(console::replay_transfer))
        .route_layer(middleware::from_fn_with_state(state.clone(), known_host));
    let probes = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics));
    let app = if state.role == Role::Worker { probes.merge(console) } else { probes };
    app.layer(DefaultBodyLimit::max(MAX_BODY_BYTES)).layer(middleware::from_fn(deadline)).with_state(state)
}

/// A request's body and handler are done within [`REQUEST_TIMEOUT`], or it
/// is answered 408 and its connection freed.
async fn deadline(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => text(StatusCode::REQUEST_TIMEOUT, format!("request not done within {REQUEST_TIMEOUT:?}\n")),
    }
}

/// The console answers only the host names of [`access`] (DNS rebinding).
async fn known_host(State(state): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    if state.access.host_allowed(request.headers()) {
        next.run(request).await
    } else {
        text(
            StatusCode::FORBIDDEN,
            "this Host is not one the console answers: use its IP address or localhost, \
             or name it in --admin-allowed-hosts\n"
                .into(),
        )
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

/// The probes' database check: `SELECT 1` on the probes' own connection,
/// within [`PROBE_TIMEOUT`], its answer shared by every probe of the next
/// [`READINESS_TTL`] (one check at a time; the others wait for it).
async fn database_ready(state: &AdminState) -> Result<(), String> {
    let mut last = state.readiness.lock().await;
    if let Some((at, answer)) = last.as_ref() {
        if at.elapsed() < READINESS_TTL {
            return answer.clone();
        }
    }
    let answer = match tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&state.probe_pool)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("unavailable: {e}")),
        Err(_) => Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
    };
    *last = Some((Instant::now(), answer.clone()));
    answer
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let database = database_ready(&state).await;
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

/// One status read shared by every reader for [`STATUS_TTL`]: the first
/// reader after that reads (the others wait for it), so any number of
/// scrapers and console readers cost the database one read a second.
#[derive(Default)]
struct StatusCache {
    last: Mutex<Option<(Instant, status::Status)>>,
}

impl StatusCache {
    /// A reading at most [`STATUS_TTL`] old, or why there is none.
    async fn read(&self, pool: &PgPool) -> Result<(Instant, status::Status), String> {
        let mut last = self.last.lock().await;
        if let Some((at, s)) = last.as_ref().filter(|(at, _)| at.elapsed() < STATUS_TTL) {
            return Ok((*at, s.clone()));
        }
        let fresh = match tokio::time::timeout(Duration::from_secs(3), status::read(pool)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("database unavailable: {e}")),
            Err(_) => return Err("the database did not answer in time".to_string()),
        };
        *last = Some((Instant::now(), fresh.clone()));
        Ok((Instant::now(), fresh))
    }

    /// The last reading, however old (for `/metrics` while the database is down).
    async fn last(&self) -> Option<(Instant, status::Status)> {
        self.last.lock().await.clone()
    }

    /// Drops the reading (after an action changed what it shows).
    async fn forget(&self) {
        *self.last.lock().await = None;
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    // The database gauges are read at most once per STATUS_TTL; the
    // process's own counters are always current.
    if state.role == Role::Consumer {
        let body = metrics::render(None);
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        )
            .into_response();
    }
    let reading = match state.status.read(&state.pool).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: database gauges not read");
            state.status.last().await
        }
    };
    let status = reading.as_ref().filter(|(at, _)| at.elapsed() < METRICS_STALE).map(|(_, s)| s);
    let body = metrics::render(status);
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response()
}

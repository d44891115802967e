//! The console at `/`: server-rendered pages (no script, no build step,
//! nothing fetched from elsewhere, so it works offline) for an operator
//! during an incident:
//!
//! - `/`: the pause banner (what, since when, why) with its resume button;
//!   the counts per state, the chart of the last hour (see `chart`), the
//!   rates of the last minutes, the oldest unpublished event, the dead
//!   events with their last error and what they hold back, each with a
//!   requeue button, plus one for all; the pause buttons;
//! - `/transfer?q=<id or key>`: one transfer, as `transfer show` tells it,
//!   with a replay button (see `transfer_view`).
//!
//! Every action (requeue, pause, resume, replay) is a POST, allowed by the
//! rules of [`super::access`] (its Host, its origin and CSRF token, the
//! admin token where one is set); the page says which applies. Pages are
//! rendered by maud (which escapes everything), `/` from a status read
//! shared by every reader for a second, so many readers cost the database
//! one read a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::access::{Access, Credentials};
use super::transfer_view::{transfer_page, TransferPage};
use super::views::{self, ConsolePage, Notice};
use super::AdminState;
use crate::controls::{self, Part};
use crate::error::Error;
use crate::metrics::metrics;
use crate::outbox::replay::{replay, Selection};
use crate::outbox::requeue::{requeue, EventRef};
use crate::status::Status;
use crate::transfer::show::{show, Lookup};
use crate::transfer::{IdempotencyKey, TransferId, TransferStatus};

/// The windows of the rates table.
const RATE_WINDOWS: [(Duration, &str); 3] =
    [(Duration::from_secs(60), "1 min"), (Duration::from_secs(300), "5 min"), (Duration::from_secs(900), "15 min")];

/// Pending transfers and unpublished events: the chart's backlog (as
/// [`crate::status::backlog`] counts it).
fn backlog(status: &Status) -> i64 {
    let o = &status.outbox;
    status.transfers.get(&TransferStatus::Pending).copied().unwrap_or(0) + o.pending + o.held + o.dead
}

pub async fn page(State(state): State<Arc<AdminState>>, headers: HeaderMap, Query(notice): Query<Notice>) -> Response {
    let status = state.status.read(&state.pool).await.map(|(_, s)| s);
    let (rates, points) = {
        let mut h = state.history.lock().await;
        h.sample(status.as_ref().ok().map(backlog));
        (RATE_WINDOWS.map(|(w, label)| (label, h.per_minute(w))), h.points(Instant::now()))
    };
    let (csrf, cookie) = csrf(&state, &headers);
    let page = ConsolePage {
        status: &status,
        rates: &rates,
        mode: state.access.mode(),
        notice: &notice,
        csrf: &csrf,
        points: &points,
    };
    respond(views::console(&page).into_string(), cookie)
}

/// The session's CSRF token, and the cookie that starts a session if the
/// request had none.
fn csrf(state: &AdminState, headers: &HeaderMap) -> (String, Option<header::HeaderValue>) {
    let (session, cookie) = match state.access.session(headers) {
        Some(s) => (s, None),
        None => {
            let (s, cookie) = Access::new_session();
            (s, Some(cookie))
        }
    };
    (state.access.csrf_token(&session), cookie)
}

/// A page, never framed, never cached.
fn respond(html: String, cookie: Option<header::HeaderValue>) -> Response {
    let mut response = Html(html).into_response();
    let h = response.headers_mut();
    if let Some(cookie) = cookie {
        h.insert(header::SET_COOKIE, cookie);
    }
    // Never framed by another page (clickjacking), never cached.
    h.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    h.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static("frame-ancestors 'none'"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

/// `/transfer?q=`: the query, and what the last action there said.
#[derive(Debug, Deserialize)]
pub struct TransferQuery {
    #[serde(default)]
    q: String,
    replayed: Option<i64>,
    error: Option<String>,
}

pub async fn transfer(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(query): Query<TransferQuery>,
) -> Response {
    let q = query.q.trim();
    let found = look_up(&state, q).await;
    let (csrf, cookie) = csrf(&state, &headers);
    let notice = Notice { replayed: query.replayed, error: query.error, ..Default::default() };
    let page = TransferPage { query: q, found: &found, mode: state.access.mode(), notice: &notice, csrf: &csrf };
    let mut response = respond(transfer_page(&page).into_string(), cookie);
    if found.is_err() {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}

/// A transfer by id, or by idempotency key (a key may look like a number:
/// an id that does not exist is tried as a key).
async fn look_up(state: &AdminState, q: &str) -> Result<crate::transfer::show::TransferView, String> {
    if q.is_empty() {
        return Err("Type a transfer id or idempotency key.".into());
    }
    if let Ok(id) = q.parse::<TransferId>() {
        match show(&state.pool, &Lookup::Id(id)).await {
            Err(Error::NotFound { .. }) => {}
            found => return found.map_err(|e| e.to_string()),
        }
    }
    let key = IdempotencyKey::new(q)?;
    show(&state.pool, &Lookup::Key(key)).await.map_err(|e| e.to_string())
}

#[derive(Debug, Default, Deserialize)]
pub struct ActionForm {
    event: Option<String>,
    /// `pause`/`resume`: apply, relay or all.
    part: Option<String>,
    reason: Option<String>,
    /// `replay`: the transfer's id.
    transfer: Option<String>,
    token: Option<String>,
    csrf: Option<String>,
}

/// The form of an action. Parsed leniently: who may not act learns nothing
/// from how a request is malformed.
fn form(body: &[u8]) -> ActionForm {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

/// The access check every action passes first: `Some(403)` if refused.
fn refused(state: &AdminState, headers: &HeaderMap, form: &ActionForm) -> Option<Response> {
    let given = Credentials { token: form.token.as_deref(), csrf: form.csrf.as_deref() };
    let refused = state.access.may_act(headers, &given).err()?;
    tracing::warn!(why = %refused.0, "console action refused");
    Some((StatusCode::FORBIDDEN, format!("{}\n", refused.0)).into_response())
}

pub async fn requeue_one(State(state): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = form(&body);
    if let Some(response) = refused(&state, &headers, &form) {
        return response;
    }
    let Some(event) = form.event.as_deref().map(str::parse::<EventRef>) else {
        return (StatusCode::BAD_REQUEST, "which event? (form field `event`)\n").into_response();
    };
    let event = match event {
        Ok(e) => e,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    act(&state, Some(&event)).await
}

pub async fn requeue_all(State(state): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = form(&body);
    if let Some(response) = refused(&state, &headers, &form) {
        return response;
    }
    act(&state, None).await
}

async fn act(state: &AdminState, event: Option<&EventRef>) -> Response {
    let response = match requeue(&state.pool, event, None).await {
        Ok(r) => {
            metrics().events_requeued(r.requeued);
            tracing::info!(requeued = r.requeued, event = ?event.map(|e| e.to_string()), "requeued from the console");
            Redirect::to(&format!("/?requeued={}", r.requeued)).into_response()
        }
        Err(e) => {
            let msg: String = url_encode(&e.to_string());
            Redirect::to(&format!("/?error={msg}")).into_response()
        }
    };
    state.status.forget().await;
    response
}

/// `part` of a pause/resume form.
fn parts(form: &ActionForm) -> Option<&'static [Part]> {
    match form.part.as_deref() {
        Some("apply") => Some(&[Part::Apply]),
        Some("relay") => Some(&[Part::Relay]),
        Some("all") => Some(&Part::ALL),
        _ => None,
    }
}

pub async fn pause(State(state): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    set_paused(&state, &headers, &form(&body), true).await
}

pub async fn resume(State(state): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    set_paused(&state, &headers, &form(&body), false).await
}

async fn set_paused(state: &AdminState, headers: &HeaderMap, form: &ActionForm, paused: bool) -> Response {
    if let Some(response) = refused(state, headers, form) {
        return response;
    }
    let Some(parts) = parts(form) else {
        return (StatusCode::BAD_REQUEST, "which part? (form field `part`: apply, relay or all)\n").into_response();
    };
    let reason = if paused { form.reason.as_deref() } else { None };
    let names: Vec<&str> = parts.iter().map(|p| p.as_str()).collect();
    let response = match controls::set(&state.pool, parts, paused, reason).await {
        Ok(_) => {
            let done = format!("{} {}", names.join(" and "), if paused { "paused" } else { "resumed" });
            tracing::warn!(parts = ?names, paused, reason = ?reason, "pause state set from the console");
            Redirect::to(&format!("/?done={}", url_encode(&done))).into_response()
        }
        Err(e) => Redirect::to(&format!("/?error={}", url_encode(&e.to_string()))).into_response(),
    };
    state.status.forget().await;
    response
}

pub async fn replay_transfer(State(state): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = form(&body);
    if let Some(response) = refused(&state, &headers, &form) {
        return response;
    }
    let id = match form.transfer.as_deref().map(str::parse::<TransferId>) {
        Some(Ok(id)) => id,
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        None => return (StatusCode::BAD_REQUEST, "which transfer? (form field `transfer`)\n").into_response(),
    };
    let selection = Selection { transfer: Some(id), ..Default::default() };
    let back = format!("/transfer?q={id}");
    match replay(&state.pool, &selection, false).await {
        Ok(r) => {
            tracing::info!(transfer = %id, replayed = r.replayed, "replayed from the console");
            Redirect::to(&format!("{back}&replayed={}", r.replayed)).into_response()
        }
        Err(e) => Redirect::to(&format!("{back}&error={}", url_encode(&e.to_string()))).into_response(),
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

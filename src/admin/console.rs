//! The dead-event console at `/`: one server-rendered page (no script, no
//! build step, nothing fetched from elsewhere, so it works offline) with the
//! counts per state, the rates of the last minutes, the oldest unpublished
//! event, and the dead events with their last error and what they hold back,
//! each with a requeue button, plus one for all.
//!
//! Requeue is a POST, allowed by the rules of [`super::access`] (its Host,
//! its origin and CSRF token, the admin token where one is set); the page
//! says which applies. The page is rendered by [`super::views`] (maud, which
//! escapes everything), from a status read shared by every reader for a
//! second, so many readers cost the database one read a second.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::access::{Access, Credentials};
use super::views::{self, ConsolePage, Notice};
use super::AdminState;
use crate::metrics::metrics;
use crate::outbox::requeue::{requeue, EventRef};

/// How far back the rates look, and how often they are sampled.
const RATE_WINDOWS: [(Duration, &str); 3] =
    [(Duration::from_secs(60), "1 min"), (Duration::from_secs(300), "5 min"), (Duration::from_secs(900), "15 min")];
pub const RATE_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Samples of the process's totals (applied, published), for the rates.
#[derive(Default)]
pub struct Rates {
    samples: VecDeque<(Instant, u64, u64)>,
}

impl Rates {
    pub fn sample(&mut self) {
        let (applied, published) = metrics().totals();
        let now = Instant::now();
        self.samples.push_back((now, applied, published));
        while self.samples.front().is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(960)) {
            self.samples.pop_front();
        }
    }

    /// Per minute over `window`: (applied, published), from the oldest
    /// sample inside the window to now.
    fn per_minute(&self, window: Duration) -> Option<(f64, f64)> {
        let (now, applied, published) = *self.samples.back()?;
        let (then, a0, p0) = *self.samples.iter().find(|(t, _, _)| now.duration_since(*t) <= window)?;
        let minutes = now.duration_since(then).as_secs_f64() / 60.0;
        (minutes > 0.0).then(|| ((applied - a0) as f64 / minutes, (published - p0) as f64 / minutes))
    }
}

pub async fn page(State(state): State<Arc<AdminState>>, headers: HeaderMap, Query(notice): Query<Notice>) -> Response {
    let status = state.status.read(&state.pool).await.map(|(_, s)| s);
    let rates = {
        let mut r = state.rates.lock().await;
        r.sample();
        RATE_WINDOWS.map(|(w, label)| (label, r.per_minute(w)))
    };
    let (session, cookie) = match state.access.session(&headers) {
        Some(s) => (s, None),
        None => {
            let (s, cookie) = Access::new_session();
            (s, Some(cookie))
        }
    };
    let csrf = state.access.csrf_token(&session);
    let page = ConsolePage { status: &status, rates: &rates, mode: state.access.mode(), notice: &notice, csrf: &csrf };
    let mut response = Html(views::console(&page).into_string()).into_response();
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

#[derive(Debug, Deserialize)]
pub struct ActionForm {
    event: Option<String>,
    token: Option<String>,
    csrf: Option<String>,
}

/// The form of an action. Parsed leniently: who may not act learns nothing
/// from how a request is malformed.
fn form(body: &[u8]) -> ActionForm {
    serde_urlencoded::from_bytes(body).unwrap_or(ActionForm { event: None, token: None, csrf: None })
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
    let response = match requeue(&state.pool, event).await {
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

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

//! The dead-event console at `/`: one server-rendered page (no script, no
//! build step, nothing fetched from elsewhere, so it works offline) with the
//! counts per state, the rates of the last minutes, the oldest unpublished
//! event, and the dead events with their last error and what they hold back,
//! each with a requeue button, plus one for all.
//!
//! Requeue is a POST. When the admin server listens on a loopback address the
//! actions are open (whoever can reach it is on the machine); otherwise each
//! needs the admin token (`--admin-token`), as `Authorization: Bearer <token>`
//! or the page's token field, and without a configured token there are no
//! actions at all. The page says which applies. Read-only views stay open.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::AdminState;
use crate::metrics::metrics;
use crate::outbox::requeue::{requeue, EventRef};
use crate::status;

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

/// Who may act from the console.
#[derive(Debug, Clone)]
pub enum Access {
    /// Loopback address: actions open.
    Open,
    /// Actions need this token.
    Token(String),
    /// Not loopback and no token configured: read-only.
    ReadOnly,
}

impl Access {
    pub fn for_address(addr: std::net::SocketAddr, token: Option<String>) -> Access {
        match token.filter(|t| !t.is_empty()) {
            Some(t) if !addr.ip().is_loopback() => Access::Token(t),
            _ if addr.ip().is_loopback() => Access::Open,
            _ => Access::ReadOnly,
        }
    }

    fn allows(&self, headers: &HeaderMap, form_token: Option<&str>) -> bool {
        match self {
            Access::Open => true,
            Access::ReadOnly => false,
            Access::Token(t) => {
                let bearer = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                [bearer, form_token].into_iter().flatten().any(|given| constant_time_eq(given.as_bytes(), t.as_bytes()))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Deserialize)]
pub struct Notice {
    requeued: Option<u64>,
    error: Option<String>,
}

pub async fn page(State(state): State<Arc<AdminState>>, Query(notice): Query<Notice>) -> Response {
    let reading = tokio::time::timeout(Duration::from_secs(3), status::read(&state.pool)).await;
    let status = match reading {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("database unavailable: {e}")),
        Err(_) => Err("the database did not answer in time".to_string()),
    };
    let rates = {
        let mut r = state.rates.lock().await;
        r.sample();
        RATE_WINDOWS.map(|(w, label)| (label, r.per_minute(w)))
    };
    Html(render(&status, &rates, &state.access, &notice)).into_response()
}

fn render(
    status: &Result<status::Status, String>,
    rates: &[(&str, Option<(f64, f64)>)],
    access: &Access,
    notice: &Notice,
) -> String {
    let mut h = String::with_capacity(8 * 1024);
    h.push_str(concat!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>transfer-worker</title><meta name=\"viewport\" content=\"width=device-width\">",
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}",
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}",
        "th{background:#f3f3f3}.num{text-align:right}.bad{color:#a00;font-weight:bold}.note{color:#555}",
        ".flash{background:#eef7ee;border:1px solid #9c9;padding:.5em}.err{background:#fbeaea;border:1px solid #d99;padding:.5em}",
        "form{display:inline}button{cursor:pointer}code{font-size:90%}</style></head><body>",
        "<h1>transfer-worker</h1>"
    ));
    if let Some(n) = notice.requeued {
        let _ = write!(h, "<p class=\"flash\" id=\"flash\">Requeued {n} event(s).</p>");
    }
    if let Some(e) = &notice.error {
        let _ = write!(h, "<p class=\"err\" id=\"flash\">{}</p>", escape(e));
    }
    let s = match status {
        Ok(s) => s,
        Err(e) => {
            let _ = write!(h, "<p class=\"err\">{}</p></body></html>", escape(e));
            return h;
        }
    };
    h.push_str("<h2>Counts</h2><table><tr><th>transfers</th>");
    for (k, _) in &s.transfers {
        let _ = write!(h, "<th>{k}</th>");
    }
    h.push_str("</tr><tr><td></td>");
    for v in s.transfers.values() {
        let _ = write!(h, "<td class=\"num\">{v}</td>");
    }
    h.push_str("</tr></table><table><tr><th>refunds</th>");
    for k in s.refunds.keys() {
        let _ = write!(h, "<th>{k}</th>");
    }
    h.push_str("</tr><tr><td></td>");
    for v in s.refunds.values() {
        let _ = write!(h, "<td class=\"num\">{v}</td>");
    }
    let o = &s.outbox;
    let _ = write!(
        h,
        "</tr></table><table id=\"outbox\"><tr><th>events</th><th>pending</th><th>published</th><th>dead</th><th>held</th></tr>\
         <tr><td></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num{}\">{}</td><td class=\"num\">{}</td></tr></table>",
        o.pending,
        o.published,
        if o.dead > 0 { " bad" } else { "" },
        o.dead,
        o.held
    );
    let _ = write!(h, "<p>Oldest unpublished event: <b id=\"oldest\">{:.1} s</b></p>", s.oldest_unpublished_age_s);
    h.push_str("<h2>Rates (this process, per minute)</h2><table><tr><th>over</th><th>transfers applied</th><th>events published</th></tr>");
    for (label, r) in rates {
        match r {
            Some((a, p)) => {
                let _ =
                    write!(h, "<tr><td>{label}</td><td class=\"num\">{a:.0}</td><td class=\"num\">{p:.0}</td></tr>");
            }
            None => {
                let _ =
                    write!(h, "<tr><td>{label}</td><td colspan=\"2\" class=\"note\">not enough samples yet</td></tr>");
            }
        }
    }
    h.push_str("</table>");

    h.push_str("<h2>Dead events</h2>");
    let token_field = match access {
        Access::Token(_) => "<input type=\"password\" name=\"token\" placeholder=\"admin token\" required> ",
        _ => "",
    };
    match access {
        Access::Open => h.push_str(
            "<p class=\"note\">Actions are open: this server listens on a loopback address.</p>",
        ),
        Access::Token(_) => h.push_str(
            "<p class=\"note\">This server is reachable beyond this machine: requeueing needs the admin token \
             (<code>--admin-token</code>), in the field below or as <code>Authorization: Bearer</code>.</p>",
        ),
        Access::ReadOnly => h.push_str(
            "<p class=\"note\">Read-only: this server is reachable beyond this machine and no admin token is set \
             (<code>--admin-token</code>), so no action is possible here. Use <code>transfer-worker outbox requeue</code>.</p>",
        ),
    }
    if s.dead_events.is_empty() {
        h.push_str("<p id=\"no-dead\">No dead events.</p>");
    } else {
        if !matches!(access, Access::ReadOnly) {
            let _ = write!(
                h,
                "<form method=\"post\" action=\"/requeue-all\" id=\"requeue-all\">{token_field}<button type=\"submit\">Requeue all {} dead events</button></form>",
                s.outbox.dead
            );
        }
        h.push_str(
            "<table id=\"dead\"><tr><th>outbox id</th><th>event id</th><th>transfer</th><th>type</th><th>attempts</th>\
             <th>holds back</th><th>last error</th><th></th></tr>",
        );
        for e in &s.dead_events {
            let _ = write!(
                h,
                "<tr><td class=\"num\">{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td>{}</td><td>",
                e.id,
                escape(&e.event_id),
                e.transfer_id,
                escape(&e.event_type),
                e.attempts,
                e.held,
                escape(e.last_error.as_deref().unwrap_or(""))
            );
            if !matches!(access, Access::ReadOnly) {
                let _ = write!(
                    h,
                    "<form method=\"post\" action=\"/requeue\"><input type=\"hidden\" name=\"event\" value=\"{}\">{token_field}\
                     <button type=\"submit\" class=\"requeue\" data-event=\"{}\">Requeue</button></form>",
                    e.id, e.id
                );
            }
            h.push_str("</td></tr>");
        }
        h.push_str("</table>");
        if s.outbox.dead > s.dead_events.len() as i64 {
            let _ = write!(h, "<p class=\"note\">… and {} more.</p>", s.outbox.dead - s.dead_events.len() as i64);
        }
    }
    h.push_str(
        "<p class=\"note\">Also: <a href=\"/metrics\">/metrics</a>, <a href=\"/readyz\">/readyz</a>.</p></body></html>",
    );
    h
}

#[derive(Debug, Deserialize)]
pub struct RequeueForm {
    event: Option<String>,
    token: Option<String>,
}

/// The form of a requeue POST. Parsed only after the caller is allowed:
/// who may not act learns nothing from how a request is malformed.
fn form(body: &[u8]) -> RequeueForm {
    serde_urlencoded::from_bytes(body).unwrap_or(RequeueForm { event: None, token: None })
}

pub async fn requeue_one(State(state): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = form(&body);
    if !state.access.allows(&headers, form.token.as_deref()) {
        return forbidden(&state.access);
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
    if !state.access.allows(&headers, form.token.as_deref()) {
        return forbidden(&state.access);
    }
    act(&state, None).await
}

async fn act(state: &AdminState, event: Option<&EventRef>) -> Response {
    match requeue(&state.pool, event).await {
        Ok(r) => {
            metrics().events_requeued(r.requeued);
            tracing::info!(requeued = r.requeued, event = ?event.map(|e| e.to_string()), "requeued from the console");
            Redirect::to(&format!("/?requeued={}", r.requeued)).into_response()
        }
        Err(e) => {
            let msg: String = url_encode(&e.to_string());
            Redirect::to(&format!("/?error={msg}")).into_response()
        }
    }
}

fn forbidden(access: &Access) -> Response {
    let why = match access {
        Access::ReadOnly => "no admin token is configured (--admin-token): the console is read-only on this address\n",
        _ => "the admin token is required (Authorization: Bearer <token>, or the page's token field)\n",
    };
    (StatusCode::FORBIDDEN, why).into_response()
}

/// HTML-escapes text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_needed_only_beyond_loopback() {
        let loopback: std::net::SocketAddr = "127.0.0.1:9187".parse().unwrap();
        let public: std::net::SocketAddr = "0.0.0.0:9187".parse().unwrap();
        let none = HeaderMap::new();
        assert!(Access::for_address(loopback, None).allows(&none, None));
        assert!(!Access::for_address(public, None).allows(&none, Some("x")));
        let access = Access::for_address(public, Some("s3cret".into()));
        assert!(!access.allows(&none, None));
        assert!(!access.allows(&none, Some("wrong")));
        assert!(access.allows(&none, Some("s3cret")));
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(access.allows(&bearer, None));
    }

    #[test]
    fn text_from_the_database_is_escaped() {
        assert_eq!(
            escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }
}

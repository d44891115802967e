//! The console's pages, as maud templates: every value is HTML-escaped by
//! construction (maud escapes whatever `(expr)` renders; nothing here is
//! marked pre-escaped but the static style sheet), so text from the database
//! (a last error, a state name, an idempotency key) can never become markup.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::access::Mode;
use super::chart;
use super::history::Point;
use crate::controls::PauseState;
use crate::status::Status;

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
th{background:#f3f3f3}.num{text-align:right}.bad{color:#a00;font-weight:bold}.note{color:#555}\
.flash{background:#eef7ee;border:1px solid #9c9;padding:.5em}.err{background:#fbeaea;border:1px solid #d99;padding:.5em}\
form{display:inline}button{cursor:pointer}code{font-size:90%}\
.banner{background:#fff4d6;border:2px solid #e0a800;padding:.6em .8em;margin:0 0 1em}.banner b{color:#8a5a00}\
figure.chart{margin:.5em 0 1em}figcaption{font-weight:600;margin-bottom:.2em}.legend{font-size:90%;color:#333}\
.controls form{margin-right:.5em}.controls input[type=text]{width:22em}ul.pubs{margin:0;padding-left:1.2em}";

/// What the last action said (from the redirect's query).
#[derive(Debug, Default, serde::Deserialize)]
pub struct Notice {
    pub requeued: Option<u64>,
    /// What `pause`/`resume` from the console did (`"apply paused"`).
    pub done: Option<String>,
    /// Events queued by a replay.
    pub replayed: Option<i64>,
    pub error: Option<String>,
}

/// Rates over a window: (label, per minute applied and published, if known).
pub type Rate<'a> = (&'a str, Option<(f64, f64)>);

/// Everything the dead-event page shows.
pub struct ConsolePage<'a> {
    pub status: &'a Result<Status, String>,
    pub rates: &'a [Rate<'a>],
    pub mode: &'a Mode,
    pub notice: &'a Notice,
    /// The CSRF token every form carries.
    pub csrf: &'a str,
    /// The last hour, for the chart.
    pub points: &'a [Point],
}

pub(super) fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                meta name="viewport" content="width=device-width";
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

/// The hidden fields of every action form: the CSRF token, and the admin
/// token's field where one is needed.
pub(super) fn credentials(mode: &Mode, csrf: &str) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(csrf);
        @if matches!(mode, Mode::Token(_)) {
            input type="password" name="token" placeholder="admin token" required;
            " "
        }
    }
}

pub fn console(p: &ConsolePage<'_>) -> Markup {
    page(
        "transfer-worker",
        html! {
            h1 { "transfer-worker" }
            (notice(p.notice))
            @if let Ok(s) = p.status {
                (pause_banner(&s.paused, p.mode, p.csrf))
            }
            (lookup_form(""))
            @match p.status {
                Err(e) => p.err { (e) },
                Ok(s) => (status(s, p)),
            }
        },
    )
}

fn status(s: &Status, p: &ConsolePage<'_>) -> Markup {
    let o = &s.outbox;
    html! {
        h2 { "Counts" }
        table {
            tr { th { "transfers" } @for k in s.transfers.keys() { th { (k) } } }
            tr { td {} @for v in s.transfers.values() { td.num { (v) } } }
        }
        table {
            tr { th { "refunds" } @for k in s.refunds.keys() { th { (k) } } }
            tr { td {} @for v in s.refunds.values() { td.num { (v) } } }
        }
        table #outbox {
            tr { th { "events" } th { "pending" } th { "published" } th { "dead" } th { "held" } }
            tr {
                td {}
                td.num { (o.pending) }
                td.num { (o.published) }
                td.num.bad[o.dead > 0] { (o.dead) }
                td.num { (o.held) }
            }
        }
        @if !s.destinations.is_empty() {
            table #destinations {
                tr { th { "destination" } th { "pending" } th { "published" } th { "dead" } th { "held" } }
                @for (d, c) in &s.destinations {
                    tr {
                        td { @if d.is_empty() { span.note { "(no route: recorded, not delivered)" } } @else { code { (d) } } }
                        td.num { (c.pending) }
                        td.num { (c.published) }
                        td.num.bad[c.dead > 0] { (c.dead) }
                        td.num { (c.held) }
                    }
                }
            }
        }
        p { "Oldest unpublished event: " b #oldest { (format!("{:.1} s", s.oldest_unpublished_age_s)) } }
        h2 { "The last hour" }
        (chart::chart(p.points))
        h2 { "Rates (this process, per minute)" }
        table {
            tr { th { "over" } th { "transfers applied" } th { "events published" } }
            @for (label, rate) in p.rates {
                tr {
                    td { (label) }
                    @match rate {
                        Some((a, pub_)) => { td.num { (format!("{a:.0}")) } td.num { (format!("{pub_:.0}")) } }
                        None => td.note colspan="2" { "not enough samples yet" },
                    }
                }
            }
        }
        h2 { "Dead events" }
        @match p.mode {
            Mode::Open => p.note { "Actions are open to this machine: this server listens on a loopback address and no admin token is set." },
            Mode::Token(_) => p.note {
                "Requeueing needs the admin token (" code { "--admin-token" } "), in the field below or as "
                code { "Authorization: Bearer" } "."
            },
            Mode::ReadOnly => p.note {
                "Read-only: this server is reachable beyond this machine and no admin token is set ("
                code { "--admin-token" } "), so no action is possible here. Use "
                code { "transfer-worker outbox requeue" } "."
            },
        }
        @if s.dead_events.is_empty() {
            p #no-dead { "No dead events." }
        } @else {
            @if *p.mode != Mode::ReadOnly {
                form method="post" action="/requeue-all" #requeue-all {
                    (credentials(p.mode, p.csrf))
                    button type="submit" { "Requeue all " (o.dead) " dead events" }
                }
            }
            table #dead {
                tr {
                    th { "outbox id" } th { "event id" } th { "transfer" } th { "type" } th { "destination" }
                    th { "attempts" } th { "holds back" } th { "last error" } th {}
                }
                @for e in &s.dead_events {
                    tr {
                        td.num { (e.id) }
                        td { code { (e.event_id) } }
                        td.num { (e.transfer_id) }
                        td { (e.event_type) }
                        td { code { (e.destination) } }
                        td.num { (e.attempts) }
                        td.num { (e.held) }
                        td { (e.last_error.as_deref().unwrap_or("")) }
                        td {
                            @if *p.mode != Mode::ReadOnly {
                                form method="post" action="/requeue" {
                                    input type="hidden" name="event" value=(e.id);
                                    (credentials(p.mode, p.csrf))
                                    button type="submit" .requeue data-event=(e.id) { "Requeue" }
                                }
                            }
                        }
                    }
                }
            }
            @if o.dead > s.dead_events.len() as i64 {
                p.note { "… and " (o.dead - s.dead_events.len() as i64) " more." }
            }
        }
        (pause_controls(&s.paused, p.mode, p.csrf))
        p.note { "Also: " a href="/metrics" { "/metrics" } ", " a href="/readyz" { "/readyz" } "." }
    }
}

/// What the last action said.
pub(super) fn notice(n: &Notice) -> Markup {
    html! {
        @if let Some(k) = n.requeued {
            p.flash #flash { "Requeued " (k) " event(s)." }
        }
        @if let Some(done) = &n.done {
            p.flash #flash { (done) "." }
        }
        @if let Some(k) = n.replayed {
            p.flash #flash { "Queued " (k) " event(s) for replay: they go out again with their original ids." }
        }
        @if let Some(e) = &n.error {
            p.err #flash { (e) }
        }
    }
}

/// The parts that are paused, as words ("apply and relay").
fn paused_parts(state: &PauseState) -> String {
    let parts: Vec<&str> =
        [("apply", state.apply), ("relay", state.relay)].iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
    parts.join(" and ")
}

/// The banner at the top while anything is paused, with its resume buttons.
fn pause_banner(state: &PauseState, mode: &Mode, csrf: &str) -> Markup {
    html! {
        @if state.apply || state.relay {
            div.banner #paused role="status" {
                b { "Paused: " (paused_parts(state)) }
                " on every replica, since " (state.since.as_deref().unwrap_or("?"))
                @match &state.reason {
                    Some(r) => { ". Reason: " q #pause-reason { (r) } }
                    None => ". No reason was given.",
                }
                @if state.apply { " Transfers wait as PENDING; producers can still enqueue." }
                @if state.relay { " Events wait in the outbox; nothing is counted against them." }
                @if *mode != Mode::ReadOnly {
                    " "
                    form method="post" action="/resume" {
                        (credentials(mode, csrf))
                        @let part = if state.apply && state.relay { "all" } else if state.apply { "apply" } else { "relay" };
                        input type="hidden" name="part" value=(part);
                        button type="submit" #resume { "Resume " (paused_parts(state)) }
                    }
                }
            }
        }
    }
}

/// Pause buttons (with a reason) for what is not paused yet.
fn pause_controls(state: &PauseState, mode: &Mode, csrf: &str) -> Markup {
    html! {
        h2 { "Pause" }
        p.note {
            "Pausing stops every replica claiming within about a second (a batch already claimed finishes); "
            "it holds across restarts and for replicas started later, until resumed. Same as "
            code { "transfer-worker pause apply|relay|all --reason …" } "."
        }
        @if *mode == Mode::ReadOnly {
            p.note { "Read-only here: use " code { "transfer-worker pause" } "." }
        } @else if state.apply && state.relay {
            p.note { "Everything is paused." }
        } @else {
            form.controls method="post" action="/pause" #pause {
                (credentials(mode, csrf))
                input type="text" name="reason" maxlength=(crate::controls::REASON_MAX)
                    placeholder="reason, and who you are (shown to everyone)";
                " "
                @if !state.apply { button type="submit" name="part" value="apply" #pause-apply { "Pause apply" } " " }
                @if !state.relay { button type="submit" name="part" value="relay" #pause-relay { "Pause relay" } " " }
                button type="submit" name="part" value="all" #pause-all { "Pause all" }
            }
        }
    }
}

/// The transfer lookup: by id or idempotency key.
pub(super) fn lookup_form(value: &str) -> Markup {
    html! {
        form method="get" action="/transfer" #lookup {
            label { "Transfer (id or idempotency key): " input type="text" name="q" value=(value) required; }
            " "
            button type="submit" { "Look up" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DeadEvent, OutboxCounts};

    #[test]
    fn text_from_the_database_is_escaped_wherever_it_lands() {
        let nasty = "<script>alert(\"x\")</script>&'";
        let status = Status {
            transfers: [(crate::transfer::TransferStatus::Pending, 1)].into(),
            refunds: Default::default(),
            outbox: OutboxCounts { pending: 0, published: 0, dead: 1, held: 0 },
            oldest_unpublished_age_s: 0.0,
            dead_events: vec![DeadEvent {
                id: 1,
                destination: nasty.into(),
                event_id: nasty.into(),
                transfer_id: 2,
                event_type: nasty.into(),
                attempts: 5,
                last_error: Some(nasty.into()),
                held: 0,
            }],
            paused: PauseState { apply: true, relay: false, reason: Some(nasty.into()), since: Some(nasty.into()) },
            destinations: [(nasty.to_owned(), OutboxCounts::default())].into(),
        };
        let notice = Notice { error: Some(nasty.into()), ..Default::default() };
        // (State names are enums now; what comes from the database as text
        // is the dead events' fields and the notice.)
        let html = console(&ConsolePage {
            status: &Ok(status),
            rates: &[],
            mode: &Mode::Open,
            notice: &notice,
            csrf: "\"><script>",
            points: &[],
        })
        .into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("id=\"paused\""), "the pause banner shows: {html}");
        assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;"), "{html}");
    }
}

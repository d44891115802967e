//! The console's page of one transfer (`/transfer?q=<id or key>`): the same
//! facts as `transfer show` (its state, refund, and every event with its
//! attempts, last error and publications), and a button that replays its
//! published events. Rendered by maud like the rest (everything escaped).

use maud::{html, Markup};

use super::access::Mode;
use super::views::{credentials, lookup_form, notice, page, Notice};
use crate::transfer::show::TransferView;

/// What the page shows: the transfer, or why there is none.
pub struct TransferPage<'a> {
    pub query: &'a str,
    pub found: &'a Result<TransferView, String>,
    pub mode: &'a Mode,
    pub notice: &'a Notice,
    pub csrf: &'a str,
}

pub fn transfer_page(p: &TransferPage<'_>) -> Markup {
    let title = match p.found {
        Ok(t) => format!("transfer {}", t.transfer_id),
        Err(_) => "transfer".to_owned(),
    };
    page(
        &title,
        html! {
            p { a href="/" { "← transfer-worker" } }
            (lookup_form(p.query))
            (notice(p.notice))
            @match p.found {
                Err(e) => p.err #not-found { (e) },
                Ok(t) => (transfer(t, p)),
            }
        },
    )
}

fn transfer(t: &TransferView, p: &TransferPage<'_>) -> Markup {
    let optional = |v: &Option<String>| v.clone().unwrap_or_default();
    html! {
        h1 { "Transfer " (t.transfer_id) }
        table #transfer {
            tr { th { "idempotency key" } td { code { (t.idempotency_key) } } }
            tr { th { "from → to" } td { (t.from_account) " → " (t.to_account) } }
            tr { th { "amount" } td.num { (t.amount) } }
            tr { th { "status" } td #status { (t.status) } }
            @if let Some(reason) = &t.failure_reason { tr { th { "failure reason" } td { (reason) } } }
            tr { th { "created" } td { (t.created_at) } }
            tr { th { "applied" } td { (optional(&t.applied_at)) } }
            @if t.attempts > 0 || t.last_error.is_some() {
                tr { th { "unexpected errors" } td { (t.attempts) " " (optional(&t.last_error)) } }
            }
        }
        @if let Some(r) = &t.refund {
            h2 { "Refund" }
            table #refund {
                tr { th { "status" } td { (r.status) } }
                tr { th { "amount" } td.num { (r.amount) } }
                @if let Some(reason) = &r.failure_reason { tr { th { "failure reason" } td { (reason) } } }
                tr { th { "requested" } td { (optional(&r.requested_at)) } }
                tr { th { "applied" } td { (optional(&r.applied_at)) } }
            }
        }
        h2 { "Events" }
        @if t.events.is_empty() {
            p.note { "No events (still PENDING, or pruned)." }
        } @else {
            table #events {
                tr {
                    th { "outbox id" } th { "event id" } th { "type" } th { "destination" } th { "state" }
                    th { "attempts" } th { "last error" } th { "occurred" } th { "publications" }
                }
                @for e in &t.events {
                    tr {
                        td.num { (e.outbox_id) }
                        td { code { (e.event_id) } }
                        td { (e.event_type) }
                        td {
                            @match e.destination.as_deref() {
                                None => span.note { "not routed yet" },
                                Some("") => span.note { "no route" },
                                Some(d) => code { (d) },
                            }
                        }
                        td { (e.state) @if e.held { " (held behind a dead event)" } }
                        td.num { (e.attempts) }
                        td { (optional(&e.last_error)) }
                        td { (e.occurred_at) }
                        td.publications {
                            @if e.publications.is_empty() { span.note { "not yet" } }
                            ul.pubs {
                                @for (i, at) in e.publications.iter().enumerate() {
                                    li { (at) @if i == 0 { " (first)" } @else { " (replay)" } }
                                }
                            }
                            @if e.replays > 0 && e.published_at.is_none() { span.note { "replay " (e.replays) " waiting" } }
                        }
                    }
                }
            }
            @let published = t.events.iter().filter(|e| e.state == crate::outbox::EventState::Published).count();
            @if *p.mode == Mode::ReadOnly {
                p.note { "Read-only here: " code { "transfer-worker outbox replay --transfer " (t.transfer_id) } "." }
            } @else if published > 0 {
                form method="post" action="/replay" #replay {
                    (credentials(p.mode, p.csrf))
                    input type="hidden" name="transfer" value=(t.transfer_id);
                    button type="submit" { "Replay its " (published) " published event(s)" }
                }
                p.note {
                    "A replay publishes them again, in their order, with their original event ids and bodies "
                    "(consumers deduplicate by event id); the first publication stays on record."
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::EventState;
    use crate::transfer::show::EventView;
    use crate::transfer::{RefundStatus, TransferStatus};

    #[test]
    fn the_page_escapes_what_producers_wrote_and_lists_every_publication() {
        let nasty = "<img src=x onerror=alert(1)>";
        let view = TransferView {
            transfer_id: 7,
            idempotency_key: nasty.into(),
            from_account: 1,
            to_account: 2,
            amount: 10,
            status: TransferStatus::Succeeded,
            failure_reason: None,
            refund_status: RefundStatus::None,
            refund_amount: None,
            attempts: 0,
            last_error: Some(nasty.into()),
            created_at: "2026-12-02T06:00:00.000000Z".into(),
            applied_at: None,
            refund: None,
            events: vec![EventView {
                outbox_id: 1,
                event_id: "e".into(),
                destination: Some("http://h/1/q".into()),
                event_type: "transfer.succeeded".into(),
                state: EventState::Published,
                held: false,
                attempts: 0,
                last_error: Some(nasty.into()),
                occurred_at: "t0".into(),
                published_at: Some("t2".into()),
                first_published_at: Some("t1".into()),
                publications: vec!["t1".into(), "t2".into()],
                replays: 1,
            }],
        };
        let html = transfer_page(&TransferPage {
            query: nasty,
            found: &Ok(view),
            mode: &Mode::Open,
            notice: &Notice::default(),
            csrf: "c",
        })
        .into_string();
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("<li>t1 (first)</li><li>t2 (replay)</li>"), "{html}");
        assert!(html.contains("Replay its 1 published event(s)"), "{html}");
    }
}

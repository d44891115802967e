//! Continuing a producer's trace.
//!
//! A transfer may carry its producer's W3C `traceparent` (CLI flag, library
//! argument or SQL column). The worker's spans for it, `transfer.apply` (or
//! `refund.apply`) and `outbox.publish`, are children of that context, and
//! each event goes out with the `traceparent` of its publish span, so a
//! consumer's span is a child of the publish that delivered it: one trace
//! from the producer's request to the consumer.
//!
//! The spans are ordinary `tracing` spans at INFO level. With no
//! OpenTelemetry layer installed (the default: no OTLP endpoint set, see the
//! binary's `telemetry` module) they export nothing, and events carry the
//! producer's own `traceparent` unchanged. Only transfers that carry a trace
//! context get spans: untraced work pays nothing.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the remote context `traceparent` and returns the
/// `traceparent` to hand to whoever continues the trace: the span's own when
/// it is exported, else `traceparent` itself.
pub(crate) fn continue_remote(span: &tracing::Span, traceparent: &str) -> String {
    let Some(remote) = parse(traceparent) else {
        return traceparent.to_owned();
    };
    let trace_id = remote.trace_id();
    if span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote)).is_err() {
        // No OpenTelemetry layer, or the span is disabled by the log filter.
        return traceparent.to_owned();
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    if own.is_valid() && own.trace_id() == trace_id {
        format(&own)
    } else {
        traceparent.to_owned()
    }
}

/// Reads a `traceparent` header value (already checked by the producer API
/// and the column's CHECK); `None` for an invalid one (all-zero ids).
fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.split('-');
    let (_version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let cx = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    cx.is_valid().then_some(cx)
}

fn format(cx: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", cx.trace_id(), cx.span_id(), cx.trace_flags().to_u8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_and_prints_back_the_same() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(format(&parse(tp).unwrap()), tp);
        assert!(parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_none());
    }

    #[test]
    fn without_a_tracer_the_producers_context_passes_through() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = tracing::info_span!("test");
        assert_eq!(continue_remote(&span, tp), tp);
    }
}

//! Where the process's logs and traces go: log lines on stderr (text or
//! JSON, filtered by `RUST_LOG`), and, when an OTLP endpoint is set, the
//! worker's spans to an OpenTelemetry collector.
//!
//! Tracing export follows OpenTelemetry's own environment variables, so it
//! is configured as every other service of an operator's is:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (the collector's OTLP/HTTP base address,
//! `/v1/traces` is appended) or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as
//! is) turns it on; `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_SERVICE_NAME` (default `transfer-worker`) and
//! `OTEL_RESOURCE_ATTRIBUTES` apply; `OTEL_SDK_DISABLED=true` turns it off.
//! Unset, nothing is exported and no exporter thread runs.
//!
//! Spans are exported in batches from the SDK's own thread, never from the
//! worker's tasks: a slow or unreachable collector drops spans (the SDK's
//! queue is bounded), it never slows a transfer or an event.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use super::LogFormat;

/// What must be flushed before the process exits.
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

/// Installs the log writer and, if configured, the trace exporter. A trace
/// export set-up that fails (a malformed endpoint, say) is reported and
/// leaves tracing off: telemetry never stops the worker.
pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // If stderr's reader goes away, log lines are dropped; the fallback
        // (an `eprintln!` of the write error) would panic the task that logged.
        .log_internal_errors(false);
    let logs = match format {
        // One JSON object per line: timestamp, level, target, fields (the
        // message among them) and the span the line was logged in.
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).boxed(),
        // Colour only on a terminal: a log file gets no escape codes.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    let (traces, trace_error) = match otlp_configured().then(tracer_provider) {
        None => (None, None),
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(e)) => (None, Some(e)),
    };
    // The exporter sees the worker's own spans only, whatever RUST_LOG says
    // about log lines (and never the HTTP client's, which would feed back).
    let spans = traces.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("transfer-worker"))
            .with_filter(Targets::new().with_target("transfer_worker", tracing::Level::INFO))
    });
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(spans).init();
    if let Some(e) = trace_error {
        tracing::error!(error = %e, "cannot set up the OTLP trace exporter; traces are not exported");
    } else if traces.is_some() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Telemetry { traces }
}

impl Telemetry {
    /// Sends the spans still queued, waiting at most `timeout`.
    pub fn flush(self, timeout: Duration) {
        if let Some(provider) = self.traces {
            if let Err(e) = provider.shutdown_with_timeout(timeout) {
                tracing::warn!(error = %e, "not every span was exported before exit");
            }
        }
    }
}

fn otlp_configured() -> bool {
    let set = |name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider() -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("transfer-worker");
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

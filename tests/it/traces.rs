//! The worker's spans continue a producer's trace and reach an OpenTelemetry
//! collector over OTLP/HTTP; the event a consumer receives carries the
//! context of the span that published it. The collector here is a real
//! HTTP server decoding real OTLP protobuf; a dead collector costs nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

use crate::helpers::{signal, wait_exit, wait_for, KillOnDrop, TestDb, TestQueue};

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    kind: i32,
    service: String,
    attributes: Vec<(String, String)>,
}

impl Exported {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP trace receiver on a free loopback port: `POST /v1/traces`
/// with a protobuf `ExportTraceServiceRequest`, as collectors accept it.
async fn collector() -> (String, Arc<Mutex<Vec<Exported>>>) {
    let spans: Arc<Mutex<Vec<Exported>>> = Arc::default();
    let store = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                let mut got = store.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| value(a.value.as_ref()))
                        .unwrap_or_default();
                    for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                        got.push(Exported {
                            name: span.name,
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_span_id: hex(&span.parent_span_id),
                            kind: span.kind,
                            service: service.clone(),
                            attributes: span
                                .attributes
                                .iter()
                                .map(|a| (a.key.clone(), value(a.value.as_ref())))
                                .collect(),
                        });
                    }
                }
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_spans_continue_the_producers_trace_and_the_consumer_continues_the_publish() {
    let (endpoint, spans) = collector().await;
    let db = TestDb::new().await;
    let queue = TestQueue::new(false).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let (trace_id, producer_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let tp = format!("00-{trace_id}-{producer_span}-01");
    let out = db
        .cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "5", "--key", "traced", "--traceparent", &tp])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    db.enqueue_sql("untraced", 1, 2, 5).await;

    let mut cmd = db.worker_command(&queue.url, &[]);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint).env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let mut w = KillOnDrop(cmd.spawn().unwrap());
    let messages = queue.receive_traced(2).await;
    wait_for("spans of the apply and the publish", Duration::from_secs(30), || {
        let n = spans.lock().unwrap().len();
        async move { n >= 2 }
    })
    .await;
    signal(&w.0, "TERM");
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());

    let spans = spans.lock().unwrap().clone();
    // Only the traced transfer has spans, all in the producer's trace.
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == trace_id && s.service == "transfer-worker"), "{spans:#?}");
    let apply = spans.iter().find(|s| s.name == "transfer.apply").unwrap_or_else(|| panic!("{spans:#?}"));
    let publish = spans.iter().find(|s| s.name == "outbox.publish").unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(apply.parent_span_id, producer_span, "apply continues the producer's span");
    assert_eq!(apply.attribute("outcome"), Some("succeeded"));
    assert_eq!(publish.parent_span_id, producer_span, "publish continues the producer's span");
    assert_eq!(publish.kind, SpanKind::Producer as i32);
    assert_eq!(publish.attribute("outcome"), Some("sent"));
    assert_eq!(publish.attribute("event_type"), Some("transfer.succeeded"));
    let id = db.scalar("SELECT id FROM transfers WHERE idempotency_key = 'traced'").await;
    assert_eq!(apply.attribute("transfer_id"), Some(id.to_string().as_str()));

    // The consumer gets the publish span's context: same trace, child of the publish.
    let traced = messages.iter().find(|(k, _, _)| k == "traced").expect("the traced event");
    assert_eq!(traced.2.as_deref(), Some(format!("00-{trace_id}-{}-01", publish.span_id).as_str()), "{messages:?}");
    let untraced = messages.iter().find(|(k, _, _)| k == "untraced").expect("the untraced event");
    assert_eq!(untraced.2, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_the_worker_nothing() {
    let db = TestDb::new().await;
    let queue = TestQueue::new(true).await;
    db.open_account(1, 1_000).await;
    db.open_account(2, 0).await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for i in 0..20 {
        let key = format!("k{i}");
        let out =
            db.cli(&["enqueue", "--from", "1", "--to", "2", "--amount", "1", "--key", &key, "--traceparent", tp]).await;
        assert_eq!(out.code, 0, "{out:?}");
    }
    // Nothing listens on port 9 (discard) here: every export fails.
    let mut cmd = db.worker_command(&queue.url, &[]);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9").env("OTEL_BSP_SCHEDULE_DELAY", "50");
    let mut w = KillOnDrop(cmd.spawn().unwrap());
    let messages = queue.receive_traced(20).await;
    assert_eq!(messages.len(), 20);
    assert!(messages
        .iter()
        .all(|(_, _, t)| t.as_deref().is_some_and(|t| t.contains("0af7651916cd43dd8448eb211c80319c"))));
    signal(&w.0, "TERM");
    let started = std::time::Instant::now();
    assert!(wait_exit(&mut w.0, Duration::from_secs(30)).await.success());
    assert!(started.elapsed() < Duration::from_secs(10), "exit took {:?}", started.elapsed());
    assert_eq!(db.total_balance().await, 1_000);
}

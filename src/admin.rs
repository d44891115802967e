//! The admin HTTP server of `run`: `/livez` (the process answers), `/readyz`
//! and `/healthz` (the database answers), `/metrics` (Prometheus text: the
//! `status` counts as gauges, read from the database at scrape time, so they
//! are the same for every replica and survive restarts).
//!
//! Deliberately tiny (HTTP/1.0-style, one request per connection, GET only):
//! it serves probes and scrapes, nothing else, and needs no web framework.

use std::fmt::Write as _;
use std::net::SocketAddr;

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status;

/// Binds `addr`. Failing to bind is logged, not fatal: the worker's job is
/// moving money, and two replicas on one host must not kill each other over a port.
pub async fn serve(addr: SocketAddr, pool: PgPool, shutdown: CancellationToken) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "admin server not started");
            return;
        }
    };
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin server listening");
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = respond(path, &pool).await;
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let response = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn respond(path: &str, pool: &PgPool) -> (u16, String) {
    match path {
        "/livez" => (200, "ok\n".into()),
        "/readyz" | "/healthz" => match sqlx::query_scalar!("SELECT 1 AS one").fetch_one(pool).await {
            Ok(_) => (200, "ok\n".into()),
            Err(e) => (503, format!("database unavailable: {e}\n")),
        },
        "/metrics" => match status::read(pool).await {
            Ok(s) => (200, metrics(&s)),
            Err(e) => (503, format!("database unavailable: {e}\n")),
        },
        _ => (404, "not found\n".into()),
    }
}

fn metrics(s: &status::Status) -> String {
    let mut out = String::new();
    out.push_str("# TYPE transfer_worker_transfers gauge\n");
    for (state, n) in &s.transfers {
        let _ = writeln!(out, "transfer_worker_transfers{{status=\"{state}\"}} {n}");
    }
    out.push_str("# TYPE transfer_worker_refunds gauge\n");
    for (state, n) in &s.refunds {
        let _ = writeln!(out, "transfer_worker_refunds{{status=\"{state}\"}} {n}");
    }
    out.push_str("# TYPE transfer_worker_outbox_events gauge\n");
    let o = &s.outbox;
    for (state, n) in [("pending", o.pending), ("published", o.published), ("dead", o.dead), ("held", o.held)] {
        let _ = writeln!(out, "transfer_worker_outbox_events{{state=\"{state}\"}} {n}");
    }
    out.push_str("# TYPE transfer_worker_oldest_unpublished_age_seconds gauge\n");
    let _ = writeln!(out, "transfer_worker_oldest_unpublished_age_seconds {}", s.oldest_unpublished_age_s);
    out
}

//! A projection consumer: keeps each account's balance from the events
//! alone, exactly once per event, with the consumer library. A
//! `transfer.succeeded` moves `amount` from sender to recipient, a
//! `refund.completed` moves `refund_amount` back; failed and cancelled
//! transfers and refund requests move nothing. The projection's table and
//! the inbox row commit together: an event delivered twice, redelivered
//! after a crash, or replayed, changes nothing the second time.
//!
//!     DATABASE_URL=postgres://.../projection SQS_QUEUE_URL=http://... \
//!         cargo run --example projection -- [--name NAME] [--visibility-timeout-s S]
//!
//! It keeps `projected_balances(account_id, delta)` (the net change of each
//! account since the projection started) and `consumed_events` in
//! DATABASE_URL's database, and runs until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgConnection;
use transfer_worker::consumer::{inbox, Consumer, ConsumerConfig, Delivered, Handler, HandlerError};
use transfer_worker::outbox::EventType;
use transfer_worker::service;

struct Projection;

impl Projection {
    async fn add(tx: &mut PgConnection, account: i64, delta: i64) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO projected_balances (account_id, delta) VALUES ($1, $2)
             ON CONFLICT (account_id) DO UPDATE SET delta = projected_balances.delta + EXCLUDED.delta",
        )
        .bind(account)
        .bind(delta)
        .execute(tx)
        .await?;
        Ok(())
    }
}

impl Handler for Projection {
    fn handle<'a>(&'a self, tx: &'a mut PgConnection, d: &'a Delivered) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let data = &d.event.data;
            let (from, to) = (data.from_account.0, data.to_account.0);
            let moved = match d.event.event_type {
                EventType::TransferSucceeded => Some((from, to, data.amount)),
                EventType::RefundCompleted => {
                    let refund = data
                        .refund_amount
                        .ok_or_else(|| HandlerError("refund.completed without refund_amount".into()))?;
                    Some((to, from, refund))
                }
                _ => None,
            };
            if let Some((payer, payee, amount)) = moved {
                // In account order, like every writer of the same rows.
                let (first, second) = if payer < payee {
                    ((payer, -amount), (payee, amount))
                } else {
                    ((payee, amount), (payer, -amount))
                };
                Self::add(tx, first.0, first.1).await?;
                Self::add(tx, second.0, second.1).await?;
            }
            Ok(())
        })
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = transfer_worker::shutdown::on_signals();
    let pool =
        sqlx::postgres::PgPoolOptions::new().max_connections(12).connect(&std::env::var("DATABASE_URL")?).await?;
    inbox::ensure_table(&pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS projected_balances (account_id BIGINT PRIMARY KEY, delta BIGINT NOT NULL)")
        .execute(&pool)
        .await?;
    let mut config =
        ConsumerConfig::new(arg("--name").unwrap_or_else(|| "projection".into()), std::env::var("SQS_QUEUE_URL")?);
    if let Some(s) = arg("--visibility-timeout-s") {
        config.visibility_timeout = Duration::from_secs(s.parse()?);
    }
    config.wait = Duration::from_secs(2);
    let client = transfer_worker::outbox::sqs::client_from_env(Duration::from_secs(15)).await;
    let mut consumer = Consumer::new(pool, client, config, Arc::new(Projection)).stopping_on(shutdown.clone());
    consumer.check_queue().await?;
    let consumer = Arc::new(consumer);
    let receivers: Vec<_> = (0..2).map(|_| tokio::spawn(service::run(consumer.clone(), shutdown.clone()))).collect();
    for r in receivers {
        r.await?;
    }
    Ok(())
}

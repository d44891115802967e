//! transfer-worker, the library: what a producer links to enqueue transfers
//! (inside its own transaction if it likes), request refunds and cancels, and
//! what runs the worker. The command line and the tools (`bench`, `lab`,
//! `demo`) are the binary's (`src/main.rs`, `src/cli/`, `src/tools/`); they
//! depend on this library, never the other way.
//!
//! Where things are:
//! - [`transfer`]: the transfer and refund state machines; [`transfer::enqueue`]
//!   (producers), [`transfer::apply`] (the worker's claim and apply),
//!   [`transfer::refund`], [`transfer::cancel`], [`transfer::show`];
//! - [`account`]: opening and reading accounts;
//! - [`concurrency`]: advisory locks (and the duplicate-request guard),
//!   isolation levels with retries, optimistic versions;
//! - [`outbox`]: events, the [`outbox::relay`] that publishes them,
//!   [`outbox::sqs`] (the SQS client side) and [`outbox::requeue`];
//! - [`controls`]: pause and resume, for every replica at once;
//! - [`worker`]: the `run` process and its supervision; [`service`] the loop
//!   every background task shares; [`wake`] LISTEN/NOTIFY; [`shutdown`]
//!   signals; [`retry`] backoff; [`maintenance`] periodic upkeep;
//!   [`retention`] pruning;
//! - [`db`]: pool, migrations, error classification; [`error`]: the error
//!   type; [`status`]: counts per state from cheap sources;
//! - [`consumer`]: the consuming half: exactly-once effects per consumer
//!   name, with an inbox in the consumer's database;
//! - [`admin`]: probes, metrics and the console; [`health`]: what `/readyz`
//!   reports; [`metrics`]: the Prometheus metrics; `trace`: the worker's
//!   spans continue a producer's W3C trace context.
//!
//! # Example: a producer enqueues inside its own transaction
//!
//! ```rust,ignore
//! use transfer_worker::account::AccountId;
//! use transfer_worker::transfer::enqueue::{enqueue, NewTransfer};
//! use transfer_worker::transfer::{Amount, IdempotencyKey};
//!
//! let mut tx = pool.begin().await?;
//! // ... the producer's own writes ...
//! let t = NewTransfer::new(AccountId(1), AccountId(2), Amount::new(250)?, Some(IdempotencyKey::new("order-42")?))?;
//! let enqueued = enqueue(&mut *tx, &t).await?; // invisible to workers until the commit
//! tx.commit().await?;
//! ```

#![deny(dead_code)]

pub mod account;
pub mod admin;
pub mod concurrency;
pub mod consumer;
pub mod controls;
pub mod db;
pub mod error;
pub mod health;
pub mod maintenance;
pub mod metrics;
pub mod outbox;
pub mod retention;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod status;
mod text_state;
mod trace;
pub mod transfer;
pub mod wake;
pub mod worker;

pub use error::{Error, Result};

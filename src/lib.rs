//! transfer-worker: moves money between PostgreSQL accounts and tells the rest
//! of the company through SQS, via a transactional outbox.
//!
//! Where things are:
//! - [`transfer`]: the transfer and refund state machines; [`transfer::enqueue`]
//!   (producers) and [`transfer::apply`] (the worker's claim and apply);
//! - [`account`]: opening and reading accounts;
//! - [`outbox`]: events, the [`outbox::relay`] that publishes them, and
//!   [`outbox::sqs`], the SQS client side;
//! - [`worker`]: the `run` process; [`service`] the loop every background task
//!   shares; [`wake`] LISTEN/NOTIFY; [`shutdown`] signals; [`retry`] backoff;
//! - [`db`]: pool, migrations, error classification; [`error`]: the error type
//!   and exit codes; [`status`]: the `status` command's counts;
//! - [`admin`]: the probes and metrics server; [`health`]: what it reports;
//!   [`maintenance`]: periodic upkeep (the state counters);
//! - [`lab`]: the concurrency-strategy experiment; [`bench`]: the benchmark;
//!   both on a [`scratch`] database;
//! - [`cli`]: the command line, one file per command.

pub mod account;
pub mod admin;
pub mod bench;
pub mod cli;
pub mod db;
pub mod error;
pub mod health;
pub mod lab;
pub mod maintenance;
pub mod metrics;
pub mod outbox;
pub mod retention;
pub mod retry;
pub mod scratch;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod transfer;
pub mod wake;
pub mod worker;

pub use error::{Error, ExitCode, Result};

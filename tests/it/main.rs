//! Integration tests: one binary, real PostgreSQL and real LocalStack (started
//! by `scripts/test.sh`), a fresh database and queue per test.

mod admin;
mod apply;
mod browser;
mod cli;
mod concurrency;
mod connections;
mod consume;
mod container;
mod controls;
mod enqueue;
mod experiments;
#[path = "../../src/tools/fixtures.rs"]
mod fixtures;
mod gather;
mod handoff;
mod helpers;
mod house;
mod operating;
mod plans;
mod polling;
mod processes;
mod relay;
mod requests;
mod routes;
mod traces;

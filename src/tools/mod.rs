//! The tools that come with the worker, compiled into the `transfer-worker`
//! binary only (never into the library a producer links): the benchmark,
//! the concurrency lab, the demo, and the fixtures they share with the tests
//! (scratch databases, seeding).

pub mod bench;
pub mod demo;
pub mod fixtures;
pub mod lab;

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: starts a private PostgreSQL and
# LocalStack (scripts/services.sh), installs what the console's browser test
# drives (Debian's Chromium, and playwright-core pinned in
# tests/browser/package-lock.json), then runs every test against them.
# Extra arguments go to the test harness (e.g. a test name filter);
# TEST_LOG=1 shows the worker's logs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/services.sh)"
# Each test creates its own database (tw_test_*); drop the previous run's so a
# long-lived cluster does not grow run after run.
psql "${DATABASE_URL%/*}/postgres" -qtA -c "SELECT datname FROM pg_database WHERE datname LIKE 'tw\_test\_%'" |
  while read -r db; do psql "${DATABASE_URL%/*}/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; done
scripts/browser.sh
# House rules, checked rather than written: formatting, lints and the API
# docs without a warning (each fails the run).
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps
# TEST_LOG=1 shows the worker's logs (its processes' and in-process services').
cargo test --locked -- "$@"

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: starts a private PostgreSQL and
# LocalStack (scripts/services.sh), then runs every test against them.
# Extra arguments go to the test harness (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/services.sh)"
cargo test --locked -- "$@"

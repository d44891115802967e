#!/usr/bin/env bash
# The main job, end to end, on a fresh machine: starts a private PostgreSQL and
# LocalStack (scripts/services.sh), then runs `transfer-worker demo`, which
# enqueues transfers, runs the worker, and prints the events received from SQS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/services.sh)"
cargo run --locked --quiet -- demo "$@"

#!/usr/bin/env bash
# Regenerates `.sqlx/`, the metadata of every compile-time checked query, after
# a query or a migration changed: builds the crate against a freshly migrated
# scratch database with SQLX_OFFLINE_DIR set, which makes sqlx's macros write
# one file per query (what `cargo sqlx prepare` does, without needing sqlx-cli).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/services.sh)"
base=${DATABASE_URL%/*}
db=transfer_worker_prepare
psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
# Plain psql, not `transfer-worker migrate`: the binary cannot be built
# before the metadata this script writes exists.
for f in migrations/*.sql; do
  psql "$base/$db" -q -v ON_ERROR_STOP=1 -f "$f" >/dev/null
done
rm -rf .sqlx && mkdir .sqlx
# Touch the sources so every macro runs again and writes its file.
touch src/lib.rs
find src -name '*.rs' -exec touch {} +
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/.sqlx" DATABASE_URL="$base/$db" cargo build --all-targets --quiet
echo "wrote $(ls .sqlx | wc -l) query files to .sqlx/"

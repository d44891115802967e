#!/usr/bin/env bash
# Starts, idempotently, everything transfer-worker needs on this machine, without Docker:
#   * a private, throw-away PostgreSQL cluster on 127.0.0.1:$TW_PG_PORT (default 54329);
#   * LocalStack (SQS only) in host mode on 127.0.0.1:$TW_LOCALSTACK_PORT (default 4566),
#     from a pinned, cached Python venv (localstack/requirements.txt);
#   * the queues `transfer-events.fifo` and `transfer-events`.
# Then prints the environment to use, so a caller does:
#     eval "$(scripts/services.sh)"
# Progress goes to stderr; stdout carries only `export` lines. Running it again
# reuses whatever is already up. `scripts/services.sh stop` stops both.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pg_port=${TW_PG_PORT:-54329}
ls_port=${TW_LOCALSTACK_PORT:-4566}
# State lives outside the work tree: a fresh clone in a private temp dir may not be
# traversable by the `postgres` user that owns the cluster when we run as root.
state=${TW_STATE_DIR:-${TMPDIR:-/tmp}/transfer-worker-services-$(id -u)}
pg_dir=$state/pg-$pg_port
ls_dir=$state/localstack-$ls_port
cache=${XDG_CACHE_HOME:-$HOME/.cache}/transfer-worker
db_name=transfer_worker

log() { echo "services: $*" >&2; }
die() { log "error: $*"; exit 1; }

find_pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ]; then
    pg_config --bindir; return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "PostgreSQL server binaries not found; installing the Debian package"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    find_pg_bin; return
  fi
  die "PostgreSQL server binaries (initdb, pg_ctl) not found: install PostgreSQL or set PG_BIN"
}

# initdb refuses to run as root: as root, the cluster belongs to `postgres`.
as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  local bin; bin=$(find_pg_bin)
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; then
    log "PostgreSQL already up on 127.0.0.1:$pg_port"
  else
    mkdir -p "$state"; chmod 755 "$state"
    if [ ! -s "$pg_dir/PG_VERSION" ]; then
      log "creating a PostgreSQL cluster in $pg_dir"
      mkdir -p "$pg_dir"
      [ "$(id -u)" = 0 ] && chown postgres: "$pg_dir"
      as_pg_owner "$bin/initdb" -D "$pg_dir" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
    fi
    log "starting PostgreSQL on 127.0.0.1:$pg_port"
    # Settings for a throw-away test cluster: durability off (fast tests), enough
    # connections for several worker processes and the concurrent tests.
    # TW_PG_DURABLE=1 keeps PostgreSQL's durability defaults (fsync, synchronous
    # commit, full-page writes): the only setting benchmark figures count on.
    local settings="-c max_connections=400"
    if [ "${TW_PG_DURABLE:-0}" != 1 ]; then
      settings="$settings -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    fi
    as_pg_owner "$bin/pg_ctl" -D "$pg_dir" -w -t 60 -l "$pg_dir/log" \
      -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 $settings" \
      start >/dev/null || { tail -20 "$pg_dir/log" >&2; die "PostgreSQL did not start"; }
  fi
  local psql=psql
  [ -x "$bin/psql" ] && psql=$bin/psql
  if ! "$psql" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db_name'" | grep -q 1; then
    "$psql" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -qc "CREATE DATABASE $db_name" >/dev/null
  fi
}

localstack_health() {
  local url="http://127.0.0.1:$ls_port/_localstack/health"
  if command -v curl >/dev/null; then
    curl -fsS "$url" 2>/dev/null
  else
    python3 -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())" "$url" 2>/dev/null
  fi
}

localstack_up() {
  localstack_health >/dev/null
}

# Up and serving both SQS and SNS (an older start of ours served SQS only).
localstack_serves_all() {
  local health; health=$(localstack_health) || return 1
  for service in sqs sns; do
    echo "$health" | grep -Eq "\"$service\": \"(available|running)\"" || return 1
  done
}

localstack_venv() {
  local req=$repo/localstack/requirements.txt
  local venv=$cache/localstack-venv-$(sha256sum "$req" | cut -c1-12)
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    log "installing LocalStack into $venv (about a minute, once)"
    rm -rf "$venv"; mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
    touch "$venv/.complete"
  fi
  echo "$venv"
}

start_localstack() {
  local venv; venv=$(localstack_venv)
  if localstack_up && ! localstack_serves_all; then
    if [ -f "$ls_dir/pid" ] && kill -0 "$(cat "$ls_dir/pid")" 2>/dev/null; then
      log "LocalStack on 127.0.0.1:$ls_port serves SQS only: restarting it with SNS"
      kill "$(cat "$ls_dir/pid")"
      local i
      for i in $(seq 1 30); do localstack_up || break; sleep 1; done
    else
      die "a LocalStack without SNS answers on 127.0.0.1:$ls_port and is not ours: stop it (or set TW_LOCALSTACK_PORT)"
    fi
  fi
  if localstack_up; then
    log "LocalStack already up on 127.0.0.1:$ls_port"
  else
    log "starting LocalStack (SQS, SNS) on 127.0.0.1:$ls_port"
    mkdir -p "$ls_dir"
    # LS_LOG=warn: one INFO line per request costs LocalStack (a single Python
    # process) about a tenth of its CPU under load; LS_LOG=info brings them back.
    GATEWAY_LISTEN=127.0.0.1:$ls_port SERVICES=sqs,sns SQS_ENDPOINT_STRATEGY=path LS_LOG=${LS_LOG:-warn} \
      LOCALSTACK_HOST=127.0.0.1:$ls_port FILESYSTEM_ROOT=$ls_dir \
      nohup "$venv/bin/python" -m localstack.runtime.main >"$ls_dir/log" 2>&1 &
    echo $! >"$ls_dir/pid"
    local i
    for i in $(seq 1 120); do
      localstack_up && break
      kill -0 "$(cat "$ls_dir/pid")" 2>/dev/null || { tail -30 "$ls_dir/log" >&2; die "LocalStack exited"; }
      sleep 1
    done
    localstack_up || { tail -30 "$ls_dir/log" >&2; die "LocalStack not healthy after 120 s"; }
  fi
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1 \
    "$venv/bin/python" - "$ls_port" <<'PY' >&2
import sys, boto3
sqs = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}")
sqs.create_queue(QueueName="transfer-events.fifo", Attributes={"FifoQueue": "true"})
sqs.create_queue(QueueName="transfer-events")
PY
}

stop_all() {
  local bin; bin=$(find_pg_bin)
  [ -s "$pg_dir/PG_VERSION" ] && as_pg_owner "$bin/pg_ctl" -D "$pg_dir" -m fast stop >&2 || true
  [ -f "$ls_dir/pid" ] && kill "$(cat "$ls_dir/pid")" 2>/dev/null || true
}

case "${1:-up}" in
  up)
    start_postgres
    start_localstack
    endpoint=http://127.0.0.1:$ls_port
    cat <<ENV
export DATABASE_URL=postgres://postgres@127.0.0.1:$pg_port/$db_name
export SQS_QUEUE_URL=$endpoint/queue/us-east-1/000000000000/transfer-events.fifo
export AWS_ENDPOINT_URL=$endpoint
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_EC2_METADATA_DISABLED=true
ENV
    ;;
  stop) stop_all ;;
  *) die "usage: $0 [up|stop]" ;;
esac

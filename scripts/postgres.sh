#!/usr/bin/env bash
# A throwaway PostgreSQL server for the store tests, on 127.0.0.1 at a free port, data in a temp folder.
#
#   eval "$(bash scripts/postgres.sh)"   # start (or reuse) it; prints: export ADISC_TEST_POSTGRES_URL=...
#   bash scripts/postgres.sh stop        # stop it and delete its folder
#
# Installs Debian's postgresql when no server binaries are found (as root). The server never runs as root:
# under root it runs as the `postgres` user through runuser. Trust authentication on loopback only, fsync off:
# this cluster is for tests and holds nothing worth keeping. Idempotent: a running cluster is reused.
# ADISC_PG_DIR overrides the folder (default ${TMPDIR:-/tmp}/adisc-postgres); log lines go to stderr.
set -euo pipefail

ROOT=${ADISC_PG_DIR:-${TMPDIR:-/tmp}/adisc-postgres}
DATA=$ROOT/data
PORT_FILE=$ROOT/port
DB_USER=adisc
DB_NAME=adisc_test

log() { echo "[postgres] $*" >&2; }

server_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then (cd "$ROOT" && runuser -u postgres -- "$@"); else "$@"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 40000))
    if ! port_in_use "$port"; then echo "$port"; return 0; fi
  done
  log "no free port found"; return 1
}

print_url() {
  echo "export ADISC_TEST_POSTGRES_URL=postgresql+psycopg2://$DB_USER@127.0.0.1:$(cat "$PORT_FILE")/$DB_NAME"
}

ensure_installed() {
  BIN=$(server_bindir || true)
  if [ -z "$BIN" ]; then
    if [ "$(id -u)" != 0 ]; then
      log "PostgreSQL is not installed and this user cannot install it (run: apt-get install -y postgresql)"
      exit 1
    fi
    log "installing Debian's postgresql"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BIN=$(server_bindir)
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    log "running as root but there is no 'postgres' user to run the server as"
    exit 1
  fi
}

is_running() { [ -f "$PORT_FILE" ] && [ -d "$DATA" ] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

start() {
  ensure_installed
  if is_running; then
    log "reusing the server on 127.0.0.1:$(cat "$PORT_FILE") ($DATA)"
    print_url
    return 0
  fi
  mkdir -p "$ROOT"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$ROOT"; fi
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_owner "$BIN/initdb" -D "$DATA" -U "$DB_USER" --auth=trust --encoding=UTF8 --no-locale >/dev/null
  fi
  local port
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    if as_owner "$BIN/pg_ctl" -D "$DATA" -l "$ROOT/server.log" -w -t 60 start \
        -o "-p $port -k $ROOT -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        >/dev/null; then
      echo "$port" > "$PORT_FILE"
      break
    fi
    log "start on port $port failed; retrying (log: $ROOT/server.log)"
    port=""
  done
  if [ -z "$port" ]; then log "could not start PostgreSQL; see $ROOT/server.log"; exit 1; fi
  if [ "$(as_owner "$BIN/psql" -h 127.0.0.1 -p "$port" -U "$DB_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]; then
    as_owner "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$DB_USER" "$DB_NAME"
  fi
  log "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $DATA)"
  print_url
}

stop() {
  BIN=$(server_bindir || true)
  if [ -n "$BIN" ] && [ -d "$DATA" ]; then
    as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$ROOT"
  log "stopped; removed $ROOT"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests of `pipeline tune --storage postgresql://...`.
#   eval "$(bash scripts/pg.sh start)"   # prints the exports: PIPELINE_TEST_PG (the URL) and PIPELINE_TEST_PG_DIR
#   bash scripts/pg.sh stop              # stops the server named by PIPELINE_TEST_PG_DIR and removes its folder
# initdb refuses root, so as root the cluster belongs to the `postgres` user. Debian's postgresql package is
# installed first when initdb is missing (CI's fresh machine); the tests themselves never install anything.
set -euo pipefail

find_bin() {
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local bin; bin=$(find_bin)
  if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    bin=$(find_bin)
  fi
  [ -n "$bin" ] || { echo "pg.sh: initdb not found; install PostgreSQL (Debian: apt-get install postgresql)" >&2; exit 1; }
  local base port
  base=$(mktemp -d /tmp/pipeline-pg-XXXXXX)
  [ "$(id -u)" = 0 ] && chown postgres: "$base"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_owner "$bin/initdb" -D "$base/data" -A trust -U postgres -E UTF8 --no-sync >/dev/null
  as_owner "$bin/pg_ctl" -D "$base/data" -o "-p $port -k $base -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50" \
    -l "$base/server.log" -w -t 60 start >/dev/null
  as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres tune
  echo "export PIPELINE_TEST_PG=postgresql://postgres@127.0.0.1:$port/tune PIPELINE_TEST_PG_DIR=$base PIPELINE_TEST_PG_BIN=$bin"
}

stop() {
  local base=${PIPELINE_TEST_PG_DIR:-} bin=${PIPELINE_TEST_PG_BIN:-$(find_bin)}
  [ -n "$base" ] && [ -d "$base" ] || return 0
  as_owner "$bin/pg_ctl" -D "$base/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$base"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: bash scripts/pg.sh start|stop" >&2; exit 2 ;;
esac

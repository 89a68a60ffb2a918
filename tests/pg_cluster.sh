#!/usr/bin/env bash
# A throw-away PostgreSQL server for tests: initdb in a new temp directory, the server on a
# unix socket in that directory (no TCP port, so parallel tests never clash), trust
# authentication, stopped and removed at the end.
#
#   pg_cluster.sh start OWNER_PID DB...   prints "DIR<TAB>CONNINFO" (CONNINFO without dbname=)
#   pg_cluster.sh stop DIR
#
# A watchdog stops the server and removes DIR once OWNER_PID is gone, so a test that crashes
# (or is killed by ctest's timeout) leaves nothing running. PostgreSQL refuses to run as root:
# as root the server runs as the system user "postgres" (Debian's package makes it; else
# "nobody"), and the tests connect over the socket as that database user.
# Exit status 77: PostgreSQL's server programs are not installed (the caller skips, saying so).
# The directory is made under $TMPDIR (default /tmp), which the server's user must be able to
# traverse. OT_PG_BINDIR picks the directory of initdb/pg_ctl (default: pg_config's, else the newest
# /usr/lib/postgresql/*/bin).
set -euo pipefail

bindir() {
  local d
  if [ -n "${OT_PG_BINDIR:-}" ]; then # a chosen PostgreSQL (or, for the skip's own check, none)
    [ -x "$OT_PG_BINDIR/initdb" ] && echo "$OT_PG_BINDIR"
    return
  fi
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir
    return
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return; }
  return 1
}

as_user() { # run a server program as the server's user
  if [ "$(id -u)" = 0 ]; then runuser -u "$PGUSER_OS" -- "$@"; else "$@"; fi
}

self=$(readlink -f "$0")
# the server's user may not reach the caller's directory (a checkout under /root): work from /
cd /

case "${1:-}" in
start)
  owner=${2:?owner pid}
  shift 2
  bin=$(bindir) || { echo "PostgreSQL server programs (initdb) not found: apt-get install postgresql" >&2; exit 77; }
  if [ "$(id -u)" = 0 ]; then
    PGUSER_OS=postgres
    getent passwd postgres >/dev/null || PGUSER_OS=nobody
  else
    PGUSER_OS=$(id -un)
  fi
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ot-pg.XXXXXX")
  chmod 0755 "$dir" # the server's user must reach its socket and data inside
  [ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$dir"
  echo "$PGUSER_OS" >"$dir/user"
  # the watchdog: detached from the caller's pipes so ctest does not wait for it
  setsid bash -c '
    while kill -0 '"$owner"' 2>/dev/null; do sleep 1; done
    "'"$self"'" stop "'"$dir"'"' </dev/null >/dev/null 2>&1 &
  as_user "$bin/initdb" -D "$dir/data" -U "$PGUSER_OS" -A trust -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; exit 1; }
  # durability settings off: the tests check the registry's logic, not the disk (OT_PG_DURABLE=1
  # keeps PostgreSQL's defaults: fsync at commit, like the SQLite registry; bench/registry.sh)
  opts="-c listen_addresses='' -c unix_socket_directories='$dir' -c max_connections=60"
  [ "${OT_PG_DURABLE:-0}" = 1 ] || opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  as_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -s -o "$opts" start >/dev/null ||
    { cat "$dir/server.log" >&2; exit 1; }
  for db in "$@"; do
    as_user "$bin/psql" -X -q -h "$dir" -U "$PGUSER_OS" -d postgres -c "CREATE DATABASE \"$db\"" >/dev/null
  done
  printf '%s\thost=%s user=%s\n' "$dir" "$dir" "$PGUSER_OS"
  ;;
stop)
  dir=${2:?dir}
  [ -d "$dir/data" ] || { rm -rf "$dir"; exit 0; }
  bin=$(bindir) || exit 0
  PGUSER_OS=$(cat "$dir/user" 2>/dev/null || id -un)
  as_user "$bin/pg_ctl" -D "$dir/data" -m immediate -s stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start OWNER_PID DB... | stop DIR" >&2
  exit 2
  ;;
esac

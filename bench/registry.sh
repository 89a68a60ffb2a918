#!/usr/bin/env bash
# The registry with 1, 2 and 3 daemons on one database, SQLite against PostgreSQL (issue 18):
# enrolments and updates accepted per second, the cost per update, and the leader's round
# turnover (bench_registry: each daemon a connection of its own). PostgreSQL runs with its
# durable defaults (fsync at commit), like SQLite's synchronous=FULL; on a unix socket of a
# throw-away server (tests/pg_cluster.sh), so this is the database's cost without a network.
#
#   bash bench/registry.sh [devices] [rounds] [repeats]     (build/ must be configured)
# Each configuration runs `repeats` times (default 3), interleaved; take the medians.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
devices=${1:-300}
rounds=${2:-5}
reps=${3:-3}
cmake --build "$here/build" --target bench_registry -j2 >/dev/null
bin="$here/build/bench/bench_registry"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dbs=()
for r in $(seq "$reps"); do dbs+=("b1_$r" "b2_$r" "b3_$r"); done
out=$(OT_PG_DURABLE=1 "$here/tests/pg_cluster.sh" start $$ "${dbs[@]}")
pgdir=$(cut -f1 <<<"$out")
conn=$(cut -f2 <<<"$out")
trap 'rm -rf "$tmp"; "$here/tests/pg_cluster.sh" stop "$pgdir"' EXIT
for r in $(seq "$reps"); do
  for n in 1 2 3; do
    rm -f "$tmp"/reg*.db*
    "$bin" --db "$tmp/reg$n.db" --daemons "$n" --devices "$devices" --rounds "$rounds"
    "$bin" --db "$conn dbname=b${n}_$r" --daemons "$n" --devices "$devices" --rounds "$rounds"
  done
done

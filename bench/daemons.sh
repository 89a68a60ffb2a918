#!/usr/bin/env bash
# Devices through real daemons (issue 18): `offtune-cloud serve` processes, 1 on SQLite (it is
# single-node) and 1, 2 and 3 on one PostgreSQL (durable: fsync at commit, like SQLite's
# synchronous=FULL; a throw-away server from tests/pg_cluster.sh on a unix socket), the
# PostgreSQL daemons sharing one --objects directory and one cloud identity. bench_daemons runs
# the devices in threads over the encrypted nng protocol, spread round-robin over the daemons:
# enrolment, then a session of R rounds that every device takes part in (no training: the
# figures are the daemons'). Prints each run's JSON line, then medians and ratios.
#
#   bash bench/daemons.sh [devices] [rounds] [repeats]      (build/ must be configured)
# Defaults 80 devices, 10 rounds, 3 repeats, interleaved (every configuration once per repeat).
# Devices all come from 127.0.0.1: the daemons' per-address ClientHello limit (burst 200,
# 20/s) bounds one address's handshakes, so keep devices x 2 under 200 per daemon.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
devices=${1:-80}
rounds=${2:-10}
reps=${3:-3}
nice cmake --build "$here/build" --target offtune-cloud bench_daemons -j2 >/dev/null
cloud="$here/build/cloud/offtune-cloud"
bin="$here/build/bench/bench_daemons"
tmp=$(mktemp -d)
pids=()
stop_daemons() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap 'stop_daemons; rm -rf "$tmp"' EXIT
dbs=()
for r in $(seq "$reps"); do dbs+=("d1_$r" "d2_$r" "d3_$r"); done
out=$(OT_PG_DURABLE=1 "$here/tests/pg_cluster.sh" start $$ "${dbs[@]}")
pgdir=$(cut -f1 <<<"$out")
conn=$(cut -f2 <<<"$out")
trap 'stop_daemons; rm -rf "$tmp"; "$here/tests/pg_cluster.sh" stop "$pgdir"' EXIT

# the tiny model of the session tests (4 layers, 16 wide, byte tokenizer)
"$cloud" corpus --genres public --out "$tmp/public.txt" >/dev/null 2>&1
OMP_NUM_THREADS=1 "$cloud" pretrain --tokenizer byte --layers 4 --embd 16 --heads 2 --ctx 32 --steps 20 \
  --batch 4 --text "$tmp/public.txt" --out "$tmp/full" --threads 1 >/dev/null 2>&1

json_field() { sed -n "s/.*\"$2\": *\"\([^\"]*\)\".*/\1/p" "$1" | head -n1; }

# run_one BACKEND N REP: N daemons on a fresh registry, the devices, one JSON line
run_one() {
  local backend=$1 n=$2 rep=$3 base="$tmp/run" urls="" fp="" k
  rm -rf "$base"
  mkdir -p "$base/objects"
  for k in $(seq "$n"); do
    local st="$base/d$k" extra=""
    mkdir -p "$st"
    if [ "$backend" = postgresql ]; then
      extra="--registry \"$conn dbname=d${n}_$rep\" --objects $base/objects --node d$k"
      [ "$k" = 1 ] || install -m 600 "$base/d1/cloud.key" "$st/cloud.key" # one cloud identity
    fi
    eval "OMP_NUM_THREADS=1 exec \"$cloud\" serve --state \"$st\" --listen tcp://127.0.0.1:0 --model \"$tmp/full\" $extra" \
      >"$base/d$k.log" 2>&1 &
    pids+=($!)
    local t=0
    until [ -s "$st/cloud.json" ] && [ -S "$st/control.sock" ]; do
      sleep 0.05
      t=$((t + 1))
      [ $t -lt 600 ] || { tail "$base/d$k.log" >&2; exit 1; }
    done
    urls="$urls${urls:+,}$(json_field "$st/cloud.json" url)"
    fp=$(json_field "$st/cloud.json" fingerprint)
  done
  for _ in $(seq "$devices"); do "$cloud" token issue --state "$base/d1"; done >"$base/tokens"
  local create="\"$cloud\" session create --state \"$base/d1\" --name b --model full --bottom 1 --top 1 --keep 1 \
--distill-steps 4 --distill-batch 4 --distill-seq-len 32 --distill-data \"$tmp/public.txt\" --steps 1 --batch 1 \
--seq-len 16 --rounds $rounds --min-devices $devices --max-devices $devices --deadline 600 --secagg off >/dev/null"
  local line
  line=$("$bin" --urls "$urls" --fingerprint "$fp" --tokens "$base/tokens" --devices "$devices" --session b \
    --work "$base/devices" --then "$create")
  stop_daemons
  # what the daemons refused or swept away (nothing, normally): on stderr, with the log lines
  grep -h -E "refused the update|staging: removed" "$base"/d*.log >&2 || true
  # OT_BENCH_KEEP=DIR: the daemons' logs of every run are copied there
  if [ -n "${OT_BENCH_KEEP:-}" ]; then
    mkdir -p "$OT_BENCH_KEEP/$backend$n-$rep"
    cp "$base"/d*.log "$OT_BENCH_KEEP/$backend$n-$rep/"
  fi
  echo "{\"backend\":\"$backend\",\"rep\":$rep,${line#\{}"
}

results="$tmp/results.jsonl"
for r in $(seq "$reps"); do
  run_one sqlite 1 "$r" >>"$results"
  tail -n1 "$results"
  for n in 1 2 3; do
    run_one postgresql "$n" "$r" >>"$results"
    tail -n1 "$results"
  done
done
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$results" "$devices" "$rounds" "$reps" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"devices {sys.argv[2]}, rounds {sys.argv[3]}, medians of {sys.argv[4]}")
keys = [("sqlite", 1)] + [("postgresql", n) for n in (1, 2, 3)]
med = {}
for k in keys:
    rs = [r for r in rows if (r["backend"], r["daemons"]) == k]
    med[k] = {f: statistics.median(r[f] for r in rs)
              for f in ("enrol_per_s", "updates_per_s", "update_ms_median", "rounds_per_min", "errors")}
print("| registry | daemons | enrolments/s | updates accepted/s | ms per device round (median) | rounds/min |")
print("|---|---|---|---|---|---|")
for k in keys:
    m = med[k]
    print(f"| {'SQLite' if k[0] == 'sqlite' else 'PostgreSQL'} | {k[1]} | {m['enrol_per_s']:.0f} | "
          f"{m['updates_per_s']:.0f} | {m['update_ms_median']:.1f} | {m['rounds_per_min']:.0f} |")
s, p1 = med[("sqlite", 1)], med[("postgresql", 1)]
print(f"PostgreSQL/SQLite, 1 daemon: enrolments x{p1['enrol_per_s'] / s['enrol_per_s']:.2f}, "
      f"updates x{p1['updates_per_s'] / s['updates_per_s']:.2f}, rounds/min x{p1['rounds_per_min'] / s['rounds_per_min']:.2f}")
print(f"cost per update of the shared registry (1 daemon, PostgreSQL - SQLite): "
      f"{1e3 / p1['updates_per_s'] - 1e3 / s['updates_per_s']:+.2f} ms of throughput, "
      f"{p1['update_ms_median'] - s['update_ms_median']:+.1f} ms of a device's round")
for n in (2, 3):
    m = med[("postgresql", n)]
    print(f"PostgreSQL {n} daemons / 1: enrolments x{m['enrol_per_s'] / p1['enrol_per_s']:.2f}, "
          f"updates x{m['updates_per_s'] / p1['updates_per_s']:.2f}, rounds/min x{m['rounds_per_min'] / p1['rounds_per_min']:.2f}")
if any(r["errors"] for r in rows):
    print(f"retried requests: {sum(r['errors'] for r in rows)} (see the JSON lines)")
EOF

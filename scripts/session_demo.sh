#!/usr/bin/env bash
# A whole federated session on loopback: the cloud daemon, three devices each holding a
# different private Brown genre (romance, mystery, humor; training part), a few rounds,
# the published adapter. Prints where the adapter and the logs are.
#
#   bash scripts/session_demo.sh [MODEL_DIR [WORK_DIR]]     (default model: models/brown-llama-16x128)
#
# Settings (environment): OT_DEMO_ROUNDS (3), OT_DEMO_STEPS local steps per round (30),
# OT_DEMO_BATCH (8), OT_DEMO_SEQ (0 = the model's context), OT_DEMO_LR (1e-3),
# OT_DEMO_ADAPTER (offsite), OT_DEMO_AGG (fedavg), OT_DEMO_DISTILL_STEPS (200),
# OT_DEMO_BOTTOM / OT_DEMO_TOP adapter blocks (2 / 2), OT_DEMO_KEEP (0 = half of the middle),
# OT_DEMO_TARGET_GAP (off; e.g. 10%: the cloud picks the kept blocks, at most OT_DEMO_KEEP, and
# stops distilling while its emulator is still that much worse than the full model),
# OT_DEMO_MIDDLE_NOISE (0: devices tune against the middle plus fresh noise of this x its rms),
# OT_DEMO_AVERAGE_LAST (0: devices send the mean of their weights after a round's last N steps),
# OT_DEMO_DEADLINE seconds (600),
# OT_DEMO_THREADS CPU threads per device (1), OT_DEMO_BACKEND (cpu).
# Privacy (docs/secagg.md): OT_DEMO_SECAGG auto|on|off (auto: off with the 2..3 devices here),
# OT_DEMO_DP_EPSILON (off), OT_DEMO_DP_CLIP (1), OT_DEMO_DP_DELTA (1e-5).
# OT_DEMO_DATA: each device's private data file, a pattern where %s is the device's name
# (default: its Brown genre's training documents); a .jsonl file holds supervised examples
# (docs/data.md), as in the main job's spam/ham task.
# OT_DEMO_EVAL_DATA: the cloud's held-out text, scored after each round (default: none).
# OT_DEMO_SESSION session name (demo); OT_DEMO_REUSE=1 keeps WORK_DIR's daemon state and
# enrolled devices (the emulator is distilled once for several sessions; bench/session_privacy.sh).
# Needs a build (scripts/build.sh). Everything it starts is stopped on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$(cd "${1:-$here/models/brown-llama-16x128}" && pwd)
work=${2:-$here/build/session-demo}
cloud=$here/build/cloud/offtune-cloud
device=$here/build/device/offtune-device
[ -x "$cloud" ] && [ -x "$device" ] || { echo "build first: bash scripts/build.sh" >&2; exit 1; }
rounds=${OT_DEMO_ROUNDS:-3}
steps=${OT_DEMO_STEPS:-30}
genres=(romance mystery humor)

name=${OT_DEMO_SESSION:-demo}
[ "${OT_DEMO_REUSE:-0}" = 1 ] || rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

data=${OT_DEMO_DATA:-$work/private-%s.txt}
data_of() { printf "$data" "$1"; }
if [ -z "${OT_DEMO_DATA:-}" ]; then
  echo "== private data: one Brown genre per device (training documents) =="
  for g in "${genres[@]}"; do
    [ -f "$work/private-$g.txt" ] ||
      "$cloud" corpus --genres "$g" --part train --out "$work/private-$g.txt"
  done
else
  echo "== private data: $data =="
fi
for g in "${genres[@]}"; do
  [ -f "$(data_of "$g")" ] || { echo "no data for device $g: $(data_of "$g")" >&2; exit 1; }
  echo "  $g: $(wc -c < "$(data_of "$g")") bytes in $(data_of "$g")"
done

echo "== starting the cloud daemon =="
listen=tcp://127.0.0.1:0
[ -f "$work/cloud/cloud.json" ] && # a reused state: the same port, which the devices know
  listen=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$work/cloud/cloud.json")
rm -f "$work/cloud/cloud.json"
"$cloud" serve --state "$work/cloud" --listen "$listen" --model "base=$model" >> "$work/cloud.log" 2>&1 &
daemon=$!
pids+=("$daemon")
for _ in $(seq 200); do [ -S "$work/cloud/control.sock" ] && [ -f "$work/cloud/cloud.json" ] && break; sleep 0.1; done
[ -S "$work/cloud/control.sock" ] || { cat "$work/cloud.log" >&2; exit 1; }
url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$work/cloud/cloud.json")
fp=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint"])' "$work/cloud/cloud.json")
echo "  $url, key $fp; log $work/cloud.log"

echo "== creating the session (the daemon distils the emulator first) =="
"$cloud" session create --state "$work/cloud" --name "$name" --model base --rounds "$rounds" --steps "$steps" \
  --batch "${OT_DEMO_BATCH:-8}" --seq-len "${OT_DEMO_SEQ:-0}" --lr "${OT_DEMO_LR:-1e-3}" \
  --adapter "${OT_DEMO_ADAPTER:-offsite}" --aggregation "${OT_DEMO_AGG:-fedavg}" \
  --distill-steps "${OT_DEMO_DISTILL_STEPS:-200}" --keep "${OT_DEMO_KEEP:-0}" \
  --bottom "${OT_DEMO_BOTTOM:-2}" --top "${OT_DEMO_TOP:-2}" \
  --min-devices 2 --max-devices 3 --deadline "${OT_DEMO_DEADLINE:-600}" --secagg "${OT_DEMO_SECAGG:-auto}" \
  --middle-noise "${OT_DEMO_MIDDLE_NOISE:-0}" --average-last "${OT_DEMO_AVERAGE_LAST:-0}" \
  ${OT_DEMO_EVAL_DATA:+--eval-data "$OT_DEMO_EVAL_DATA"} ${OT_DEMO_TARGET_GAP:+--target-gap "$OT_DEMO_TARGET_GAP"} \
  ${OT_DEMO_DP_EPSILON:+--dp-epsilon "$OT_DEMO_DP_EPSILON" --dp-clip "${OT_DEMO_DP_CLIP:-1}" --dp-delta "${OT_DEMO_DP_DELTA:-1e-5}"}

echo "== enrolling three devices with one-time tokens =="
for g in "${genres[@]}"; do
  [ -f "$work/device-$g/cloud.json" ] && continue # enrolled in an earlier session (OT_DEMO_REUSE)
  token=$("$cloud" token issue --state "$work/cloud" --label "$g")
  "$device" join --cloud "$url" --cloud-key "$fp" --token "$token" --state "$work/device-$g" --name "$g"
done

echo "== running the devices (logs: $work/device-*.log; progress of the first below) =="
dev_pids=()
for g in "${genres[@]}"; do
  OMP_NUM_THREADS=${OT_DEMO_THREADS:-1} "$device" run --data "$(data_of "$g")" --state "$work/device-$g" \
    --session "$name" --threads "${OT_DEMO_THREADS:-1}" --backend "${OT_DEMO_BACKEND:-cpu}" > "$work/device-$g.log" 2>&1 &
  dev_pids+=("$!")
  pids+=("$!")
done
tail -f "$work/device-${genres[0]}.log" --pid "${dev_pids[0]}" 2>/dev/null | grep --line-buffered -E '^\[run\]' || true
fail=0
for i in "${!dev_pids[@]}"; do
  if ! wait "${dev_pids[$i]}"; then
    echo "device ${genres[$i]} failed; its log:" >&2
    tail -n 20 "$work/device-${genres[$i]}.log" >&2
    fail=1
  fi
done

for _ in $(seq 100); do
  state=$("$cloud" session show "$name" --state "$work/cloud" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["session"]["state"])')
  [ "$state" = done ] || [ "$state" = failed ] && break
  sleep 0.2
done
echo "== the session =="
"$cloud" session show "$name" --state "$work/cloud"
adapter=$("$cloud" adapter list --state "$work/cloud" --json |
  python3 -c 'import json,sys; print(next((a["dir"] for a in json.load(sys.stdin)["adapters"] if a["name"] == sys.argv[1]), ""))' "$name")
emulator=$("$cloud" session show "$name" --state "$work/cloud" --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["session"]["emulator"] or "")')
kill "$daemon"
wait "$daemon" 2>/dev/null || true
[ "$state" = done ] && [ -n "$adapter" ] && [ "$fail" = 0 ] || { echo "the session did not finish ($state)" >&2; exit 1; }
echo
echo "published adapter '$name': $adapter"
echo "emulator package:         $emulator"
echo "cloud state and logs:     $work/cloud, $work/cloud.log, $work/device-*.log"
echo "try: $cloud eval --model $model --adapter $adapter --text <held-out text>"

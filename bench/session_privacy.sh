#!/usr/bin/env bash
# Quality of federated sessions with privacy on: the same three-device session
# (scripts/session_demo.sh: romance, mystery, humor, one Brown genre per device) with
# secure aggregation off, on, and with DP at epsilon 1, 4 and 8 (secure aggregation on),
# all on one daemon state (the emulator is distilled once). For each, the held-out
# document of each genre is scored by the full model with the published adapter plugged
# in (offtune-cloud eval --adapter), and by the base model zero-shot. Prints a markdown
# table (docs/secagg.md has one).
#
#   bash bench/session_privacy.sh [MODEL_DIR [WORK_DIR]]    (default model: models/brown-8x128)
#
# Settings: OT_DEMO_DISTILL_STEPS (60), OT_DEMO_STEPS (30), OT_DEMO_ROUNDS (3), OT_DP_CLIP (1),
# and every other OT_DEMO_* of scripts/session_demo.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$(cd "${1:-$here/models/brown-8x128}" && pwd)
work=${2:-$here/build/session-privacy}
cloud=$here/build/cloud/offtune-cloud
export OT_DEMO_DISTILL_STEPS=${OT_DEMO_DISTILL_STEPS:-60} OT_DEMO_STEPS=${OT_DEMO_STEPS:-30}
export OT_DEMO_ROUNDS=${OT_DEMO_ROUNDS:-3} OT_DEMO_REUSE=1
genres=(romance mystery humor)
rm -rf "$work"
mkdir -p "$work"
for g in "${genres[@]}"; do "$cloud" corpus --genres "$g" --part heldout --out "$work/heldout-$g.txt"; done

# name  secagg  dp-epsilon
runs=("plain off -" "secagg on -" "dp1 on 1" "dp4 on 4" "dp8 on 8")
declare -A adapter seconds
for r in "${runs[@]}"; do
  read -r name sa eps <<< "$r"
  echo "== session $name: secagg $sa, DP epsilon $eps ==" >&2
  t0=$(date +%s)
  dp=()
  [ "$eps" != - ] && dp=(OT_DEMO_DP_EPSILON="$eps" OT_DEMO_DP_CLIP="${OT_DP_CLIP:-1}")
  env OT_DEMO_SESSION="$name" OT_DEMO_SECAGG="$sa" "${dp[@]}" bash "$here/scripts/session_demo.sh" "$model" "$work/run" > "$work/$name.log" 2>&1 ||
    { tail -n 30 "$work/$name.log" >&2; exit 1; }
  seconds[$name]=$(($(date +%s) - t0))
  adapter[$name]=$(sed -n "s/^published adapter '$name': //p" "$work/$name.log")
done

score() { # model adapter|- text -> loss (nats/token)
  local a=()
  [ "$2" != - ] && a=(--adapter "$2")
  OMP_NUM_THREADS=2 "$cloud" eval --model "$1" "${a[@]}" --text "$3" --json --threads 2 |
    python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["loss"])'
}
echo
echo "Held-out document of each genre, nats/token (lower is better); $OT_DEMO_ROUNDS rounds of $OT_DEMO_STEPS local steps, 3 devices:"
echo
echo "| genre | base (zero-shot) | plain FedAvg | secagg on | DP eps 1 | DP eps 4 | DP eps 8 |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for g in "${genres[@]}"; do
  row="| $g | $(score "$model" - "$work/heldout-$g.txt")"
  for n in plain secagg dp1 dp4 dp8; do row="$row | $(score "$model" "${adapter[$n]}" "$work/heldout-$g.txt")"; done
  echo "$row |"
done
echo
echo -n "session wall time (s):"
for n in plain secagg dp1 dp4 dp8; do echo -n " $n ${seconds[$n]}"; done
echo
for n in dp1 dp4 dp8; do echo "$n: $(grep -m1 'differential privacy: budget' "$work/$n.log" | sed 's/^ *//')"; done

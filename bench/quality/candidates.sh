#!/usr/bin/env bash
# Why transfer fails on held-out domains (issue 15): bench/quality/run.sh for the offsite adapter
# on the GPT-2 default (models/brown-8x128) under one change at a time against its main-job recipe
# (keep 1 of 4, 100 distillation steps, device lr 5e-4, no middle noise, full FT at 5e-4), then one summary line per variant
# (mean emulator gap and closure over the domains, and on how many domains the plug-in beats the
# emulator fine-tuned). Each variant is a few minutes of two one-thread jobs; finished variants
# are reused (their table.md), so an interrupted run continues.
#   bash bench/quality/candidates.sh [VARIANT...]    (default: all, in the order below)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"
mkdir -p build/quality/cand
broad=build/quality/cand/broad.txt
if [ ! -s "$broad" ]; then # the model owner's own text: pretraining genres (train part) + public genres
  bash scripts/build.sh >/dev/null
  { build/cloud/offtune-cloud corpus --genres pretrain --part train 2>/dev/null
    build/cloud/offtune-cloud corpus --genres public 2>/dev/null; } >"$broad"
fi
declare -A v=(
  [main]=""
  [distill-400]="--distill-steps 400"
  [distill-1]="--distill-steps 1"
  [broad-100]="--distill-data $broad"
  [broad-400]="--distill-data $broad --distill-steps 400"
  [keep-2]="--keep 2"
  [keep-3]="--keep 3"
  [b1t1-k1]="--bottom 1 --top 1 --keep 1"
  [b1t1-k3]="--bottom 1 --top 1 --keep 3"
  [b1t1-k3-broad-400]="--bottom 1 --top 1 --keep 3 --distill-data $broad --distill-steps 400"
  [budget-4]="--budget 4"
  # no drop at all (the emulator is the full model): the adapter tuned against the full middle,
  # what the plug-in would be if the emulator were perfect
  [oracle]="--keep 4 --distill-steps 1 --distill-lr 1e-12"
  # the cloud's control: keep and distillation steps chosen for the gap on its held-out text
  [gap-10]="--target-gap 10%"
  [gap-15]="--target-gap 15%"
  [budget-4-bible-policy]="--budget 4 --domains bible,policy"
  [b1t1-oracle]="--bottom 1 --top 1 --keep 6 --distill-steps 1 --distill-lr 1e-12"
)
order=(main oracle distill-1 distill-400 broad-100 broad-400 keep-2 keep-3 b1t1-k1 b1t1-k3 b1t1-k3-broad-400 b1t1-oracle gap-10 gap-15 budget-4)
[ $# -gt 0 ] && order=("$@")
for name in "${order[@]}"; do
  [ -n "${v[$name]+x}" ] || { echo "candidates.sh: unknown variant $name (${!v[*]})" >&2; exit 2; }
  o=build/quality/cand/$name
  if [ ! -s "$o/table.md" ]; then
    echo "== $name: ${v[$name]:-the main job recipe} =="
    # shellcheck disable=SC2086
    bash bench/quality/run.sh --model models/brown-8x128 --target-gap none --kinds offsite --out "$o" \
      --lr 5e-4 --middle-noise 0 --average 0 --ft-lrs 5e-4 ${v[$name]} \
      >"$o.log" 2>&1 || { tail -n 20 "$o.log"; exit 1; }
  fi
done
echo
echo "| variant | settings | mean gap % | mean closure % | plug-in < emulator FT | promises hold | per domain: gap / closure / plug-in vs emu FT |"
echo "|---|---|---|---|---|---|---|"
for name in "${order[@]}"; do
  python3 - "$name" "${v[$name]:-the main job recipe}" "build/quality/cand/$name/table.md" <<'EOF'
import sys
name, settings, path = sys.argv[1], sys.argv[2].replace("build/quality/cand/broad.txt", "broad"), sys.argv[3]
rows = [l.split("|")[1:-1] for l in open(path) if l.startswith("| ") and not l.startswith("| domain")]
rows = [[c.strip() for c in r] for r in rows]
gap = [float(r[4]) for r in rows]; clo = [float(r[8]) for r in rows]
beat = sum(float(r[6]) < float(r[5]) for r in rows); hold = sum(r[9] == "hold" for r in rows)
per = "; ".join("%s %+.0f/%.0f/%s" % (r[0], float(r[4]), float(r[8]), "<" if float(r[6]) < float(r[5]) else ">") for r in rows)
print("| %s | %s | %.1f | %.0f | %d of %d | %d of %d | %s |" % (name, settings, sum(gap) / len(gap), sum(clo) / len(clo), beat, len(rows), hold, len(rows), per))
EOF
done

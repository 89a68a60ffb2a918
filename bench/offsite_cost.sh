#!/usr/bin/env bash
# The device's cost of Offsite-Tuning at GPT-2 124M scale (12 blocks, width 768, GPT-2's
# full 50257-token vocabulary), the paper's cost claim on our CPU trainer: full
# fine-tuning versus emulator (bottom 2, 2 of the 8 middle blocks kept, top 2) + LoRA and
# + offsite adapter, same batch, steps and threads. Weights are a short pre-training run
# (cost does not depend on quality). Usage: bash bench/offsite_cost.sh [steps]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/build.sh >/dev/null
cloud=build/cloud/offtune-cloud
device=build/device/offtune-device
steps=${1:-6}
work=build/offsite-cost
mkdir -p "$work"
$cloud corpus --genres public --out "$work/public.txt" 2>/dev/null
$cloud corpus --genres romance --part train --out "$work/private.txt" 2>/dev/null
echo "== a GPT-2 124M-shaped base (2 pre-training steps) and its emulator =="
$cloud pretrain --out "$work/base" --layers 12 --heads 12 --embd 768 --ctx 1024 --bpe-first 0 --steps 2 \
  --batch 2 --seq-len 64 --warmup 0 --resume >/dev/null 2>&1
$cloud distill --model "$work/base" --data "$work/public.txt" --out "$work/emulator" --keep 2 --steps 1 \
  --batch 2 --seq-len 64 --resume >/dev/null 2>&1
common=(--steps "$steps" --batch 4 --seq-len 64 --threads 2)
run() { # label, log, command...
  local label=$1 log=$2
  shift 2
  /usr/bin/time -f 'peak_kb=%M' "$@" >"$log" 2>&1
  local kb rate
  kb=$(sed -n 's/^peak_kb=//p' "$log" | tail -1)
  rate=$(grep -oE '[0-9.]+ tokens/s' "$log" | tail -1 | cut -d' ' -f1)
  printf '%-36s %10d %12s\n' "$label" $((kb / 1024)) "$rate"
  echo "$label $((kb / 1024)) $rate" >>"$work/results.txt"
}
rm -f "$work/results.txt"
echo
printf '%-36s %10s %12s\n' "training ($steps steps, B=4, T=64)" "peak MiB" "tokens/s"
run "full fine-tuning (124M)" "$work/full.log" $cloud finetune --model "$work/base" --text "$work/private.txt" \
  --out "$work/full-ft" --lr 1e-4 "${common[@]}"
run "emulator + LoRA (r 8, all linears)" "$work/lora.log" $device tune --emulator "$work/emulator" \
  --text "$work/private.txt" --out "$work/lora" --adapter lora --lr 1e-3 "${common[@]}"
run "emulator + offsite adapter" "$work/offsite.log" $device tune --emulator "$work/emulator" \
  --text "$work/private.txt" --out "$work/offsite" --adapter offsite --lr 1e-4 "${common[@]}"
python3 - "$work/results.txt" <<'PY'
import sys
rows = [l.rsplit(" ", 2) for l in open(sys.argv[1]).read().splitlines()]
full = rows[0]
for r in rows[1:]:
    print("%-36s %9.1fx less memory, %5.1fx faster" % (r[0], float(full[1]) / float(r[1]), float(r[2]) / float(full[2])))
PY

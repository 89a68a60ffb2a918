#!/usr/bin/env bash
# The Offsite-Tuning comparison table on our own data (issue 3), one command:
#   bash bench/offsite_table.sh
# Base: the embedded default architecture pre-trained for 5000 steps (about 15 minutes on
# an idle 2-core machine, once; resumed if interrupted): the main job's 1000-step model is
# too weak for its middle blocks to matter, so no emulator of it is clearly worse than the
# full model. Emulator: 1 of the 4 middle blocks kept, distilled on the public genres.
# Device data: a private genre (never seen by pre-training or distillation), all but its
# last document for training, the last document to score.
# Prints perplexity per row and the device's cost (peak memory, tokens/s) per way of
# training. Knobs: OT_TABLE_GENRE (romance), OT_DISTILL_STEPS (200), OT_TUNE_STEPS (100),
# OT_KEEP (1 of the 4 middle blocks), OT_TABLE_MODEL (a base to use instead).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/build.sh >/dev/null
cloud=build/cloud/offtune-cloud
device=build/device/offtune-device
genre=${OT_TABLE_GENRE:-romance}
dsteps=${OT_DISTILL_STEPS:-200}
tsteps=${OT_TUNE_STEPS:-100}
model=${OT_TABLE_MODEL:-build/table-base}
work=build/table-$genre
mkdir -p "$work"
if [ -z "${OT_TABLE_MODEL:-}" ]; then
  echo "== pre-training the base model (5000 steps; a finished run is reused) =="
  $cloud pretrain --out "$model" --steps 5000 --ckpt-every 250 --resume
fi
$cloud corpus --genres public --out "$work/public.txt" 2>/dev/null
$cloud corpus --genres "$genre" --part train --out "$work/private.txt" 2>/dev/null
$cloud corpus --genres "$genre" --part heldout --out "$work/heldout.txt" 2>/dev/null

echo "== distilling the emulator ($dsteps steps on the public genres) =="
$cloud distill --model "$model" --data "$work/public.txt" --out "$work/emulator" --steps "$dsteps" \
  --keep "${OT_KEEP:-1}" --batch 16 --lr 1e-3 --warmup 20 --resume 2>&1 | grep -E '^\[distill\]|^distilled' || true

tune_common=(--steps "$tsteps" --batch 8 --seq-len 128 --threads 2)
ppl() { python3 -c 'import json,sys; print("%.3f" % json.loads(sys.stdin.read().strip().splitlines()[-1])["perplexity"])'; }
peak() { sed -n 's/^peak_kb=//p' "$1" | tail -1; }
rate() { grep -oE '[0-9.]+ tokens/s' "$1" | tail -1 | cut -d' ' -f1; }

echo "== distilling the same emulator stored in int8 =="
$cloud distill --model "$model" --data "$work/public.txt" --out "$work/emulator-int8" --int8 --steps "$dsteps" \
  --keep "${OT_KEEP:-1}" --batch 16 --lr 1e-3 --warmup 20 --resume 2>&1 | grep -E '^distilled' || true

kinds=(offsite lora bottleneck bitfit)
lr_of() { case $1 in offsite) echo 5e-4 ;; *) echo 3e-3 ;; esac; } # small adapters take larger steps
for k in "${kinds[@]}"; do
  echo "== device: tuning the $k adapter on the emulator ($tsteps steps) =="
  /usr/bin/time -f 'peak_kb=%M' $device tune --emulator "$work/emulator" --text "$work/private.txt" \
    --out "$work/adapter-$k" --adapter "$k" "${tune_common[@]}" --lr "$(lr_of "$k")" >"$work/tune-$k.log" 2>&1
done
echo "== device: tuning the offsite adapter on the int8 emulator =="
$device tune --emulator "$work/emulator-int8" --text "$work/private.txt" --out "$work/adapter-offsite-int8" \
  --adapter offsite "${tune_common[@]}" --lr "$(lr_of offsite)" >"$work/tune-offsite-int8.log" 2>&1
echo "== cloud: full fine-tuning baseline ($tsteps steps) =="
/usr/bin/time -f 'peak_kb=%M' $cloud finetune --model "$model" --text "$work/private.txt" --out "$work/full-ft" \
  "${tune_common[@]}" --lr 5e-4 >"$work/finetune.log" 2>&1

full_zs=$($cloud eval --model "$model" --text "$work/heldout.txt" --json 2>/dev/null | ppl)
emu_zs=$($device eval --emulator "$work/emulator" --text "$work/heldout.txt" --json 2>/dev/null | ppl)
full_ft=$($cloud eval --model "$work/full-ft" --text "$work/heldout.txt" --json 2>/dev/null | ppl)

echo
echo "Offsite-Tuning on the $(basename "$model") base, private genre '$genre' (held-out document perplexity, lower is better)"
printf '%-12s %12s %12s %12s %12s\n' "" "full ZS" "emulator ZS" "emulator FT" "plug-in"
for k in "${kinds[@]}"; do
  emu_ft=$($device eval --emulator "$work/emulator" --adapter "$work/adapter-$k" --text "$work/heldout.txt" --json 2>/dev/null | ppl)
  plug=$($cloud eval --model "$model" --adapter "$work/adapter-$k" --text "$work/heldout.txt" --json 2>/dev/null | ppl)
  printf '%-12s %12s %12s %12s %12s\n' "$k" "$full_zs" "$emu_zs" "$emu_ft" "$plug"
done
printf '%-12s %12s\n' "full FT" "$full_ft"
echo
echo "device cost of training ($tsteps steps, batch 8, 2 threads)"
printf '%-34s %12s %12s\n' "training" "peak MiB" "tokens/s"
for k in "${kinds[@]}"; do
  printf '%-34s %12d %12s\n' "emulator + $k" "$(( $(peak "$work/tune-$k.log") / 1024 ))" "$(rate "$work/tune-$k.log")"
done
printf '%-34s %12d %12s\n' "full fine-tuning" "$(( $(peak "$work/finetune.log") / 1024 ))" "$(rate "$work/finetune.log")"

echo
echo "int8 storage of the frozen middle blocks (offsite adapter)"
printf '%-34s %12s %12s %12s %12s\n' "emulator package" "MiB" "emulator ZS" "emulator FT" "plug-in"
for v in "" "-int8"; do
  e="$work/emulator$v"
  size=$(python3 -c 'import os,sys; print("%.2f" % (os.path.getsize(sys.argv[1]) / 1048576))' "$e/model.safetensors")
  zs=$($device eval --emulator "$e" --text "$work/heldout.txt" --json 2>/dev/null | ppl)
  ft=$($device eval --emulator "$e" --adapter "$work/adapter-offsite$v" --text "$work/heldout.txt" --json 2>/dev/null | ppl)
  pl=$($cloud eval --model "$model" --adapter "$work/adapter-offsite$v" --text "$work/heldout.txt" --json 2>/dev/null | ppl)
  label=fp32
  [ -n "$v" ] && label="int8 middle blocks"
  printf '%-34s %12s %12s %12s %12s\n' "$label" "$size" "$zs" "$ft" "$pl"
done

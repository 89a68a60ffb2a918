#!/usr/bin/env bash
# Training throughput: offtune's CPU trainer and PyTorch (Debian's python3-torch) on the
# identical model, batch and thread count, one after the other in the same run.
# Prints a table with tokens/s, peak memory and the ratio. Usage: bash bench/run.sh [steps]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/build.sh >/dev/null
steps=${1:-5}
threads=${OT_BENCH_THREADS:-2}
py=/usr/bin/python3
configs=(
  "gpt2-124M B=4 T=64|--layers 12 --heads 12 --embd 768 --vocab 50257 --ctx 1024 --batch 4 --seq-len 64"
  "small 6x384 B=4 T=64|--layers 6 --heads 6 --embd 384 --vocab 50257 --ctx 1024 --batch 4 --seq-len 64"
  "small 6x384 B=8 T=256|--layers 6 --heads 6 --embd 384 --vocab 50257 --ctx 1024 --batch 8 --seq-len 256"
)
gflop() { # model FLOPs per training step: 6 * params * tokens + attention (12 * L * T * C per token)
  python3 -c "
import sys; L,C,V,P,B,T=map(int,sys.argv[1:])
params = V*C + P*C + L*(12*C*C + 13*C) + 2*C
print((6*params*B*T + 12*L*T*C*B*T) / 1e9)" "$@"
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads"
printf '%-22s %-10s %10s %12s %10s %10s\n' config impl "s/step" "tokens/s" "GFLOP/s" "peak MiB"
for c in "${configs[@]}"; do
  name=${c%%|*}
  args=${c#*|}
  read -r L H C V P B T <<<"$(echo "$args" | awk '{print $2,$4,$6,$8,$10,$12,$14}')"
  gf=$(gflop "$L" "$C" "$V" "$P" "$B" "$T")
  ours=$(./build/bench/bench_train $args --steps "$steps" --threads "$threads")
  theirs=$(OMP_NUM_THREADS=$threads $py bench/torch_train.py $args --steps "$steps" --threads "$threads")
  python3 - "$name" "$gf" "$ours" "$theirs" <<'PY'
import json, sys
name, gf = sys.argv[1], float(sys.argv[2])
o, t = json.loads(sys.argv[3]), json.loads(sys.argv[4])
for r in (o, t):
    print("%-22s %-10s %10.3f %12.1f %10.1f %10.0f" % (name, r["impl"].split()[0], r["step_s"], r["tokens_per_s"],
                                                       gf / r["step_s"], r["peak_rss_mib"]))
print("%-22s %-10s %10s %12.2fx %21.2fx" % (name, "ratio", "", o["tokens_per_s"] / t["tokens_per_s"],
                                             t["peak_rss_mib"] / o["peak_rss_mib"]))
PY
done

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
  "smollm-135M B=4 T=64|--arch llama --layers 30 --heads 9 --kv-heads 3 --embd 576 --ff 1536 --vocab 49152 --ctx 2048 --batch 4 --seq-len 64"
)
gflop() { # model FLOPs per training step: 6 * params * tokens + attention (12 * L * T * C per token)
  python3 -c "
import sys; L,C,P,B,T,params=map(int,sys.argv[1:])
print((6*params*B*T + 12*L*T*C*B*T) / 1e9)" "$@"
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads"
printf '%-22s %-10s %10s %12s %10s %10s\n' config impl "s/step" "tokens/s" "GFLOP/s" "peak MiB"
for c in "${configs[@]}"; do
  name=${c%%|*}
  args=${c#*|}
  opt() { echo "$args" | awk -v k="--$1" '{for (i = 1; i < NF; i++) if ($i == k) print $(i + 1)}'; }
  ours=$(./build/bench/bench_train $args --steps "$steps" --threads "$threads")
  params=$(echo "$ours" | python3 -c 'import json,sys; print(json.load(sys.stdin)["params"])')
  gf=$(gflop "$(opt layers)" "$(opt embd)" "$(opt ctx)" "$(opt batch)" "$(opt seq-len)" "$params")
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

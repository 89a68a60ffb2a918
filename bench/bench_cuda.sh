#!/usr/bin/env bash
# GPU training throughput: offtune's CUDA backend (fp32 and bf16) against PyTorch on the
# same GPU in the same run, GPT-2 124M and 350M shapes, plus model FLOPs utilisation
# against the cuBLAS peak measured here (bench/gemm_peak.cu). Needs an NVIDIA GPU and a
# python with a CUDA build of torch (OT_BENCH_PYTHON, default python3).
# Usage: bash bench/bench_cuda.sh [steps]     (results: table on stdout, JSON lines in
# build-cuda/bench_cuda.jsonl)
# OT_BENCH_BUILD=DIR: use the binaries already built in DIR (bench/bench_train, bench/gemm_peak,
# bench/bench_serve; e.g. a build carried to a GPU machine by scripts/gpu_check.sh) and write the
# results there, instead of configuring and building build-cuda here.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
steps=${1:-10}
py=${OT_BENCH_PYTHON:-python3}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "bench_cuda.sh: no NVIDIA GPU here (nvidia-smi missing or sees no device); run it on a GPU machine" >&2
  exit 1
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench_cuda.sh: $py has no CUDA-enabled torch (set OT_BENCH_PYTHON)" >&2
  exit 1
fi

bd=${OT_BENCH_BUILD:-build-cuda}
if [ -z "${OT_BENCH_BUILD:-}" ]; then
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DOT_CUDA=ON >/dev/null
  cmake --build build-cuda -j"$(nproc)" --target bench_train gemm_peak bench_serve >/dev/null
fi
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
peak=$("$bd"/bench/gemm_peak 8192)
log=$bd/bench_cuda.jsonl
: >"$log"
echo "{\"gpu\": \"$gpu\", \"gemm_peak\": $peak}" >>"$log"
echo "GPU: $gpu"
echo "cuBLAS peak (8192^3): $peak"

# name | model shape | batch, sequence
configs=(
  "gpt2-124M|--layers 12 --heads 12 --embd 768 --vocab 50257 --ctx 1024|--batch 8 --seq-len 1024"
  "gpt2-350M|--layers 24 --heads 16 --embd 1024 --vocab 50257 --ctx 1024|--batch 8 --seq-len 1024"
)
printf '%-10s %-22s %10s %12s %8s\n' model impl "s/step" "tokens/s" "MFU"
for c in "${configs[@]}"; do
  IFS='|' read -r name shape batch <<<"$c"
  read -ra args <<<"$shape $batch --steps $steps --warmup 2"
  runs=()
  runs+=("$(OT_CUDA_BF16=0 "$bd"/bench/bench_train "${args[@]}" --backend cuda)")
  runs+=("$(OT_CUDA_BF16=1 "$bd"/bench/bench_train "${args[@]}" --backend cuda)")
  runs+=("$("$py" bench/torch_train.py "${args[@]}" --device cuda)")
  runs+=("$("$py" bench/torch_train.py "${args[@]}" --device cuda --bf16)")
  # fused attention in PyTorch too, where its version has it (torch >= 2.0)
  if "$py" -c 'import torch.nn.functional as F; F.scaled_dot_product_attention' 2>/dev/null; then
    runs+=("$("$py" bench/torch_train.py "${args[@]}" --device cuda --sdpa)")
    runs+=("$("$py" bench/torch_train.py "${args[@]}" --device cuda --sdpa --bf16)")
  fi
  for r in "${runs[@]}"; do echo "{\"model\": \"$name\", \"run\": $r}" >>"$log"; done
  "$py" - "$name" "$shape $batch" "$peak" "${runs[@]}" <<'PY'
import json, sys
name, args, peak = sys.argv[1], sys.argv[2].split(), json.loads(sys.argv[3])
a = dict(zip(args[0::2], map(int, args[1::2])))
L, C, V, P, B, T = a["--layers"], a["--embd"], a["--vocab"], a["--ctx"], a["--batch"], a["--seq-len"]
params = V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
flops = 6 * params * B * T + 12 * L * T * C * B * T  # per step: weights + attention
rows = [json.loads(r) for r in sys.argv[4:]]
for r, tag in zip(rows, ["fp32", "bf16", "fp32", "bf16", "fp32 sdpa", "bf16 sdpa"]):
    impl = r["impl"].split()[0].replace("-bf16", "") + " " + tag
    # fp32 runs against the fp32 peak, bf16 runs against the bf16 tensor-core peak
    pk = peak["bf16_tflops"] if "bf16" in tag else peak["fp32_tflops"]
    mfu = flops / r["step_s"] / (pk * 1e12)
    print("%-10s %-22s %10.4f %12.0f %7.1f%%" % (name, impl, r["step_s"], r["tokens_per_s"], 100 * mfu))
PY
done
# Multi-adapter serving on the GPU (KV cache, lora_sgmv_fwd): GPT-2 124M shape, 32 requests with
# 32 different LoRA adapters (and offsite adapters) batched, against one adapter and one at a time.
# No PyTorch competitor on the GPU yet (bench/torch_serve.py is the CPU one).
echo "serving (bench_serve --backend cuda, GPT-2 124M shape, 32 requests x (16 prompt + 32 generated)):"
"$bd"/bench/bench_serve --backend cuda --layers 12 --embd 768 --heads 12 --requests 32 --prompt 16 \
  --gen 32 --rank 8 --reps 2 --no-torch --dir "$bd"/bench_serve_tmp | tee "$bd"/bench_serve_cuda.txt
echo "JSON lines: $log"

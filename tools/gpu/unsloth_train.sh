#!/usr/bin/env bash
# `convsim train --backend unsloth` (issue #4) on the lent GPU machine, in Unsloth's environment: Unsloth pins
# transformers <= 5.17 and trl <= 1.15, so the run uses the machine's transformers 5.17 / peft / torch, the
# carried Unsloth wheels (tools/gpu/unsloth_wheels.sh) installed with pip --target into SITE and appended
# AFTER the machine's packages (as bench/unsloth_speed.py does), and convsim's source first - never speed.sh's
# $S/site (transformers 5.24). 30 steps of batch 32, a log line every 5 steps; prints the result line and
# tokens/s, and writes OUT/unsloth-train.json. Any failure prints the last 30 lines of the log, exit status 1.
#     bash tools/gpu/stage.sh; carry .gpu-stage/quick; bash .gpu-stage/quick/src/tools/gpu/unsloth_train.sh
# Inputs (defaults as tools/gpu/speed.sh): DATA ($G/data), MODEL ($S/model: a random model of Gemma 3 270M's
# shapes, made here with tools/gpu/random_model.py when missing), SITE ($S/unsloth-site, filled from $G/unsloth
# when missing), OUT ($S); S=/root/speed, G=$(pwd)/.gpu-stage/quick, LIMIT (seconds for the run, 480), EXTRA
# (more `convsim train` flags, e.g. EXTRA=--no-compile).
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
S=${S:-/root/speed}; G=${G:-$(pwd)/.gpu-stage/quick}
DATA=${DATA:-$G/data}; MODEL=${MODEL:-$S/model}; SITE=${SITE:-$S/unsloth-site}; OUT=${OUT:-$S}
SRC=$(cd "$(dirname "$0")/../.." && pwd)          # the convsim source tree this script belongs to
RUN=$S/unsloth-train; LOG=$S/unsloth-train.log
mkdir -p "$S" "$OUT"
fail() {   # fail MESSAGE [LOGFILE]
  echo "unsloth-train: FAILED: $1" >&2
  local f=${2:-$LOG}
  [ -s "$f" ] && { echo "--- last 30 lines of $f" >&2; tail -30 "$f" >&2; }
  exit 1
}
[ -d "$DATA" ] || fail "no data dir $DATA (DATA=...)"
if [ ! -d "$SITE/unsloth" ]; then                 # the carried wheels, once
  W=${WHEELS:-$G/unsloth}; [ -d "$W" ] || W=$S/unsloth
  ls "$W"/*.whl > /dev/null 2>&1 || fail "no Unsloth wheels in $W (bash tools/gpu/unsloth_wheels.sh, then carry them)"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$W"/*.whl > $S/unsloth-pip.log 2>&1 ||
    fail "pip install --target $SITE" $S/unsloth-pip.log
fi
if [ ! -f "$MODEL/config.json" ]; then            # speed depends on shapes, not weights
  env -u PYTHONPATH python3 "$SRC/tools/gpu/random_model.py" --tok "$G/tok" --out "$MODEL" > $S/random-model.log 2>&1 ||
    fail "building the random model $MODEL" $S/random-model.log
fi
printf 'logging_steps: 5\neval_steps: 100000\nsave_steps: 100000\nsamples: 0\nmax_val_examples: 8\n' > $S/unsloth-train.yaml
rm -rf "$RUN"
# convsim's source first, the machine's packages next, SITE last; `convsim` then imports unsloth before
# transformers (convsim/cli.py, --backend unsloth)
cd "$SRC" && env -u PYTHONPATH CONVSIM_HOME=${CONVSIM_HOME:-$S/home} timeout ${LIMIT:-480} python3 -c '
import runpy, sys
src, site = sys.argv.pop(1), sys.argv.pop(1)
sys.path.insert(0, src); sys.path.append(site)
runpy.run_module("convsim", run_name="__main__", alter_sys=True)' "$SRC" "$SITE" \
  train "$DATA" --backend unsloth --model "$MODEL" --out "$RUN" --batch-size 32 --max-steps 30 \
  --config $S/unsloth-train.yaml --json ${EXTRA:-} > $LOG 2>&1
rc=$?
[ $rc = 0 ] || fail "convsim train --backend unsloth exited $rc$([ $rc = 124 ] && echo " (over LIMIT=${LIMIT:-480} s)")"
# convsim.training.backends.unsloth.load_unsloth prints this once FastLanguageModel has loaded and LoRA-wrapped the model
# (Unsloth's own banner differs between releases: 2026.10 printed no "Fast ... patching" line)
banner=$(grep -a -m1 -E "^unsloth: [0-9,]+ trainable parameters" $LOG) ||
  fail "convsim did not train through Unsloth's FastLanguageModel (no 'unsloth: N trainable parameters' line in $LOG)"
cp $LOG "$OUT/unsloth-train.log" 2>/dev/null
line=$(grep -E '^\{' $LOG | tail -1)
[ -n "$line" ] || fail "no JSON result line in $LOG"
echo "$line" > "$OUT/unsloth-train.json"
cp "$RUN/run.json" "$OUT/unsloth-train-run.json" 2>/dev/null
cp "$RUN/metrics.jsonl" "$OUT/unsloth-train-metrics.jsonl" 2>/dev/null
echo "$banner"
echo "result: $line"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); print("tokens_per_s", r["tokens_per_s"])' "$line" ||
  fail "unreadable result line"

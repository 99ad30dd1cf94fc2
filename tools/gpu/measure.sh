#!/usr/bin/env bash
# Measures for the lent GPU, run by tools/gpu/fidelity.sh (BEFORE=tools/gpu/measure.sh) before the suite's pool
# starts, so the card is idle: serving under load, old server against new (bench/serve_load.py), and
# `convsim train` against the plain PEFT loop with one speed-up off at a time (bench/train_speed.py).
# Needs W (the suite's work dir; train_speed trains on its largest pair, or PAIR), RES (where the JSON goes) and, in the staged
# tree, old-serve/ (git archive of bench/serve_load.py's OLD_COMMIT) and COMMIT (this tree's commit).
set -u
cd "$(dirname "$0")/../.."
mkdir -p bench/results
C=$(cat COMMIT 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
python3 bench/serve_load.py --device cuda --old-src "$PWD/old-serve" --commit "$C" --requests-per-client 4 \
  && cp bench/results/serve-load.json "$RES/serve-load.json"
PAIR=${PAIR:-$(ls -S "$W"/pairs/*/data/conversations.jsonl | head -1 | xargs dirname | xargs dirname | xargs basename)}
echo "train_speed on $PAIR"
python3 bench/train_speed.py --data "$W/pairs/$PAIR/data" --device cuda --batch-size 32 --steps 40 \
  --plain-bf16 --variants eager,compiled-no-liger,fp32-frozen,no-grouping,packed --commit "$C" \
  --out "$RES/train-speed-gpu.json"

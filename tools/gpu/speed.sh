#!/usr/bin/env bash
# Training speed alone, in one short call on an otherwise idle machine (tools/gpu/pipeline.sh's train-speed
# stage shared the host's CPU with six training processes, and a training step here is bound by host time):
# a random model of Gemma 3 270M's shapes (tools/gpu/random_model.py; speed depends on shapes, not weights),
# the real chat data and tokenizer, then on one card: bench/train_speed.py (the plain loop vs convsim train,
# + the length-grouped arm) and Unsloth on the plain loop's batches (tools/gpu/unsloth.sh).
#     bash tools/gpu/stage.sh; carry .gpu-stage/quick; bash .gpu-stage/quick/src/tools/gpu/speed.sh
# (2026-11-26's run, bench/results/train-speed-gpu-random-h200.json, had `--variants no-grouping` when grouping was the
# default, and no Unsloth stage.)
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
S=/root/speed; G=$(pwd)/.gpu-stage/quick; mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S/site $G/whl/*.whl > $S/pip.log 2>&1
cp -r $G/unsloth $S/unsloth 2>/dev/null; mkdir -p $S/run && ln -sfn $G/data $S/run/data
cd $G/src && export CONVSIM_HOME=$S/home PYTHONPATH=$G/src:$S/site CUDA_VISIBLE_DEVICES=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 tools/gpu/random_model.py --tok $G/tok --out $S/model || exit 1
python3 bench/train_speed.py --data $G/data --model $S/model --device cuda --batch-size 32 --steps 40 \
  --variants grouped --out ${OUT:-$S}/train-speed-random.json 2>&1 | grep -E "^(plain|ours|grouped|compiling|warning)|speedup|mfu|Error|error"
[ -d $S/unsloth ] && STAGE=$S RES=${OUT:-$S} MODEL=$S/model bash tools/gpu/unsloth.sh 2>&1 | grep -E "^unsloth|rror" | tail -3

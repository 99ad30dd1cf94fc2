#!/usr/bin/env bash
# Training speed alone, in one short call on an otherwise idle machine (bench/gpu/pipeline.sh's train-speed
# stage shared the host's CPU with six training processes, and our step is bound by host time): a random model
# of Gemma 3 270M's shapes (bench/gpu/random_model.py; speed depends on shapes, not weights), the real chat
# data and tokenizer, then bench/train_speed.py: the plain loop vs convsim train (+ the no-grouping arm).
#     bash bench/gpu/stage.sh; carry .gpu-stage/quick; bash .gpu-stage/quick/src/bench/gpu/speed.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
S=/root/speed; G=$(pwd)/.gpu-stage/quick; mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S/site $G/whl/*.whl > $S/pip.log 2>&1
cd $G/src && export CONVSIM_HOME=$S/home PYTHONPATH=$G/src:$S/site CUDA_VISIBLE_DEVICES=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/gpu/random_model.py --tok $G/tok --out $S/model || exit 1
python3 bench/train_speed.py --data $G/data --model $S/model --device cuda --batch-size 32 --steps 40 \
  --variants no-grouping --out ${OUT:-$S}/train-speed-random.json 2>&1 | grep -E "^(plain|ours|no-grouping|compiling|warning)|speedup|mfu|Error|error"

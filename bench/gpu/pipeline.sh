#!/usr/bin/env bash
# Every GPU figure of convsim, in one detached pipeline on the lent two-GPU machine (see shared/GPU.md).
# Started by bench/gpu/start.sh under setsid, so it outlives one 10-minute call; bench/gpu/collect.sh
# waits for it and packs what is ready into $OUT. Results go to $RES (default /root/res).
#
# Stages (GPU 0 | GPU 1):
#   setup: carried wheels -> $S/site, GGUF parts -> converted model, parity with the CPU reference
#   scaling (both GPUs): convsim train on 1 GPU (batch 64) vs accelerate DDP on 2 (32 each), same steps
#   A (GPU 0): headline fine-tune -> eval (generation on) -> steering vector + sweeps
#   C (GPU 0): planted-canary attribution benchmark (bench/tda_canary.py)
#   B (GPU 1): train speed vs a plain PEFT loop -> ablations (loss on whole text; instruct rendering)
#              -> their evals -> generation speed on the headline run
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# $S/run holds what bench/gpu/start.sh copied: src/ (a snapshot of the code), data/, tok/, whl/
S=${STAGE:-/root/stage}; RES=${RES:-/root/res}; G=$S/run
cd $G/src || exit 1
export STAGE=$S CONVSIM_HOME=$S/home CONVSIM_TOK=$G/tok PYTHONPATH=$G/src:$S/site
mkdir -p $RES; T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $RES/stages.log; }
st() {  # st NAME TIMEOUT CMD...: one logged stage; output in $RES/NAME.log
  local name=$1 lim=$2; shift 2; say "start $name"
  timeout $lim "$@" > $RES/$name.log 2>&1; local rc=$?
  say "end $name rc=$rc"; return $rc
}
DATA=$G/data; BENCHCONF=$RES/bench.yaml
printf 'logging_steps: 5\neval_steps: 100000\nsave_steps: 100000\nsamples: 0\nmax_val_examples: 8\n' > $BENCHCONF

# ------------------------------------------------------------------ setup
say "setup"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S/site $G/whl/*.whl > $RES/pip.log 2>&1
[ -f $S/g.gguf ] || cat $S/part* > $S/g.gguf
sha256sum $S/g.gguf | tee -a $RES/stages.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $RES/gpus.txt
python3 -c "import transformers, peft, trl, torch, accelerate; print('versions', transformers.__version__, peft.__version__, trl.__version__, accelerate.__version__, torch.__version__)" | tee -a $RES/stages.log
[ -f $CONVSIM_HOME/models/gemma-3-270m/convsim-convert.json ] || st convert 400 python3 bench/gpu/convert.py || { say "CONVERT FAILED"; exit 1; }
CUDA_VISIBLE_DEVICES=0 st parity 200 python3 bench/gpu/parity.py

# ------------------------------------------------------------------ scaling (both GPUs)
CUDA_VISIBLE_DEVICES=0 st scale1 400 python3 -m convsim train $DATA --out $RES/scale1 --batch-size 64 --max-steps 60 --config $BENCHCONF --json
st scale2 400 accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m convsim train $DATA \
  --out $RES/scale2 --batch-size 32 --max-steps 60 --config $BENCHCONF --json

# ------------------------------------------------------------------ chains
chainA() {
  export CUDA_VISIBLE_DEVICES=0
  R=$RES/headline
  st headline-train 900 python3 -m convsim train $DATA --out $R --epochs 2 --batch-size 32 --eval-steps 40 --save-steps 100000 --json || return
  st headline-eval 900 python3 -m convsim eval $R --n 100 --batch-size 32 --json --out $RES/eval-headline.json
  st steer-build 300 python3 -m convsim steer build $R --from-data sentiment --layer 13 --out $RES/sent-l13.safetensors --json
  for s in 2 2.5 3; do
    st steer-sweep-$s 900 python3 -m convsim steer sweep $R $RES/sent-l13.safetensors --strengths 0,$s --positions new --n 60 \
      --samples 3 --max-new-tokens 40 --out $RES/sweep-$s --json &
  done
  wait
}
chainC() {
  export CUDA_VISIBLE_DEVICES=0
  [ -f bench/tda_canary.py ] || { say "no bench/tda_canary.py"; return; }
  st canary 1500 python3 bench/tda_canary.py --data $DATA --model gemma-3-270m --work $RES/canary \
    --out $RES/tda-canary.json --train-args "--epochs 2 --batch-size 32 --save-steps 100000 --eval-steps 100000"
}
chainB() {
  export CUDA_VISIBLE_DEVICES=1
  [ -f $RES/train-speed.json ] || st train-speed 600 python3 bench/train_speed.py --data $DATA --device cuda --batch-size 32 --steps 40 --out $RES/train-speed.json
  st abl-whole-train 900 python3 -m convsim train $DATA --out $RES/abl-whole --loss whole --epochs 2 --batch-size 32 --eval-steps 40 --save-steps 100000 --json &
  st abl-instruct-train 900 python3 -m convsim train $DATA --out $RES/abl-instruct --instruct-format --epochs 2 --batch-size 32 --eval-steps 40 --save-steps 100000 --json &
  wait
  st abl-whole-eval 600 python3 -m convsim eval $RES/abl-whole --n 100 --no-generate --json --out $RES/eval-abl-whole.json &
  st abl-instruct-eval 600 python3 -m convsim eval $RES/abl-instruct --n 100 --no-generate --json --out $RES/eval-abl-instruct.json &
  wait
  while [ ! -f $RES/headline/adapter/adapter_config.json ] && [ $(( $(date +%s) - T0 )) -lt 1500 ]; do sleep 5; done
  st gen-speed 600 python3 bench/generate_speed.py --run $RES/headline --out $RES/gen-speed.json
}
chainA & chainC & chainB &
wait
say "all done"
touch $RES/DONE

#!/usr/bin/env bash
# Second pass of tools/gpu/pipeline.sh on the same warm machine: the training stages again, after a fix
# (every GPU free: steering and generation speed are done). Same $S, $RES; new out dirs. Kept as the record
# of the run behind bench/results/multigpu.json, train-speed-gpu.json of that session (see git history) and the RESULTS.md ablations.
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
S=${STAGE:-/root/stage}; RES=${RES:-/root/res}; G=$S/run
cd $G/src || exit 1
export STAGE=$S CONVSIM_HOME=$S/home CONVSIM_TOK=$G/tok PYTHONPATH=$G/src:$S/site
rm -f $RES/DONE; T0=$(date +%s)
say() { echo "[r$(( $(date +%s) - T0 ))s] $*" | tee -a $RES/stages.log; }
st() { local name=$1 lim=$2; shift 2; say "start $name"; timeout $lim "$@" > $RES/$name.log 2>&1; local rc=$?; say "end $name rc=$rc"; return $rc; }
DATA=$G/data; BENCHCONF=$RES/bench.yaml
rm -rf $RES/scale1 $RES/scale2 $RES/fsdp-small $RES/e3 $RES/abl-instruct $RES/canary-e2 $RES/canary-e5
(
  CUDA_VISIBLE_DEVICES=0 st scale1 300 python3 -m convsim train $DATA --out $RES/scale1 --batch-size 64 --grad-accum 2 --max-steps 40 --config $BENCHCONF --json
  CUDA_VISIBLE_DEVICES=0,1 st scale2 300 accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m convsim train $DATA \
      --out $RES/scale2 --batch-size 64 --max-steps 40 --config $BENCHCONF --json
  CUDA_VISIBLE_DEVICES=0,1 st fsdp-small 240 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m convsim train \
      $DATA --out $RES/fsdp-small --batch-size 32 --max-steps 20 --config $BENCHCONF --json
) &
( CUDA_VISIBLE_DEVICES=2 st train-speed 600 python3 bench/train_speed.py --data $DATA --device cuda --batch-size 32 --steps 40 \
    --variants eager,compiled-no-liger --out $RES/train-speed.json ) &
( export CUDA_VISIBLE_DEVICES=3
  for e in 2 5; do
    st canary-e$e 900 python3 bench/tda_canary.py --data $DATA --model gemma-3-270m --work $RES/canary-e$e \
      --out $RES/tda-canary-e$e.json --canaries 20 --train-args "--epochs $e --batch-size 32 --save-steps 100000 --eval-steps 100000" &
  done
  wait ) &
( export CUDA_VISIBLE_DEVICES=3
  st e3-train 600 python3 -m convsim train $DATA --out $RES/e3 --epochs 3 --batch-size 32 --eval-steps 40 --save-steps 100000 --json &&
    st e3-eval 600 python3 -m convsim eval $RES/e3 --n 100 --batch-size 32 --json --out $RES/eval-e3.json ) &
( export CUDA_VISIBLE_DEVICES=3
  st abl-instruct-train 600 python3 -m convsim train $DATA --out $RES/abl-instruct --instruct-format --epochs 2 --batch-size 32 \
    --eval-steps 40 --save-steps 100000 --json &&
    st abl-instruct-eval 600 python3 -m convsim eval $RES/abl-instruct --n 100 --no-generate --json --out $RES/eval-abl-instruct.json ) &
wait
say "rerun done"; touch $RES/DONE

#!/usr/bin/env bash
# A short diagnostic pass on a lent GPU machine in ONE call, without the real weights (no model parts to
# stage): a random model of Gemma 3 270M's shapes (tools/gpu/random_model.py), then side by side
#   GPU 0    a profile of `convsim train` steps 11-15 (CONVSIM_PROFILE), defaults and the previous defaults
#            then Unsloth on the plain loop's batches (tools/gpu/unsloth.sh, now with a slim bitsandbytes)
#   GPU 1    bench/train_speed.py: plain loop (fp32 + autocast, and bf16 weights) vs convsim train and its arms
#   GPUs 2+3 convsim train under configs/accelerate/fsdp.yaml (the tied head) and resumed; with two GPUs
#            this runs first on both, before the timed runs
# Speeds depend on shapes, not weights, so they transfer to the real model; losses here mean nothing.
#     run: bash tools/gpu/stage.sh, then carry .gpu-stage/quick and run `bash .gpu-stage/quick/src/tools/gpu/quick.sh`
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
S=${STAGE:-/root/quick}; RES=$S/res/quick
mkdir -p $S $RES; rm -rf $S/run; cp -r .gpu-stage/quick $S/run; mv $S/run/unsloth $S/unsloth; G=$S/run
cd $G/src
export CONVSIM_HOME=$S/home PYTHONPATH=$G/src:$S/site
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $RES/stages.log; }
st() { local name=$1 lim=$2; shift 2; say "start $name"; timeout $lim "$@" > $RES/$name.log 2>&1; local rc=$?; say "end $name rc=$rc"; return $rc; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S/site $G/whl/*.whl > $RES/pip.log 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $RES/gpus.txt
NG=$(nvidia-smi -L | wc -l)
st model 200 python3 tools/gpu/random_model.py --tok $G/tok --out $S/model || exit 1
M=$S/model; DATA=$G/data; CONF=$RES/bench.yaml
# a call lasts at most 600 s: pack what is there at 560 s, whatever still runs
# (its own process group, never waited for: an earlier version's bare `wait` waited for it and idled ten minutes)
[ -n "${OUT:-}" ] && setsid bash -c "sleep $(( 560 - ($(date +%s) - T0) )); tar czf $OUT/quick-partial.tar.gz --exclude=trace.json -C $(dirname $RES) quick" &
WATCH=$!
printf 'logging_steps: 5\neval_steps: 100000\nsave_steps: 100000\nsamples: 0\nmax_val_examples: 8\n' > $CONF
( export CUDA_VISIBLE_DEVICES=$(( 2 % NG )),$(( 3 % NG ))      # first, while no timing runs
  printf 'logging_steps: 5\neval_steps: 100000\nsave_steps: 10\nsamples: 0\nmax_val_examples: 8\n' > $RES/fsdp.yaml
  st fsdp 300 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m convsim train $DATA \
    --model $M --out $S/fsdp --batch-size 32 --max-steps 10 --config $RES/fsdp.yaml --json &&
  st fsdp-resume 300 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m convsim train \
    $DATA --model $M --out $S/fsdp --max-steps 20 --continue-training --json
  ls -la $S/fsdp $S/fsdp/adapter $S/fsdp/checkpoints $S/fsdp/checkpoints/* > $RES/fsdp-files.txt 2>&1
  cp $S/fsdp/run.json $RES/fsdp-run.json 2>/dev/null; cp $S/fsdp/metrics.jsonl $RES/fsdp-metrics.jsonl 2>/dev/null ) &
FSDP=$!
[ $NG -ge 4 ] || wait $FSDP
( export CUDA_VISIBLE_DEVICES=0
  CONVSIM_PROFILE=$RES/prof-default st prof-default 240 python3 -m convsim train $DATA --model $M --out $S/p1 \
    --batch-size 32 --max-steps 30 --config $CONF --json
  CONVSIM_PROFILE=$RES/prof-previous st prof-previous 240 python3 -m convsim train $DATA --model $M --out $S/p2 \
    --batch-size 32 --max-steps 30 --config $CONF --frozen-dtype float32 --no-group-by-length --json
  STAGE=$S RES=$RES MODEL=$M st unsloth 240 bash tools/gpu/unsloth.sh ) &
P0=$!
( export CUDA_VISIBLE_DEVICES=$(( 1 % NG ))
  st train-speed 420 python3 bench/train_speed.py --data $DATA --model $M --device cuda --batch-size 32 --steps 60 \
    --plain-bf16 --variants compiled-fp32-random --out $RES/train-speed.json ) &
wait $FSDP $P0 $!
kill $WATCH 2>/dev/null
say "done"
for d in p1 p2; do cp $S/$d/run.json $RES/$d-run.json 2>/dev/null; done
[ -n "${OUT:-}" ] && cd $(dirname $RES) && tar czf $OUT/quick.tar.gz --exclude=trace.json quick && ls -la $OUT

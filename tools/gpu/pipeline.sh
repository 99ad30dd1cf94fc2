#!/usr/bin/env bash
# This session's GPU figures, in one detached pipeline on a lent machine with two GPUs (see shared/GPU.md). Started by tools/gpu/start.sh under setsid, so it outlives one
# 10-minute call; tools/gpu/collect.sh waits for it and packs what is ready into $OUT. Results go to $RES.
#
#   setup            carried wheels -> $S/site, GGUF parts -> converted model, parity with the CPU reference
#   GPU 0 (#10, #4)  train-speed: convsim train vs the plain PEFT loop (+ the padding-free arm) -> Unsloth on the
#                    plain loop's batches -> convsim train --backend unsloth; then the hp evaluation
#   GPU 1 (#9)       hp-*: variants of the headline training command side by side (3 epochs with --keep-best, a
#                    lower learning rate, r 32); the lowest validation loss is evaluated on the test split
#   GPU 1 (#7)       meanwhile, canaries with a sentence frame each, planted 16 times, prompted with their first
#                    word, then first three
#   CHAINS=frozen   one card: the headline command with float32 vs bf16 frozen weights (#9)
#   CHAINS=more     one card: the headline command with 16 messages of context, with each person's other chats as
#                   training-only data, and both; the lowest validation loss is tested if below the headline's (#9)
#   CHAINS=evalrun  one card: `convsim eval` of a run dir staged in $S/evalrun
#   CHAINS=unslothreal  one card: the headline training command through --backend unsloth, real weights (#4)
#   (FSDP through convsim train, #13, ran in tools/gpu/quick.sh on a model of the same shapes; the profile of
#   2026-11-26 is bench/results/train-profile-gpu.txt)
# (The chains of earlier sessions - scaling, the 16.6B FSDP model, steering, generation speed, ablations - are
# in this file's history: git log -p tools/gpu/pipeline.sh.)
#
# DRY=1 runs the same flow on the CPU with the tiny model and tiny sizes (checks this script, not numbers).
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# $S/run holds what tools/gpu/start.sh copied: src/ (a snapshot of the code), data/, tok/, whl/, hl-adapter/;
# earlier calls put the model parts, hl/ (the headline run's other files) and unsloth/ (wheels) into $S
S=${STAGE:-/root/stage}; RES=${RES:-/root/res}; G=$S/run; DRY=${DRY:-0}
cd $G/src || exit 1
export STAGE=$S CONVSIM_HOME=${CONVSIM_HOME:-$S/home} CONVSIM_TOK=$G/tok PYTHONPATH=$G/src:$S/site
mkdir -p $RES; T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $RES/stages.log; }
st() {  # st NAME TIMEOUT CMD...: one logged stage; output in $RES/NAME.log
  local name=$1 lim=$2; shift 2; say "start $name"
  timeout $lim "$@" > $RES/$name.log 2>&1; local rc=$?
  say "end $name rc=$rc"; return $rc
}
DATA=$G/data; HL=$S/headline; BENCHCONF=$RES/bench.yaml
printf 'logging_steps: 5\neval_steps: 100000\nsave_steps: 100000\nsamples: 0\nmax_val_examples: 8\n' > $BENCHCONF
if [ $DRY = 1 ]; then   # tiny everything
  M=(--model tiny-gemma3); EP=(--max-steps 2 --batch-size 4); STEPS=4; N=4; NSTEER=3; BIG=(--device cpu --tiny --steps 3)
  PY=python3; TS=(--device cpu --batch-size 4 --steps 8 --warmup 1 --model tiny-gemma3)
else
  M=(); EP=(); STEPS=40; N=100; NSTEER=60; BIG=(--steps 6 --seq 1024 --batch 2 --try-single); PY=python3; TS=(--device cuda --batch-size 32 --steps 40)
fi
gpu() { local n; n=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$n" -gt 0 ] || n=1; echo $(( $1 % n )); }

# ------------------------------------------------------------------ setup
say "setup"
$PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S/site $G/whl/*.whl > $RES/pip.log 2>&1
if [ $DRY = 0 ]; then
  [ -f $S/g.gguf ] || cat $S/part* > $S/g.gguf
  sha256sum $S/g.gguf | tee -a $RES/stages.log
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $RES/gpus.txt
fi
# the headline run of docs/RESULTS.md, carried in pieces (adapter, tokenizer.json.gz, run files)
if [ $DRY = 1 ]; then   # a tiny run stands in for the headline run
  HL=$S/headline-tiny
  [ -f $HL/run.json ] || $PY -m convsim train $DATA "${M[@]}" --out $HL --max-steps 3 --batch-size 4 --config $BENCHCONF > $RES/hl-tiny.log 2>&1
elif [ ! -f $HL/run.json ]; then
  mkdir -p $HL && cp -r $S/hl/. $HL/ && cp -r $G/hl-adapter $HL/adapter
  [ -f $HL/tokenizer/tokenizer.json.gz ] && gunzip -f $HL/tokenizer/tokenizer.json.gz
fi
$PY -c "import transformers, peft, trl, torch, accelerate; print('versions', transformers.__version__, peft.__version__, trl.__version__, accelerate.__version__, torch.__version__)" | tee -a $RES/stages.log
if [ $DRY = 0 ]; then
  [ -f $CONVSIM_HOME/models/gemma-3-270m/convsim-convert.json ] || st convert 400 $PY tools/gpu/convert.py || { say "CONVERT FAILED"; exit 1; }
  CUDA_VISIBLE_DEVICES=0 st parity 200 $PY tools/gpu/parity.py
fi

# ------------------------------------------------------------------ chains
HPBASE='epochs: 2
batch_size: 32
eval_steps: 40
save_steps: 100000'                       # the headline's training command, as a config
declare -A HPV=([ref]="" [lr1e4e3]="learning_rate: 0.0001
epochs: 3
keep_best: true" [r32lr1e4e3]="lora_r: 32
learning_rate: 0.0001
epochs: 3
keep_best: true")
speed() {     # GPU 0 (#10, #4): convsim train vs the plain PEFT loop (+ the padding-free arm), then Unsloth on the
  export CUDA_VISIBLE_DEVICES=$(gpu 0)   # plain loop's batches, then convsim train --backend unsloth, all one card
  st train-speed 900 $PY bench/train_speed.py --data $DATA "${TS[@]}" --variants packed --out $RES/train-speed.json
  [ $DRY = 0 ] && st unsloth 600 bash tools/gpu/unsloth.sh
  [ $DRY = 0 ] && S=$S DATA=$DATA MODEL=$CONVSIM_HOME/models/gemma-3-270m SITE=$S/unsloth-site OUT=$RES/unsloth-train \
    st unsloth-train 500 bash tools/gpu/unsloth_train.sh
  touch $RES/SPEED_DONE
}
hp() {        # GPU 1 (#9): variants of the headline command side by side, OMP threads capped so the speed arms
  export CUDA_VISIBLE_DEVICES=$(gpu 1) OMP_NUM_THREADS=4   # on GPU 0 keep their host cores; the lowest final
  local v                                                  # validation loss (rule fixed before any test number)
  for v in "${!HPV[@]}"; do                                # is evaluated on test, on GPU 0 once it is free
    printf '%s\n%s\n' "$HPBASE" "${HPV[$v]}" > $RES/hp-$v.yaml
    st hp-$v 900 $PY -m convsim train $DATA "${M[@]}" --out $RES/hp-$v --config $RES/hp-$v.yaml "${EP[@]}" --json &
  done
  wait
  best=$($PY tools/gpu/pick.py $RES/hp-*/ --out $RES/hp-selection.json) || return 1
  while [ ! -f $RES/SPEED_DONE ]; do sleep 5; done
  CUDA_VISIBLE_DEVICES=$(gpu 0) st hp-eval 900 $PY -m convsim eval $best --n $N --batch-size 32 --json --out $RES/eval-hp-best.json
}
canary() {    # GPU 1 (#7): 20 canaries, each its own sentence frame, planted 16 times; prompted with their first
  export CUDA_VISIBLE_DEVICES=$(gpu 1) OMP_NUM_THREADS=4   # word, then (same trained run) their first three
  local TA="--epochs 2 --batch-size 32 --save-steps 100000 --eval-steps 100000 ${EP[*]}"
  st canary-k1 1500 $PY bench/tda_canary.py --data $DATA --model ${M[1]:-gemma-3-270m} --work $RES/canary \
    --out $RES/tda-canary-k1.json --canaries 20 --repeat 16 --prefix-words 1 \
    --variants activations,activations-last,gradients --train-args "$TA"
  st canary-k3 900 $PY bench/tda_canary.py --data $DATA --model ${M[1]:-gemma-3-270m} --work $RES/canary \
    --out $RES/tda-canary-k3.json --canaries 20 --repeat 16 --prefix-words 3 --variants activations,activations-last \
    --train-args "$TA"
}
frozen() {    # one card (#9): the headline command with float32 vs bf16 (the default) frozen weights, side by side;
  export CUDA_VISIBLE_DEVICES=$(gpu 0)   # rule fixed first: the lower validation loss is evaluated on test only if it
  local v                                # is below the headline run's 2.8085
  for v in float32 bfloat16; do
    printf '%s\nfrozen_dtype: %s\n' "$HPBASE" $v > $RES/fz-$v.yaml
    st fz-$v 900 $PY -m convsim train $DATA "${M[@]}" --out $RES/fz-$v --config $RES/fz-$v.yaml "${EP[@]}" --json &
  done
  wait
  best=$($PY tools/gpu/pick.py $RES/fz-*/ --out $RES/fz-selection.json) || return 1
  if $PY -c "import json,sys; sys.exit(0 if json.load(open('$best/run.json'))['eval_loss'] < ${HEADLINE_VAL:-2.8085} else 1)"; then
    st fz-eval 900 $PY -m convsim eval $best --n $N --batch-size 32 --json --out $RES/eval-fz-best.json
  else say "fz: no run below the headline's validation loss; no test evaluation"; fi
}
more() {      # one card (#9): beyond hyperparameters, the headline command with more context per example (16
  export CUDA_VISIBLE_DEVICES=$(gpu 0)   # earlier messages, not 8; both methods get it), with each person's other
  local v                                # chats as training-only data (--extra-data), and both, side by side.
  declare -A MV=([ctx16]="context_size: 16" [others]="extra_data: [$G/data-others]" [others-ctx16]="context_size: 16
extra_data: [$G/data-others]")
  for v in "${!MV[@]}"; do   # rule fixed before any number: the lowest validation loss (the same val replies in
    printf '%s\n%s\n' "$HPBASE" "${MV[$v]}" > $RES/more-$v.yaml   # all three) is evaluated on test, only if it is
    st more-$v 2400 $PY -m convsim train $DATA "${M[@]}" --out $RES/more-$v --config $RES/more-$v.yaml "${EP[@]}" --json &
  done                                                     # below the headline run's 2.8085
  wait
  best=$($PY tools/gpu/pick.py $RES/more-*/ --out $RES/more-selection.json) || return 1
  if $PY -c "import json,sys; sys.exit(0 if json.load(open('$best/run.json'))['eval_loss'] < ${HEADLINE_VAL:-2.8085} else 1)"; then
    st more-eval 1200 $PY -m convsim eval $best --n $N --batch-size 32 --json --out $RES/eval-more-best.json
    cp $best/adapter/adapter_model.safetensors $RES/best-adapter.safetensors
  else say "more: no run below the headline's validation loss; no test evaluation"; fi
}
evalrun() {   # one card: `convsim eval` of a run dir carried to $S/evalrun (the headline's settings: 100 replies a
  export CUDA_VISIBLE_DEVICES=$(gpu 0)   # person, batch 32); used for the --extra-data run after the classifier fix
  st eval-run 1200 $PY -m convsim eval ${EVALRUN:-$S/evalrun} --n $N --batch-size 32 --json --out $RES/eval-run.json
}
unslothreal() {  # one card (#4): the headline training command (2 epochs, batch 32, validation every 40 steps on
  export CUDA_VISIBLE_DEVICES=$(gpu 0)   # 200 examples) through --backend unsloth, with the embedded model's real weights
  S=$S DATA=$DATA MODEL=$CONVSIM_HOME/models/gemma-3-270m SITE=$S/unsloth-site OUT=$RES/unsloth-real LIMIT=800 \
    EXTRA="--max-steps -1 --epochs 2 --eval-steps 40 --max-val-examples 200" st unsloth-real 900 bash tools/gpu/unsloth_train.sh
}
# CHAINS picks what runs (default: this session's three; CHAINS=frozen for the dtype comparison alone)
for c in ${CHAINS:-speed hp canary}; do $c & done
wait
say "all done"
touch $RES/DONE

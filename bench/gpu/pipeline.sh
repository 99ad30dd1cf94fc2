#!/usr/bin/env bash
# Every GPU figure of convsim, in one detached pipeline on a lent machine with four GPUs (two work too,
# more slowly; see shared/GPU.md). Started by bench/gpu/start.sh under setsid, so it outlives one
# 10-minute call; bench/gpu/collect.sh waits for it and packs what is ready into $OUT. Results go to $RES.
#
#   setup            carried wheels -> $S/site, GGUF parts -> converted model, parity with the CPU reference
#   GPUs 0+1 (#13)   scale1: convsim train, 1 GPU, batch 64 x 2 accumulation steps
#                    scale2: the same under accelerate DDP on 2 GPUs, batch 64 each (same global batch 128)
#                    fsdp-small: convsim train under configs/accelerate/fsdp.yaml (the real model, 2 GPUs)
#                    fsdp-big: a random model too large for one GPU in plain bf16 training, FSDP2 on 2 GPUs
#                    then gen-speed (GPU 0, #10) | steering candidates (GPU 1, #6)
#   GPU 2 (#10)      train-speed: convsim train vs the plain PEFT loop (+ arms) -> Unsloth on the same card
#   GPU 3 (#7, #9)   canaries (planted once and 8 times) -> instruct-rendering ablation -> 3-epoch variant
#
# DRY=1 runs the same flow on the CPU with the tiny model and tiny sizes (checks this script, not numbers).
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# $S/run holds what bench/gpu/start.sh copied: src/ (a snapshot of the code), data/, tok/, whl/, hl-adapter/;
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
  [ -f $CONVSIM_HOME/models/gemma-3-270m/convsim-convert.json ] || st convert 400 $PY bench/gpu/convert.py || { say "CONVERT FAILED"; exit 1; }
  CUDA_VISIBLE_DEVICES=0 st parity 200 $PY bench/gpu/parity.py
fi

# ------------------------------------------------------------------ chains
chain01() {   # GPUs 0 and 1: multi-GPU (#13), then generation speed and Unsloth (#10)
  export CUDA_VISIBLE_DEVICES=$(gpu 0),$(gpu 1)
  CUDA_VISIBLE_DEVICES=$(gpu 0) st scale1 300 $PY -m convsim train $DATA "${M[@]}" --out $RES/scale1 --batch-size 64 \
    --grad-accum 2 --max-steps 40 --config $BENCHCONF "${EP[@]}" --json
  if [ $DRY = 0 ]; then
    st scale2 300 accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m convsim train $DATA \
      --out $RES/scale2 --batch-size 64 --max-steps 40 --config $BENCHCONF --json
    st fsdp-small 240 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m convsim train \
      $DATA --out $RES/fsdp-small --batch-size 32 --max-steps 20 --config $BENCHCONF --json
  fi
  [ -f bench/fsdp_big.py ] && st fsdp-big 300 $PY -m torch.distributed.run --standalone --nproc_per_node 2 bench/fsdp_big.py "${BIG[@]}" --out $RES/fsdp-big.json
  CUDA_VISIBLE_DEVICES=$(gpu 0) st gen-speed 400 $PY bench/generate_speed.py --run $HL --out $RES/gen-speed.json &
  CUDA_VISIBLE_DEVICES=$(gpu 1) st steer 900 bash bench/gpu/steer.sh $HL $RES/steer $NSTEER &
  wait
}
chain2() {    # GPU 2: training speed (#10): convsim train vs the plain loop, then Unsloth on the same card
  export CUDA_VISIBLE_DEVICES=$(gpu 2)
  st train-speed 600 $PY bench/train_speed.py --data $DATA "${TS[@]}" \
    --variants eager,compiled+liger,eager+checkpointing --out $RES/train-speed.json
  st unsloth 600 bash bench/gpu/unsloth.sh
}
chain3() {    # GPU 3: canaries (#7), the instruct ablation and a longer headline variant (#9)
  export CUDA_VISIBLE_DEVICES=$(gpu 3)
  for r in 1 8; do      # each canary said once (not learnt in 2 or 5 epochs, 2026-11-26) and 8 times
    st canary-r$r 1500 $PY bench/tda_canary.py --data $DATA --model ${M[1]:-gemma-3-270m} --work $RES/canary-r$r \
      --out $RES/tda-canary-r$r.json --canaries 20 --repeat $r \
      --train-args "--epochs 2 --batch-size 32 --save-steps 100000 --eval-steps 100000 ${EP[*]}" &
  done
  wait
  st abl-instruct-train 600 $PY -m convsim train $DATA "${M[@]}" --out $RES/abl-instruct --instruct-format --epochs 2 \
    --batch-size 32 --eval-steps 40 --save-steps 100000 "${EP[@]}" --json &&
    st abl-instruct-eval 600 $PY -m convsim eval $RES/abl-instruct --n $N --no-generate --json --out $RES/eval-abl-instruct.json &
  st e3-train 600 $PY -m convsim train $DATA "${M[@]}" --out $RES/e3 --epochs 3 --batch-size 32 --eval-steps 40 \
    --save-steps 100000 "${EP[@]}" --json &&
    st e3-eval 600 $PY -m convsim eval $RES/e3 --n $N --batch-size 32 --json --out $RES/eval-e3.json
  wait
}
chain01 & chain2 & chain3 &
wait
say "all done"
touch $RES/DONE

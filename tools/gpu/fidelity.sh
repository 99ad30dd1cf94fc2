#!/usr/bin/env bash
# Lent-GPU logistics for bench/fidelity_suite.py (see shared/GPU.md; never imported by convsim).
# On the GPU machine, after the model parts are in /root/stage (../shared/tools/gpu-stage) and
# .gpu-stage/run (src/, fid/, tok/) was carried:
#   bash tools/gpu/fidelity.sh start     # install wheels, convert the model, start the suite detached
#   bash tools/gpu/fidelity.sh wait 540  # wait up to N s, then pack results into $OUT
# STEPS (default "all") is passed to the suite: e.g. STEPS="report dev2" RECIPE=default runs the report set and
# round 2's development runs in one pool (the GPU
# machine has no chitchat-dataset: prepare the work dir on the CPU and carry it as fid.tar.gz).
# BEFORE names a script run in the same job before the suite starts, on the still idle card (e.g.
# BEFORE=tools/gpu/measure.sh: the serving and training-speed measures); its JSON lands in $OUT too.
# PARALLEL defaults to 6 on a card of more than 100 GB (an H200) and 4 otherwise (6 ran out of memory on 80 GB).
# The machine goes back 30 s after a call returns, taking the detached job with it: make the `wait` calls
# back to back, with no pause between them, until DONE; each one packs what is ready into $OUT.
set -u
S=${STAGE:-/root/stage}; W=/root/fid; RES=/root/fidres
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export STAGE=$S CONVSIM_HOME=$S/home CONVSIM_TOK=$S/run/tok PYTHONPATH=$S/run/src:$S/site
case ${1:-start} in
start)
  mkdir -p $RES
  rm -rf $S/run && cp -r .gpu-stage/run $S/run
  cd $S/run/src || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S/site $S/whl/*.whl > $RES/pip.log 2>&1
  [ -f $S/g.gguf ] || cat $S/part* > $S/g.gguf
  sha256sum $S/g.gguf | tee $RES/stages.log
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $RES/gpu.txt
  [ -d $W ] || { mkdir -p $W && tar xzf $S/run/fid.tar.gz -C $W; }  # plan.json, pairs/, and finished runs/
  cat > $RES/job.sh <<JOB
cd $S/run/src
G=tools/gpu; [ -f tools/gpu/convert.py ] || G=tools/gpu
[ -f $CONVSIM_HOME/models/gemma-3-270m/convsim-convert.json ] || python3 \$G/convert.py > $RES/convert.log 2>&1
python3 \$G/parity.py > $RES/parity.log 2>&1
${BEFORE:+W=$W RES=$RES bash ${BEFORE} > $RES/before.log 2>&1}
P=\$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
[ -n "${PARALLEL:-}" ] && P=${PARALLEL:-} || { [ "\${P:-0}" -gt 100000 ] && P=6 || P=4; }
python3 bench/fidelity_suite.py ${STEPS:-all} --work $W --parallel \$P ${RECIPE:+--recipe $RECIPE} > $RES/suite.log 2>&1
touch $RES/DONE
JOB
  setsid nohup bash $RES/job.sh > $RES/job.out 2>&1 < /dev/null &
  sleep 20; cat $RES/job.out; tail -3 $RES/suite.log 2>/dev/null ;;
wait)
  t0=$(date +%s)
  while [ ! -f $RES/DONE ] && [ $(( $(date +%s) - t0 )) -lt ${2:-540} ]; do sleep 15; done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  tail -n 40 $RES/suite.log
  [ -n "${OUT:-}" ] || exit 0
  cp $RES/*.log $RES/*.json $RES/gpu.txt $OUT/ 2>/dev/null
  tar czf $OUT/fid-runs.tar.gz --exclude='checkpoints' --exclude='adapter' --exclude='tokenizer' --exclude='best' \
    --exclude='data' -C $W runs selection.json plan.json 2>/dev/null
  ls -la $OUT ;;
esac

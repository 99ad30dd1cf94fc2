#!/usr/bin/env bash
# Steering candidates for the GPU pipeline (#6): build each vector on the run, then sweep its strengths on
# held-out contexts (N contexts x 3 samples), the sweeps side by side on one GPU.
#     bash tools/gpu/steer.sh RUN_DIR OUT_DIR N
set -u
RUN=$1; OUT=$2; N=${3:-60}; mkdir -p $OUT
sweep() {  # sweep NAME STRENGTHS POSITIONS BUILD-ARGS...
  local name=$1 strengths=$2 pos=$3; shift 3
  python3 -m convsim steer build $RUN "$@" --out $OUT/$name.safetensors --json > $OUT/$name.build.log 2>&1 &&
  python3 -m convsim steer sweep $RUN $OUT/$name.safetensors --strengths $strengths --positions $pos --n $N \
    --samples 3 --max-new-tokens 40 --out $OUT/sweep-$name --json > $OUT/$name.sweep.log 2>&1
  echo "$name rc=$?"
}
sweep sent-l13 0,2.5 new --from-data sentiment --layer 13 &
wait

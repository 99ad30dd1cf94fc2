#!/usr/bin/env bash
# Wait (at most $1 seconds) for tools/gpu/pipeline.sh, then pack what is ready into $OUT:
#   results.tar.gz  every JSON, log and metrics file, the run dirs without their adapters
#   e3-adapter.safetensors  the 3-epoch headline variant's adapter (for evaluation on the CPU)
#   steer-*.safetensors     the steering vectors the sweeps used
RES=${RES:-/root/res}; limit=${1:-540}; t0=$(date +%s)
while [ ! -f $RES/DONE ] && [ $(( $(date +%s) - t0 )) -lt $limit ]; do
  sleep 10
  tail -n 2 $RES/stages.log 2>/dev/null | sed "s/^/  /"
done
echo "== stages"; cat $RES/stages.log
[ -n "${OUT:-}" ] || exit 0
tar czf $OUT/results.tar.gz --exclude='checkpoints' --exclude='*.safetensors' --exclude='tokenizer.json' \
  --exclude='*.npy' --exclude='*.f16' -C $(dirname $RES) $(basename $RES) 2>/dev/null
for v in $RES/steer/*.safetensors; do [ -f "$v" ] && cp "$v" $OUT/steer-$(basename "$v"); done
[ -f $RES/best-adapter.safetensors ] && cp $RES/best-adapter.safetensors $OUT/
[ -f $RES/e3/adapter/adapter_model.safetensors ] && cp $RES/e3/adapter/adapter_model.safetensors $OUT/e3-adapter.safetensors
ls -la $OUT

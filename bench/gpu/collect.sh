#!/usr/bin/env bash
# Wait (at most $1 seconds) for bench/gpu/pipeline.sh, then pack what is ready into $OUT:
#   results.tar.gz  every JSON, log and metrics file, the run dirs without their adapters
#   headline-adapter.safetensors + headline-tokenizer.json.gz  the headline run's adapter (for plots/eval on CPU)
RES=${RES:-/root/res}; limit=${1:-540}; t0=$(date +%s)
while [ ! -f $RES/DONE ] && [ $(( $(date +%s) - t0 )) -lt $limit ]; do
  sleep 10
  tail -n 2 $RES/stages.log 2>/dev/null | sed "s/^/  /"
done
echo "== stages"; cat $RES/stages.log
[ -n "${OUT:-}" ] || exit 0
tar czf $OUT/results.tar.gz --exclude='checkpoints' --exclude='*.safetensors' --exclude='tokenizer.json' \
  --exclude='*.npy' --exclude='*.f16' -C $(dirname $RES) $(basename $RES) 2>/dev/null
cp $RES/*.safetensors $OUT/ 2>/dev/null
if [ -f $RES/headline/adapter/adapter_model.safetensors ]; then
  cp $RES/headline/adapter/adapter_model.safetensors $OUT/headline-adapter.safetensors
  gzip -c $RES/headline/tokenizer/tokenizer.json > $OUT/headline-tokenizer.json.gz
fi
ls -la $OUT

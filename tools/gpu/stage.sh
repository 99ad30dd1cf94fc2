#!/usr/bin/env bash
# Build .gpu-stage/ (git-ignored) for one GPU session, from this checkout (see shared/GPU.md):
#   p0..p4/       the embedded model's GGUF in 48 MB parts, one per call (made once by ../shared/tools/gpu-stage)
#   hl/           the headline run's files but its adapter (7 MB; travels with p0; copy to /root/stage/hl)
#   unsloth/      Unsloth's wheels (7 MB; travels with p1; copy to /root/stage/unsloth)
#   run/          the last call: src/ (a snapshot of convsim, bench, configs, examples), data/ (the chitchat
#                 top pair), tok/ (tokenizer converted on the CPU by transformers 5.24), whl/ (wheels the
#                 GPU machine lacks), hl-adapter/ (the headline run's adapter), part5 (the GGUF's tail)
# Every call carries the working tree too (~3.5 MB): keep each call under 64 MiB.
#     bash tools/gpu/stage.sh [HEADLINE_RUN_DIR]      # default runs/headline
set -eu
cd "$(dirname "$0")/../.."
ST=.gpu-stage; HLRUN=${1:-runs/headline}
rm -rf $ST/run/src && mkdir -p $ST/run/src
cp -r convsim bench configs examples pyproject.toml $ST/run/src/
find $ST/run/src -name __pycache__ -prune -exec rm -rf {} +
mkdir -p $ST/run/whl
[ -d $ST/unsloth ] || bash tools/gpu/unsloth_wheels.sh
rm -rf $ST/run/unsloth $ST/run/hl
ls $ST/run/whl/liger_kernel-*.whl >/dev/null 2>&1 || pip download -q --no-deps -d $ST/run/whl liger-kernel==0.8.5
if [ -d "$HLRUN/adapter" ]; then
  rm -rf $ST/hl-adapter $ST/run/hl-adapter $ST/hl && cp -r $HLRUN/adapter $ST/run/hl-adapter
  mkdir -p $ST/hl/tokenizer && cp -r $HLRUN/run.json $HLRUN/config.yaml $HLRUN/data $ST/hl/
  gzip -c $HLRUN/tokenizer/tokenizer.json > $ST/hl/tokenizer/tokenizer.json.gz
  cp $HLRUN/tokenizer/tokenizer_config.json $ST/hl/tokenizer/
fi
# the top pair's chats with everyone else, training-only data for CHAINS=more (#9)
[ -f $ST/run/data-others/conversations.jsonl ] || python -m convsim import chitchat --top-pair --other-chats --out $ST/run/data-others
# quick/: what tools/gpu/quick.sh needs in its one call (no model parts, no headline run)
rm -rf $ST/quick && mkdir -p $ST/quick && cp -r $ST/run/src $ST/run/data $ST/run/tok $ST/run/whl $ST/unsloth $ST/quick/
du -sh $ST/* $ST/run/*

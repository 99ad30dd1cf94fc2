#!/usr/bin/env bash
# Unsloth's training speed on the plain loop's exact batches and LoRA settings (#10), in its own environment:
# Unsloth pins transformers <= 5.17 and trl <= 1.15, so it runs on the GPU machine's transformers 5.17 with
# its carried wheels (tools/gpu/unsloth_wheels.sh) and without our site dir (transformers 5.24) on the path.
#     bash tools/gpu/unsloth.sh          (inside tools/gpu/pipeline.sh; STAGE and RES as there)
set -u
S=${STAGE:-/root/stage}; G=$S/run; RES=${RES:-/root/res}
python3 -m pip install -q --no-index --no-deps --no-compile --target $S/unsloth-site $S/unsloth/*.whl || exit 1
python3 bench/unsloth_speed.py dump --data $G/data --model ${MODEL:-gemma-3-270m} --out $S/unsloth-dump --batch-size 32 --steps 40 --warmup 5 || exit 1
env -u PYTHONPATH python3 bench/unsloth_speed.py train --dump $S/unsloth-dump --site $S/unsloth-site --out $RES/unsloth-speed.json

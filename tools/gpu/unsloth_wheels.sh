#!/usr/bin/env bash
# Wheels for running Unsloth on the lent GPU machine (issue #10), into .gpu-stage/unsloth/ (git-ignored).
#
# Unsloth 2026.10.9 pins transformers <= 5.17 and trl <= 1.15, datasets < 5, so it cannot share
# $STAGE/site (transformers 5.24, trl 1.16, datasets 5.2). These wheels go into a separate target,
# $STAGE/unsloth-site, used with the machine's own transformers 5.17 / peft 0.21 / torch / triton, and
# bench/unsloth_speed.py appends that folder to the END of sys.path: the machine's packages win, the
# carried ones only fill what it lacks.
#
# The set is what `import unsloth` (GPU path) and `FastLanguageModel` need that the machine lacks:
#   unsloth, unsloth_zoo            the library (unsloth's wheel is 28.6 MB, 90 % of it the "Studio" web
#                                   UI under studio/ and its CLI under unsloth_cli/, neither imported by
#                                   `import unsloth`: a slim copy without them is written instead)
#   trl==1.15.0                     unsloth imports trl at import time (pin <= 1.15)
#   datasets==4.8.5 dill multiprocess  unsloth_zoo imports datasets at import time (pin < 5; the
#                                   machine has pyarrow, xxhash, fsspec, httpx: our datasets 5.2 runs there)
#   requests urllib3 idna certifi charset_normalizer  unsloth_zoo.rl_environments imports requests
#                                   unconditionally (only carried in case the machine lacks them)
#   cut_cross_entropy==25.1.1       optional: Apple's fused linear+cross-entropy, which unsloth_zoo uses
#                                   when importable (pure Python + Triton)
#   bitsandbytes==0.50.2 (slim)     FastLanguageModel.from_pretrained imports it even for a 16-bit LoRA
#                                   (measured 2026-11-26: "requires bitsandbytes"); the wheel is 43 MB for
#                                   its CUDA 11.8-13.2 and ROCm builds; the slim copy keeps only the CUDA 13
#                                   libraries (the machine's torch is cu130)
# Not carried, because unsloth guards their imports and 16-bit LoRA runs without them: xformers (falls back to SDPA), torchvision, torchao, flash-attn, vllm, tyro, diffusers,
# hf_transfer, msgspec (vLLM only), einops (vendored fla, Qwen3-Next only).
#
# Install there:  python3 -m pip install -q --no-index --no-deps --no-compile --target $STAGE/unsloth-site .gpu-stage/unsloth/*.whl
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
D=.gpu-stage/unsloth
rm -rf "$D"
mkdir -p "$D"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dl() {  # dl DIR SPEC...: wheels for the GPU image (CPython 3.12, x86_64 Linux), no dependencies
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
dl "$tmp" unsloth==2026.10.9
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
  -d "$tmp" bitsandbytes==0.50.2 2> >(grep -v "^WARNING: Location" >&2)
dl "$D" unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
  cut_cross_entropy==25.1.1 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 \
  charset_normalizer==3.5.3
# The slim unsloth wheel: same files less studio/ and unsloth_cli/ (and their RECORD lines, and the
# `unsloth` console script that points into unsloth_cli).
python3 - "$tmp/unsloth-2026.10.9-py3-none-any.whl" "$D/unsloth-2026.10.9-py3-none-any.whl" <<'PY'
import sys, zipfile
src, dst = sys.argv[1:3]
drop = ("studio/", "unsloth_cli/")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        name = info.filename
        if name.startswith(drop):
            continue
        data = zi.read(name)
        if name.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if not l.startswith(drop)).encode()
        elif name.endswith(".dist-info/entry_points.txt"):
            data = "".join(l for l in data.decode().splitlines(True) if "unsloth_cli" not in l).encode()
        zo.writestr(info, data)
PY
# The slim bitsandbytes wheel: only the CUDA 13 libraries (and the RECORD lines of what stays).
python3 - "$tmp"/bitsandbytes-0.50.2-*.whl "$D" <<'PY'
import re, sys, zipfile
from pathlib import Path
src, dst = sys.argv[1], Path(sys.argv[2]) / Path(sys.argv[1]).name
gone = lambda n: re.search(r"libbitsandbytes_(cuda(?!13)\d+|rocm\d+|xpu\d+)", n) is not None  # noqa: E731
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if gone(info.filename):
            continue
        data = zi.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if not gone(l)).encode()
        zo.writestr(info, data)
PY
ls -l "$D"
du -cb "$D"/*.whl | tail -1 | awk '{printf "total %.1f MiB\n", $1 / 1048576}'

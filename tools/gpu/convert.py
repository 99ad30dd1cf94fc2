"""On the GPU machine: GGUF -> the convsim cache dir, as models.ensure_embedded_cache does, tokenizer carried from the CPU."""

import json
import os
import shutil
import sys
import time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM

t0 = time.time()
S = Path(os.environ.get("STAGE", "/root/stage"))
target = Path(os.environ["CONVSIM_HOME"]) / "models" / "gemma-3-270m"
from convsim.modeling.models import savable_copy  # the same rebuild ensure_embedded_cache does

g = AutoModelForCausalLM.from_pretrained(str(S), gguf_file="g.gguf", dtype=torch.float32)
savable_copy(g).save_pretrained(target)
import gzip

for f in Path(os.environ.get("CONVSIM_TOK", ".gpu-stage/run/tok")).iterdir():
    if f.suffix == ".gz":
        (target / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    else:
        shutil.copy(f, target / f.name)
(target / "convsim-convert.json").write_text(json.dumps({"source": "g.gguf (carried)", "seconds": time.time() - t0}))
print("converted in", round(time.time() - t0), "s", file=sys.stderr)

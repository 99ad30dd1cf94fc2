"""A randomly initialised model of Gemma 3 270M's exact shapes, with the real tokenizer, for speed work
on a GPU machine before (or instead of) carrying the real weights: step times depend on shapes, not
values. Losses from it mean nothing.

    python tools/gpu/random_model.py --tok TOK_DIR --out MODEL_DIR     # then `--model MODEL_DIR`
"""

import argparse
import gzip
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("gemma-3-270m-config.json")))
    ap.add_argument("--tok", required=True, help="tokenizer dir (tokenizer.json or tokenizer.json.gz)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(a.config)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok = Path(a.tok)
    for f in tok.iterdir():
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as src, open(out / f.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(f, out / f.name)
    print(f"random {config.model_type} model with {sum(1 for _ in out.iterdir())} files in {out}")


if __name__ == "__main__":
    main()

"""The CPU recipe's speed probe under load: CPU seconds per token with one thread against two, repeated.

    python bench/cpu_probe.py --data DATA_DIR --out bench/results/cpu-probe.json

Runs convsim.training.cpu_recipe's probe on the embedded model and DATA_DIR's training examples (8 messages of
context, batches of 8), alternating 1 and 2 threads, and writes tokens per CPU second, wall and CPU time and
the load average beside each. Run it on a quiet machine and beside another job to see what load does.
"""

import argparse
import json
import os
import subprocess
import time

import torch

from convsim.config import TrainConfig
from convsim.training.backends import build_model
from convsim.training.cpu_recipe import probe_cpu_seconds_per_token
from convsim.training.data import prepare_data, prompt_format, tokenize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", default="1,2,1,2")
    ap.add_argument("--out")
    a = ap.parse_args()
    cfg = TrainConfig(context_size=8, batch_size=8, auto_extra_data=False)
    _, speakers, _, _, ex = prepare_data(cfg, a.data)
    model, tok, spec, _ = build_model(cfg, speakers, "cpu")
    rows, _ = tokenize(tok, prompt_format(cfg, spec, speakers), ex["train"], cfg)
    arms = []
    for threads in map(int, a.threads.split(",")):
        load = os.getloadavg()
        w, c = time.time(), time.process_time()
        per_token = probe_cpu_seconds_per_token(model, rows, 8, tok.pad_token_id, threads=threads)
        arms.append(
            {
                "threads": threads,
                "tokens_per_cpu_second": round(1 / per_token, 1),
                "wall_s": round(time.time() - w, 1),
                "cpu_s": round(time.process_time() - c, 1),
                "load_average_before": [round(x, 2) for x in load],
            }
        )
        print(json.dumps(arms[-1]), flush=True)
    res = {
        "machine": f"CPU x{os.cpu_count()}, torch {torch.__version__}",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "command": "python bench/cpu_probe.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items() if v),
        "arms": arms,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Memory of serving N runs of one base: `convsim serve` keeps one copy of the base model and loads each
run's adapter beside it. For N = 1..len(runs), a fresh process loads the first N runs as the server does
(`Service.from_runs`) and reports the weight bytes `/v1/info` shows (base, each adapter) and the process's
resident memory; the same runs loaded the old way, each as its own model (`Run.load`), for comparison.

    python bench/serve_memory.py runs/a runs/b runs/c
    python bench/serve_memory.py --train 3            # trains 3 two-step runs of the embedded model first

Writes bench/results/serve-memory.json (command, commit, machine and the numbers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "serve-memory.json"

PROBE = r"""
import json, sys
from convsim.serve.service import Service
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
mode, runs = sys.argv[1], sys.argv[2:]
before = rss()
if mode == "shared":
    svc = Service.from_runs(runs, device="cpu")
    mem = svc.memory()
    svc.close()
else:
    from convsim.runs import open_run
    models = [open_run(r).load(device="cpu") for r in runs]
    mem = {"total_bytes": sum(p.numel() * p.element_size() for m, _ in models for p in m.parameters())}
print(json.dumps({"weights": mem, "rss_bytes": rss(), "rss_before_load_bytes": before}))
"""


def main() -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_load import git, machine, make_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--train", type=int, default=0, help="train this many two-step runs of --model instead")
    ap.add_argument("--model", default="gemma-3-270m")
    args = ap.parse_args()
    runs = [str(Path(r).resolve()) for r in args.runs]
    tmp = Path(tempfile.mkdtemp(prefix="serve-memory-"))
    for k in range(args.train):
        (tmp / str(k)).mkdir()
        runs.append(str(make_run(tmp / str(k), args.model)))
    if len(runs) < 2:
        raise SystemExit("error: give at least two runs (or --train 2)")
    rows = []
    for n in range(1, len(runs) + 1):
        for mode in ("shared", "separate"):
            p = subprocess.run(
                [sys.executable, "-c", PROBE, mode, *runs[:n]],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={
                    "PYTHONPATH": str(ROOT),
                    "PATH": "/usr/bin:/bin",
                    "CUDA_VISIBLE_DEVICES": "",
                    "HOME": str(Path.home()),
                },
            )
            if p.returncode:
                raise SystemExit(f"error: probe failed: {p.stderr[-2000:]}")
            row = {"runs": n, "mode": mode, **json.loads(p.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "machine": machine("cpu"),
        "command": "python " + " ".join(sys.argv),
        "commit": git("rev-parse", "--short", "HEAD"),
        "model": args.model if args.train else "given runs",
        "rows": rows,
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

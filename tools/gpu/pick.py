"""Pick the run with the lowest final validation loss among finished runs; print its directory.

    python tools/gpu/pick.py RUN_DIR... [--out selection.json]

The selection rule of tools/gpu/pipeline.sh's hyperparameter variants (#9), fixed before any test-split
number is computed: validation loss only. Runs that did not finish are listed and skipped.
"""

import argparse
import json
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = {}
    for r in map(Path, a.runs):
        meta = json.loads((r / "run.json").read_text()) if (r / "run.json").is_file() else {}
        rows[str(r)] = {
            "eval_loss": meta.get("eval_loss"),
            "status": meta.get("status"),
            "train_loss": meta.get("train_loss"),
            "global_step": meta.get("global_step"),
        }
    done = {k: v for k, v in rows.items() if v["status"] == "done" and v["eval_loss"] is not None}
    if not done:
        print("no finished run", file=sys.stderr)
        return 1
    best = min(done, key=lambda k: done[k]["eval_loss"])
    if a.out:
        Path(a.out).write_text(
            json.dumps({"rule": "lowest final validation loss", "best": best, "runs": rows}, indent=1)
        )
    print(best)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

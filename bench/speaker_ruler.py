"""Does the speaker-verification ruler work? ROC-AUC of `convsim eval`'s speaker classifier on every suite pair.

For each pair of bench/fidelity_suite.py (data imported by its `prepare` step), the chat is split exactly as
`convsim train` splits it (by time, 10 % validation, 10 % test) and the classifier that `convsim eval` uses is
trained on the training split's real bursts and scored on the test split's: ROC-AUC per speaker, and whether
it reaches 0.75. Needs no model (CPU, seconds).

    python bench/speaker_ruler.py --work runs/fidelity --out bench/results/speaker-ruler.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from convsim.config import TrainConfig
from convsim.data.examples import build_examples, split_conversations
from convsim.data.schema import read_conversations
from convsim.evaluation import rulers
from convsim.evaluation.evaluate import speaker_classifier


def pair_auc(data_dir: Path, cfg: TrainConfig) -> dict:
    convs = read_conversations(data_dir)
    split = split_conversations(convs, cfg.val_fraction, cfg.test_fraction)
    train = build_examples(split["train"], None, cfg.context_size, cfg.max_burst)
    test = build_examples(split["test"], None, cfg.context_size, cfg.max_burst)
    clf = speaker_classifier(train)
    held = {}
    for e in test:
        held.setdefault(e.speaker, []).append([m.text for m in e.reply])
    return {s: {"auc": rulers.speaker_auc(clf, held, s), "test_bursts": len(held.get(s, []))} for s in sorted(held)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/fidelity"), help="the suite's work dir (after prepare)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    plan = json.loads((args.work / "plan.json").read_text())
    cfg = TrainConfig()
    rows = {}
    for pair in plan["development_pairs"] + plan["report_pairs"]:
        rows[pair] = pair_auc(args.work / "pairs" / pair / "data", cfg)
        print(pair, {s: round(v["auc"], 3) for s, v in rows[pair].items()}, flush=True)
    aucs = [v["auc"] for r in rows.values() for v in r.values() if v["auc"] is not None]
    res = {
        "command": "python bench/speaker_ruler.py --work W --out bench/results/speaker-ruler.json",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.machine()} CPU, {platform.python_version()}",
        "pairs": rows,
        "share_auc_ge_0.75": sum(a >= 0.75 for a in aucs) / len(aucs),
        "min_auc": min(aucs),
    }
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"speakers with AUC >= 0.75: {res['share_auc_ge_0.75']:.2f}; lowest {res['min_auc']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

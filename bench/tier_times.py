"""Test tiers' wall time before and after a change, on the tests both trees have.

Run each tree's suite with `--junitxml` on the same quiet machine, then compare:

    git worktree add /tmp/before bf5258f && (cd /tmp/before && pytest -p no:cacheprovider --junitxml=/tmp/before.xml)
    pytest tests/unit tests/cli tests/real --junitxml=/tmp/after.xml
    python bench/tier_times.py /tmp/before.xml /tmp/after.xml --before-commit bf5258f --out bench/results/tier-times.json

A test is the same test in both when its function (with parameters) and its file's name match; a test whose
file was renamed is matched by its function alone when that name is unique on both sides. Each matched test
counts in the tier of its folder after (tests/unit, tests/cli, tests/real). The whole suites' times are kept
too, but they are not comparable: the suite after has tests the one before did not. The JUnit files behind
bench/results/tier-times-*.json are kept in bench/results/tier-times/ (named by commit), so each JSON's command
replays from the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

TIERS = ("unit", "cli", "real")


def read_junit(path: Path) -> dict[tuple[str, str], dict]:
    """{(file stem, test name): {"module": dotted module, "seconds": s, "outcome": ...}} from a JUnit XML file."""
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "")
        stem = module.split(".")[-1]
        if stem and stem[0].isupper():  # a test class: the module is one part up
            module = module.rsplit(".", 1)[0]
            stem = module.split(".")[-1]
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        tests[(stem, case.get("name", ""))] = {
            "module": module,
            "seconds": float(case.get("time", 0)),
            "outcome": outcome,
        }
    return tests


def tier_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" and parts[1] in TIERS else "other"


def match(before: dict, after: dict) -> list[tuple[tuple, tuple]]:
    """Pairs of (before key, after key): same file stem and name, else the same name where it is unique on both sides."""
    pairs = [(k, k) for k in after if k in before]
    left_b = {k for k in before if k not in after}
    left_a = [k for k in after if k not in before]
    names_b = Counter(n for _, n in left_b)
    names_a = Counter(n for _, n in left_a)
    by_name_b = {k[1]: k for k in left_b}
    pairs += [(by_name_b[k[1]], k) for k in left_a if names_b[k[1]] == 1 and names_a[k[1]] == 1]
    return pairs


def compare(before: dict, after: dict) -> dict:
    pairs = [(b, a) for b, a in match(before, after) if before[b]["outcome"] == after[a]["outcome"] == "passed"]
    tiers: dict[str, dict] = defaultdict(lambda: {"tests": 0, "before_s": 0.0, "after_s": 0.0})
    for b, a in pairs:
        t = tiers[tier_of(after[a]["module"])]
        t["tests"] += 1
        t["before_s"] += before[b]["seconds"]
        t["after_s"] += after[a]["seconds"]
    for t in tiers.values():
        t["before_s"], t["after_s"] = round(t["before_s"], 1), round(t["after_s"], 1)
        t["after_over_before"] = round(t["after_s"] / t["before_s"], 3) if t["before_s"] else None
    slowest = sorted(pairs, key=lambda p: after[p[1]]["seconds"] - before[p[0]]["seconds"], reverse=True)[:10]
    return {
        "tiers": dict(sorted(tiers.items())),
        "matched_tests": len(pairs),
        "tests_before": len(before),
        "tests_after": len(after),
        "suite_seconds": {
            "before": round(sum(v["seconds"] for v in before.values()), 1),
            "after": round(sum(v["seconds"] for v in after.values()), 1),
        },
        "most_slowed": [
            {
                "test": f"{after[a]['module']}::{a[1]}",
                "before_s": round(before[b]["seconds"], 2),
                "after_s": round(after[a]["seconds"], 2),
            }
            for b, a in slowest
        ],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="JUnit XML of the suite before")
    p.add_argument("after", type=Path, help="JUnit XML of the suite after")
    p.add_argument("--before-commit", required=True)
    p.add_argument("--after-commit", default=None, help="default: this checkout's HEAD")
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    after_commit = (
        args.after_commit
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    res = {
        "command": " ".join(["python bench/tier_times.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "before_commit": args.before_commit,
        "after_commit": after_commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "note": args.note,
        **compare(read_junit(args.before), read_junit(args.after)),
    }
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(json.dumps(res["tiers"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

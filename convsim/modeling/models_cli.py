"""`convsim models`: the model table, each row's prompt style and whether its weights are here."""

from __future__ import annotations

import json

HELP = "List the supported base models, their prompt style and whether their weights are available here."
EXAMPLES = """
  convsim models
  convsim models --json
"""


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args):
    from convsim.modeling.models import DEFAULT_MODEL, MODEL_TABLE, weights_available

    rows = [
        {
            "name": s.name,
            "source": s.location or s.source,
            "prompt_style": s.prompt_style,
            "available": weights_available(s),
            "default": s.name == DEFAULT_MODEL,
            "note": s.note,
        }
        for s in MODEL_TABLE.values()
    ]
    if args.json:
        print(json.dumps({"models": rows}, indent=2))
        return 0
    print(f"{'name':<16} {'style':<9} {'source':<28} available")
    for r in rows:
        star = "*" if r["default"] else " "
        print(f"{r['name'] + star:<16} {r['prompt_style']:<9} {r['source']:<28} {r['available']}")
    print("\n* default. Any hub id (org/name) or local model directory also works as --model.")
    return 0

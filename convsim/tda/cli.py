"""`convsim tda index|query`: which training messages a reply comes from.

    convsim tda index RUN_DIR [--method activations|gradients] [--layer mid] [--pool mean] [--json]
    convsim tda query RUN_DIR "see you at the lake" --as Ana [--k 5] [--speaker Ana] [--json]

`index` writes RUN_DIR/tda/METHOD (incremental: only new or changed messages are computed; a stale or
damaged index is rebuilt). `query` reads it and never builds it: without an index it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from convsim.errors import UserError

HELP = "Training-data attribution: index a run's training messages, then find the ones a reply resembles."
EXAMPLES = """
  convsim tda index runs/me                              # activations of the middle layer, mean-pooled
  convsim tda index runs/me --method gradients           # per-example LoRA gradients (GPU recommended)
  convsim tda query runs/me "see you at the lake!" --as Ana --k 5
  convsim tda query runs/me "ok" --as Ana --speaker Ana --method gradients --history chat.txt --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="index|query")
    ix = sub.add_parser("index", help="compute one vector per training message (incremental)")
    ix.add_argument("run_dir")
    ix.add_argument("--method", default="activations", choices=["activations", "gradients"])
    ix.add_argument(
        "--layer",
        default="mid",
        help="activations: decoder layer, an integer (negative from the end), mid or last (default mid)",
    )
    ix.add_argument("--pool", default="mean", choices=["mean", "last"], help="activations: pooling over the text")
    ix.add_argument(
        "--center",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subtract the corpus mean before normalising (default on)",
    )
    ix.add_argument("--dim", type=int, default=2048, help="gradients: projection size (default 2048)")
    ix.add_argument("--batch-size", type=int, default=16)
    ix.add_argument("--rebuild", action="store_true", help="drop the index and compute everything again")
    ix.add_argument("--json", action="store_true", help="print the counts as JSON")

    q = sub.add_parser("query", help="the training messages most like a reply")
    q.add_argument("run_dir")
    q.add_argument("text", help="the reply (several messages of a burst: separate them with newlines)")
    q.add_argument("--as", dest="as_", required=True, metavar="NAME", help="who says the reply")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--speaker", help="only messages of this speaker")
    q.add_argument("--method", default="activations", choices=["activations", "gradients"])
    q.add_argument("--history", help="file of [Name] lines the reply followed (used by gradients)")
    q.add_argument("--json", action="store_true")


def run(args) -> int:
    from convsim.runs import open_run

    run_ = open_run(args.run_dir)
    if args.action == "index":
        return _index(run_, args)
    return _query(run_, args)


def _index(run_, args) -> int:
    from convsim.tda.index import IndexSpec, max_seq_length, update_index

    if args.dim < 1 or args.batch_size < 1:
        raise UserError("--dim and --batch-size must be at least 1")
    spec = IndexSpec(
        method=args.method,
        layer=args.layer,
        pool=args.pool,
        center=args.center,
        dim=args.dim,
        batch_size=args.batch_size,
        max_len=max_seq_length(run_),
    )
    stats = update_index(run_, spec, rebuild=args.rebuild, progress=not args.json or sys.stderr.isatty())
    if args.json:
        print(json.dumps(stats))
    else:
        what = "nothing new to compute" if not stats["computed"] else f"computed {stats['computed']} vectors"
        print(
            f"{args.method} index: {what}; {stats['live']} messages searchable, {stats['masked']} masked "
            f"({stats['seconds']:.1f}s) in {stats['path']}"
        )
    return 0


def _query(run_, args) -> int:
    from convsim.tda.query import Attributor, open_for_query

    if args.k < 1:
        raise UserError("--k must be at least 1")
    run_.check_person(args.as_)
    if args.speaker:
        run_.check_person(args.speaker)
    open_for_query(run_, args.method)  # fail fast, before loading the model
    context = []
    if args.history:
        from convsim.data.transcript import read_transcript

        context = read_transcript(args.history, run_.speakers)
    texts = [t for t in args.text.split("\n") if t.strip()] or [args.text]
    hits = Attributor(run_, method=args.method, k=args.k).query(
        texts, args.as_, k=args.k, speaker=args.speaker, context=context
    )
    if args.json:
        print(json.dumps({"query": args.text, "as": args.as_, "method": args.method, "hits": hits}, ensure_ascii=False))
    else:
        for h in hits:
            print(f"{h['rank']:>2}. {h['score']:.3f}  [{h['speaker']}] {h['time'] or ''}  {h['text']}")
        if not hits:
            print("(no training messages match)")
    return 0

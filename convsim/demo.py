"""`convsim demo`: the whole idea on this machine with nothing downloaded — import the chitchat pair
with the most messages (or your export), fine-tune the embedded Gemma 3 270M within a time budget,
evaluate perplexity (fine-tuned vs in-context vs base) on a small test subset, show held-out contexts
with the real and the generated replies, and print the commands to try next. Every step's output is
kept in the run dir.
"""

from __future__ import annotations

import time
from pathlib import Path

from convsim.errors import UserError

HELP = "Import, fine-tune, evaluate and sample on the embedded model and data (or --chat EXPORT)."
EXAMPLES = """
  convsim demo                                  # ~10 minutes on 2 CPU cores
  convsim demo --time-budget 3 --out runs/quick
  convsim demo --chat WhatsApp-Chat.zip --out runs/mine
"""


def add_arguments(p):
    p.add_argument("--chat", help="your own export instead of the embedded chitchat data")
    p.add_argument("--time-budget", type=float, default=None, help="training minutes (default 6 on CPU, 15 on a GPU)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--eval-n", type=int, default=None, help="test examples per speaker for the evaluation")


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def call(argv: list[str]) -> None:
    from convsim.cli import main

    rc = main(argv)
    if rc:
        raise UserError(f"`convsim {' '.join(argv)}` failed (exit {rc})")


def run(args):
    import torch

    t_start = time.time()
    out = Path(args.out)
    data = out.parent / f"{out.name}-data"
    gpu = torch.cuda.is_available()
    budget = args.time_budget if args.time_budget is not None else (15.0 if gpu else 6.0)
    eval_n = args.eval_n or (60 if gpu else 6)

    step(f"1/5 import {'your chat' if args.chat else 'the chitchat pair with the most messages'}")
    if not (data / "conversations.jsonl").exists():
        src = [args.chat] if args.chat else ["chitchat", "--top-pair"]
        call(["import", *src, "--out", str(data)])
    else:
        print(f"(reusing {data})")

    step(f"2/5 fine-tune {args.model} for at most {budget:g} min on {'GPU' if gpu else 'CPU'}")
    if not (out / "adapter" / "adapter_config.json").exists():
        extra = (
            ["--batch-size", "32", "--epochs", "2", "--eval-steps", "50"]
            if gpu
            else [
                "--batch-size",
                "8",
                "--epochs",
                "1",
                "--max-seq-length",
                "256",
                "--eval-steps",
                "40",
                "--save-steps",
                "20",
                "--max-val-examples",
                "32",
            ]
        )
        resume = ["--continue-training"] if (out / "run.json").exists() else []
        call(
            [
                "train",
                str(data),
                "--out",
                str(out),
                "--model",
                args.model,
                "--time-budget",
                str(budget),
                *extra,
                *resume,
            ]
        )
    else:
        print(f"(reusing the trained run in {out})")

    from convsim.evaluation.compare import compare, print_rows
    from convsim.evaluation.evaluate import evaluate
    from convsim.fsutil import write_json
    from convsim.runs import open_run

    run_ = open_run(out)

    step(f"3/5 evaluate on {eval_n} held-out examples per speaker (perplexity of the real replies)")
    res = evaluate(run_, n=eval_n, generate=False)
    write_json(out / "demo-eval.json", res, private=False)
    print(f"{'speaker':<12}{'fine-tuned':>12}{'in-context':>12}{'base':>10}")
    for s, r in res["speakers"].items():
        print(f"{s[:11]:<12}{r['ppl_finetuned']:>12.1f}{r['ppl_in_context']:>12.1f}{r['ppl_base']:>10.1f}")

    step("4/5 held-out contexts: what the person really said vs the models")
    model, tok = run_.load()
    rows = compare(run_, 3, model=model, tok=tok)
    write_json(out / "demo-samples.json", {"examples": rows}, private=True)
    print_rows(rows)
    print(f"(first sampled reply {time.time() - t_start:.0f} s after the demo started)")

    step("5/5 try next")
    who = run_.targets[0]
    print(f"  convsim chat {out} --as {who!r} --stream      # talk to {who}")
    print(f"  convsim converse {out} --turns 10             # watch them talk")
    print(f"  convsim eval {out} --json                     # the full evaluation")
    print(f"  convsim plots {out}                           # emotion heatmaps, loss curves, ...")
    print(f"  convsim serve {out}                           # OpenAI-compatible API + chat page")
    print(f"\ndemo finished in {time.time() - t_start:.0f} s; everything is in {out}/")
    return 0

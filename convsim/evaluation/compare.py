"""`convsim compare`: held-out examples side by side — the context, what the person really said, the base
model, the base model with in-context examples of the person, and the fine-tuned model.
"""

from __future__ import annotations

import json
import sys

from convsim.data.examples import build_examples
from convsim.errors import UserError

HELP = "Show held-out contexts with the real reply and the base, in-context and fine-tuned replies."
EXAMPLES = """
  convsim compare runs/me --n 5
  convsim compare runs/me --n 20 --json > compare.json
"""


def add_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--budget", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--allow-copy",
        action="store_true",
        help="fine-tuned replies without the copy guard (by default they never repeat an 8-token training span)",
    )
    p.add_argument("--json", action="store_true")


def compare(
    run_,
    n,
    split="test",
    temperature=0.7,
    max_new_tokens=48,
    budget=768,
    seed=0,
    model=None,
    tok=None,
    copy_guard=True,
):
    from convsim.evaluation.evaluate import base_model_ctx, reply_part
    from convsim.inference import nocopy
    from convsim.inference.generate import SampleConfig, reply_from_prompt
    from convsim.evaluation.incontext import Retriever, incontext_prompt, plain

    if model is None:
        model, tok = run_.load()
    fmt, pfmt = run_.fmt, plain(run_.fmt)
    cs, mb = run_.meta.context_size, run_.meta.max_burst
    held = build_examples(run_.split(split), run_.targets, cs, mb)
    if not held:
        raise UserError(f"the run's {split} split has no examples")
    retriever = Retriever(build_examples(run_.split("train"), None, cs, mb))
    step = max(1, len(held) // n)
    cfg = SampleConfig(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    guard = nocopy.for_run(run_, tok) if copy_guard else None
    rows = []
    for e in held[::step][:n]:
        prompt_ft, _, _ = reply_part(tok, fmt, e)
        prompt_b, _, _ = reply_part(tok, pfmt, e)
        ic = incontext_prompt(
            tok,
            pfmt,
            e.context,
            e.speaker,
            retriever.top(e.context, e.speaker, exclude=[m.text for m in e.reply]),
            budget,
        )
        with base_model_ctx(model):
            base = reply_from_prompt(model, tok, pfmt, prompt_b, e.speaker, cfg)
            inctx = reply_from_prompt(model, tok, pfmt, ic, e.speaker, cfg)
        ft = reply_from_prompt(model, tok, fmt, prompt_ft, e.speaker, cfg, guard=guard)
        rows.append(
            {
                "speaker": e.speaker,
                "context": [{"speaker": m.speaker, "text": m.text} for m in e.context],
                "real": [m.text for m in e.reply],
                "base": base,
                "in_context": inctx,
                "finetuned": ft,
            }
        )
    return rows


def one_line(messages: list[str]) -> str:
    """A burst on one line: messages joined by ' / ', newlines inside a message shown as ' ⏎ '."""
    return " / ".join(" ⏎ ".join(p.strip() for p in m.splitlines() if p.strip()) for m in messages)


def print_rows(rows, out=sys.stdout, context_lines=4):
    from convsim.data.names import displays

    names = displays({r["speaker"] for r in rows} | {m["speaker"] for r in rows for m in r["context"]})
    for i, r in enumerate(rows, 1):
        print(f"── example {i} ─ reply as {names[r['speaker']]}", file=out)
        for m in r["context"][-context_lines:]:
            print(f"   [{names[m['speaker']]}] {one_line([m['text']])}", file=out)
        for label in ("real", "finetuned", "in_context", "base"):
            print(f"   {label:>10}: {one_line(r[label]) or '… (empty reply)'}", file=out)
        print(file=out)


def run(args):
    from convsim.runs import open_run

    run_ = open_run(args.run_dir)
    rows = compare(
        run_,
        args.n,
        args.split,
        args.temperature,
        args.max_new_tokens,
        args.budget,
        args.seed,
        copy_guard=not args.allow_copy,
    )
    if args.json:
        print(json.dumps({"examples": rows}, ensure_ascii=False))
    else:
        print_rows(rows)
    return 0

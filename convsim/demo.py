"""`convsim demo`: the whole idea on this machine with nothing downloaded — import the chitchat pair
with the most messages (or your export), fine-tune the embedded Gemma 3 270M for a fixed number of
optimizer steps (a small number on the CPU, the full recipe on a GPU: the same amount of work however busy
the machine is), evaluate perplexity (fine-tuned vs in-context vs base) on a small test subset, say in
words what that table shows, show held-out contexts with the real and the generated replies, and print the
commands to try next. Every step's output is kept in the run dir.
"""

from __future__ import annotations

import time
from pathlib import Path

from convsim.errors import UserError
from convsim.training.cpu_recipe import CPU_RECIPE

HELP = "Import, fine-tune, evaluate and sample on the embedded model and data (or --chat EXPORT)."
EXAMPLES = """
  convsim demo                                  # CPU: 20 steps of 8 examples; GPU: the full recipe
  convsim demo --steps 60 --out runs/longer     # more training, the same on a busy or an idle machine
  convsim demo --chat WhatsApp-Chat.zip --out runs/mine
"""

CPU_STEPS = 20  # optimizer steps of 8 examples: the demo's training on a CPU


def add_arguments(p):
    p.add_argument("--chat", help="your own export instead of the embedded chitchat data")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps to train (default {CPU_STEPS} of 8 examples on a CPU; on a GPU 2 epochs of 32)",
    )
    p.add_argument("--time-budget", type=float, default=None, help="also stop training after this many minutes")
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


def fmt_ppl(x: float) -> str:
    """A perplexity as the demo's table prints it; the summary compares these printed values."""
    return f"{x:.1f}"


def table_lines(speakers: dict[str, dict]) -> list[str]:
    """The perplexity table: one row per person (alias beside an id-like name)."""
    from convsim.data.names import displays

    names = displays(speakers)
    w = max([len("person")] + [len(v) for v in names.values()]) + 2
    lines = [f"{'person':<{w}}{'fine-tuned':>12}{'in-context':>12}{'base':>10}"]
    for s, r in speakers.items():
        lines.append(
            f"{names[s]:<{w}}{fmt_ppl(r['ppl_finetuned']):>12}{fmt_ppl(r['ppl_in_context']):>12}"
            f"{fmt_ppl(r['ppl_base']):>10}"
        )
    return lines


def summary(speakers: dict[str, dict], training: str) -> list[str]:
    """What the table says, in words, from the values as printed (one decimal): per person whether
    fine-tuning beat prompting and the base model, then one overall sentence with what to do when it did
    not. `training` says what was trained (e.g. "20 steps of 8 examples on the CPU")."""
    from convsim.data.names import displays

    names = displays(speakers)
    lines, won = [], []
    for s, r in speakers.items():
        ft, ic, base = (float(fmt_ppl(r[k])) for k in ("ppl_finetuned", "ppl_in_context", "ppl_base"))
        vs_ic = "beat" if ft < ic else ("tied with" if ft == ic else "lost to")
        vs_base = "beat" if ft < base else ("tied with" if ft == base else "lost to")
        lines.append(
            f"{names[s]}: fine-tuning {vs_ic} prompting ({fmt_ppl(ft)} vs {fmt_ppl(ic)}) "
            f"and {vs_base} the base model ({fmt_ppl(base)})."
        )
        if ft < ic:
            won.append(names[s])
    n = len(speakers)
    advice = (
        "To train a model that does, give it more steps (`convsim demo --steps 200`, or `convsim train` with its "
        "full recipe) or run it on a GPU, where the demo trains 2 epochs."
    )
    if n and len(won) == n:
        lines.append(f"Fine-tuning beat prompting for every person here, after {training}.")
    elif won:
        lines.append(
            f"Fine-tuning beat prompting for {len(won)} of {n} people after {training} "
            f"(for {', '.join(won)}), not for the others. {advice}"
        )
    else:
        lines.append(f"Fine-tuning did not beat prompting for anyone here after {training}. {advice}")
    return lines


def run(args):
    import torch

    t_start = time.time()
    out = Path(args.out)
    data = out.parent / f"{out.name}-data"
    gpu = torch.cuda.is_available()
    if args.steps is not None and args.steps <= 0:
        raise UserError("--steps must be a positive number of optimizer steps")
    steps = args.steps if args.steps is not None else (None if gpu else CPU_STEPS)
    eval_n = args.eval_n or (60 if gpu else 6)

    step(f"1/5 import {'your chat' if args.chat else 'the chitchat pair with the most messages'}")
    if not (data / "conversations.jsonl").exists():
        src = [args.chat] if args.chat else ["chitchat", "--top-pair"]
        call(["import", *src, "--out", str(data)])
    else:
        print(f"(reusing {data})")

    batch = 32 if gpu else CPU_RECIPE["batch_size"]
    training = (
        f"{steps} steps of {batch} examples" if steps else f"2 epochs of batches of {batch}"
    ) + f" on {'a GPU' if gpu else 'the CPU'}"
    budget = f", stopping early after {args.time_budget:g} min" if args.time_budget else ""
    step(f"2/5 fine-tune {args.model}: {training}{budget}")
    if not (out / "adapter" / "adapter_config.json").exists():
        if gpu:
            extra = ["--recipe", "gpu", "--batch-size", str(batch), "--no-auto-extra-data", "--epochs", "2"]
            extra += ["--eval-steps", "50"]
        else:
            # `convsim train`'s CPU recipe (its context, batch and data), with a fixed number of steps instead of
            # the work its speed probe would size, and a small validation set
            extra = ["--recipe", "cpu", "--max-seq-length", "256", "--max-val-examples", "32"]
            extra += ["--logging-steps", str(max(1, min(10, steps // 4)))]
        if steps:
            every = max(1, steps // 2)  # a checkpoint halfway for --continue-training; validation at the end
            extra += ["--max-steps", str(steps), "--save-steps", str(every), "--eval-steps", str(steps + 1)]
        if args.time_budget:
            extra += ["--time-budget", str(args.time_budget)]
        resume = ["--continue-training"] if (out / "run.json").exists() else []
        call(["train", str(data), "--out", str(out), "--model", args.model, *extra, *resume])
    else:
        print(f"(reusing the trained run in {out})")

    from convsim.evaluation.compare import compare, print_rows
    from convsim.evaluation.evaluate import evaluate
    from convsim.fsutil import write_json
    from convsim.runs import open_run

    run_ = open_run(out)

    step(
        f"3/5 evaluate on {eval_n} held-out examples per person: perplexity of what they really said (lower is better)"
    )
    res = evaluate(run_, n=eval_n, generate=False)
    if run_.meta.global_step is not None and steps and run_.meta.global_step < steps:
        training = f"{run_.meta.global_step} steps of {batch} examples (stopped early: {run_.meta.stop_reason})"
    said = summary(res["speakers"], training)
    write_json(out / "demo-eval.json", {**res, "summary": said}, private=False)
    print("\n".join(table_lines(res["speakers"])))

    step("4/5 held-out contexts: what the person really said vs the models")
    model, tok = run_.load()
    rows = compare(run_, 3, model=model, tok=tok)
    write_json(out / "demo-samples.json", {"examples": rows}, private=True)
    print_rows(rows)
    print(f"(first sampled reply {time.time() - t_start:.0f} s after the demo started)")

    step("what the table shows")
    print("\n".join(said))

    step("5/5 try next")
    from convsim.data.names import display, displays

    who = run_.targets[0]
    name = displays(res["speakers"]).get(who) or display(who)  # as the table above shows them
    print(f"  convsim chat {out} --as {who!r} --stream      # talk to {name}")
    print(f"  convsim converse {out} --turns 10             # watch them talk")
    print(f"  convsim eval {out} --json                     # the full evaluation")
    print(f"  convsim plots {out}                           # emotion heatmaps, loss curves, ...")
    print(f"  convsim serve {out}                           # OpenAI-compatible API + chat page")
    print(f"\ndemo finished in {time.time() - t_start:.0f} s; everything is in {out}/")
    return 0

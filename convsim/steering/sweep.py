"""`convsim steer sweep`: for held-out test contexts of a run, the effect of a steering vector (mean VADER
compound score of replies sampled under steering, same contexts and seeds at every strength) against its
cost (perplexity of the real held-out replies under the same steering, from the reply-only loss), written
to sweep.json and drawn as the dose-response curve sweep.png.

    convsim steer sweep runs/me happy.safetensors --strengths 0,4,8,12 --n 24 --samples 3 --out sweeps/happy
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from convsim.errors import UserError
from convsim.modeling.loss import reply_nll
from convsim.steering.files import parse_numbers


def pick(examples: list, n: int) -> list:
    """n examples spread evenly over the split (not just the first conversation)."""
    if len(examples) <= n:
        return list(examples)
    return [examples[round(i * (len(examples) - 1) / max(n - 1, 1))] for i in range(n)]


def measure(
    model,
    tok,
    fmt,
    vector,
    examples,
    strengths,
    layers=None,
    positions="all",
    temperature=0.7,
    top_p=0.95,
    max_new_tokens=48,
    seed=0,
    samples=1,
    max_context_tokens=1024,
    progress=True,
) -> list[dict]:
    """One row per strength: mean VADER compound of sampled replies (`samples` per context, drawn in one
    batch), perplexity of the real replies."""
    from tqdm.auto import tqdm

    from convsim.data.examples import render
    from convsim.inference.generate import SampleConfig, reply
    from convsim.steering.apply import steer
    from convsim.steering.build import vader

    an = vader()
    rendered = [
        render(tok, fmt, e.context, e.speaker, e.reply, e.next_speaker, max_len=max_context_tokens) for e in examples
    ]
    rows = []
    bar = tqdm(total=len(strengths) * len(examples), desc="sweep", unit="reply", disable=not progress, file=sys.stderr)
    for s in strengths:
        scores, replies, nll, ntok = [], [], 0.0, 0
        for i, (e, r) in enumerate(zip(examples, rendered)):
            cfg = SampleConfig(
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                max_context_tokens=max_context_tokens,
                seed=seed + i,
            )  # same seed at every strength
            with steer(model, vector, s, layers, positions):
                bursts = reply(model, tok, fmt, e.context, e.speaker, cfg, n=samples)
            # teacher forcing: "new" steers the reply positions only, exactly as decoding would
            with steer(model, vector, s, layers, r.prompt_len if positions == "new" else "all"):
                a, b = reply_nll(model, r.input_ids, r.text_mask)
            nll, ntok = nll + a, ntok + b
            for burst in bursts:
                text = " ".join(burst)
                scores.append(an.polarity_scores(text)["compound"] if text else 0.0)
                replies.append(burst)
            bar.update()
        rows.append(
            {
                "strength": s,
                "vader": sum(scores) / len(scores),
                "ppl": math.exp(nll / max(ntok, 1)),
                "tokens_scored": ntok,
                "scores": scores,
                "replies": replies,
                "empty_replies": sum(1 for b in replies if not b),
            }
        )
    bar.close()
    base = next(r for r in rows if r["strength"] == 0)
    for r in rows:
        d = [a - b for a, b in zip(r["scores"], base["scores"])]
        mean = sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else 0.0
        r["vader_shift"] = mean
        r["vader_shift_se"] = sd / math.sqrt(len(d))  # paired: same contexts and seeds
        r["ppl_ratio"] = r["ppl"] / base["ppl"]
    return rows


def recommend(rows: list[dict], max_ppl_ratio: float) -> dict | None:
    ok = [r for r in rows if r["strength"] != 0 and r["ppl_ratio"] <= max_ppl_ratio]
    return max(ok, key=lambda r: r["vader_shift"]) if ok else None


def plot(rows: list[dict], path: Path, title: str, max_ppl_ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from convsim.fsutil import atomic_path

    xs = [r["strength"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(
        xs,
        [r["vader_shift"] for r in rows],
        yerr=[r["vader_shift_se"] for r in rows],
        marker="o",
        color="tab:blue",
        capsize=3,
        label="effect: VADER shift of sampled replies",
    )
    ax.axhline(0, color="tab:blue", lw=0.5, ls=":")
    ax.set_xlabel("steering strength")
    ax.set_ylabel("mean VADER compound shift vs strength 0", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(
        xs,
        [r["ppl_ratio"] for r in rows],
        marker="s",
        color="tab:red",
        label="cost: perplexity of real replies (ratio)",
    )
    ax2.axhline(max_ppl_ratio, color="tab:red", lw=0.8, ls="--")
    ax2.set_ylabel("held-out perplexity / unsteered", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, private=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def sweep(args) -> int:
    from convsim.data.examples import build_examples
    from convsim.fsutil import private_dir, write_json
    from convsim.runs import open_run
    from convsim.steering.vectors import SteeringVector, resolve_layers

    run_ = open_run(args.run_dir)
    vector = SteeringVector.load(args.vector)
    strengths = sorted(set(parse_numbers(args.strengths, "--strengths")) | {0.0})
    if args.n < 1 or args.samples < 1:
        raise UserError("--n and --samples must be at least 1")
    targets = [run_.check_person(args.speaker)] if args.speaker else run_.people
    meta = run_.meta
    examples = build_examples(run_.split("test"), targets, meta.context_size, meta.max_burst)
    if not examples:
        raise UserError(f"the run's test split has no examples for {', '.join(targets)}")
    examples = pick(examples, args.n)
    out = Path(args.out) if args.out else Path(args.vector).with_name(Path(args.vector).stem + "-sweep")
    model, tok = run_.load()
    vector.check_fits(model)
    layers = resolve_layers(parse_numbers(args.layers, "--layers", int), vector.num_layers) if args.layers else None
    t0 = time.time()
    rows = measure(
        model,
        tok,
        run_.fmt,
        vector,
        examples,
        strengths,
        layers,
        args.positions,
        args.temperature,
        args.top_p,
        args.max_new_tokens,
        args.seed,
        args.samples,
    )
    best = recommend(rows, args.max_ppl_ratio)
    applied = layers or vector.layers
    result = {
        "run": str(args.run_dir),
        "model": run_.model_name,
        "adapter": run_.adapter_hash,
        "vector": str(args.vector),
        "vector_method": vector.method,
        "vector_layers": vector.layers,
        "layers": applied,
        "positions": args.positions,
        "n": len(examples),
        "samples_per_context": args.samples,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "seconds": round(time.time() - t0, 1),
        "max_ppl_ratio": args.max_ppl_ratio,
        "recommended": None
        if best is None
        else {k: best[k] for k in ("strength", "vader_shift", "vader_shift_se", "ppl_ratio")},
        "strengths": [{k: v for k, v in r.items() if k not in ("scores", "replies")} for r in rows],
        "samples": [
            {
                "context": [f"[{m.speaker}] {m.text}" for m in e.context[-2:]],
                "speaker": e.speaker,
                "real": [m.text for m in e.reply],
                "replies": {str(r["strength"]): r["replies"][i * args.samples : (i + 1) * args.samples] for r in rows},
            }
            for i, e in enumerate(examples)
        ],
    }
    private_dir(out)
    write_json(out / "sweep.json", result)  # holds replies to private contexts: owner-only
    plot(
        rows,
        out / "sweep.png",
        f"{Path(args.vector).name} on {run_.model_name}: layers {applied}, "
        f"positions {args.positions}, n={len(examples)}",
        args.max_ppl_ratio,
    )
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"} | {"out": str(out)}))
        return 0
    print(f"{'strength':>9}{'VADER':>8}{'shift':>8}{'±se':>7}{'ppl':>9}{'ratio':>7}{'empty':>7}")
    for r in rows:
        print(
            f"{r['strength']:>9g}{r['vader']:>8.3f}{r['vader_shift']:>+8.3f}{r['vader_shift_se']:>7.3f}"
            f"{r['ppl']:>9.2f}{r['ppl_ratio']:>7.3f}{r['empty_replies']:>7d}"
        )
    if best:
        print(
            f"recommended: strength {best['strength']:g} (shift {best['vader_shift']:+.3f}, "
            f"perplexity x{best['ppl_ratio']:.3f})"
        )
    else:
        print(f"no strength kept perplexity within x{args.max_ppl_ratio:g}")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0

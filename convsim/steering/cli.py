"""`convsim steer`: build steering vectors for a run, and sweep their strength to see what they do.

    convsim steer build runs/me --phrases examples/steer-happy.yaml --out happy.safetensors
    convsim steer build runs/me --from-data sentiment --speaker Ana --out ana-happy.safetensors
    convsim steer sweep runs/me happy.safetensors --strengths 0,4,8,12 --n 24 --samples 3 --out sweeps/happy

The sweep measures, for held-out test contexts of the run, the effect (mean VADER compound score of
replies sampled under steering, same contexts and seeds at every strength) against the cost (perplexity
of the real held-out replies under the same steering, scored on the reply's text tokens only), writes
sweep.json and draws the dose-response curve as sweep.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from convsim.errors import UserError, brief
from convsim.modeling.loss import reply_nll

HELP = "Build steering vectors (phrases, contrastive pairs, a person's own messages) and sweep their strength."
EXAMPLES = """
  convsim steer build runs/me --phrases examples/steer-happy.yaml --out happy.safetensors
  convsim steer build runs/me --pairs pairs.yaml --method pca --layer -6 --out calm.safetensors
  convsim steer build runs/me --from-data sentiment --speaker Ana --out ana-happy.safetensors
  convsim steer build runs/me --from-data speakers --speaker Ana --out more-ana.safetensors
  convsim steer sweep runs/me happy.safetensors --strengths 0,4,8,12 --n 24 --samples 3 --out sweeps/happy
  convsim chat runs/me --as Ana --steer happy.safetensors:8          # then use it (decode steps, as swept)

Strength multiplies the vector as built; what matters is strength x |vector| against the residual
stream (`build` prints the norm and suggests strengths). On Gemma 3 270M fine-tuned on a chat, a vector from
the run's own 256 most positive vs negative messages at layer 16 of 18 (`--from-data sentiment --layer 16
--k 256`), applied at all positions, moved VADER sentiment clearly at a small perplexity cost at
strengths 2 to 2.5 (bench/results/steering.json has the sweep).
Lists of negative layers: --layer=-6,-5.
"""


# ----------------------------------------------------------------------------- files


@dataclass
class PhraseSet:
    """A `--phrases` YAML file: phrase -> signed weight, and how to build from them. A YAML file that is
    only a mapping of phrase -> number means `phrases:` with the defaults below."""

    phrases: dict[str, float] = field(default_factory=dict)
    pos_alpha: float = 1.0
    neg_alpha: float = 1.0
    layer: int | list[int] = -5
    pool: str = "mean"
    speaker: str | None = None  # prefix each phrase with this speaker's token


def load_phrase_set(path) -> PhraseSet:
    import yaml
    from convsim.config import safe_yaml, yaml_problem
    from convsim.fsutil import read_user_text

    p = Path(path)
    text = read_user_text(p, "phrases file", max_bytes=8 << 20)
    try:
        data = safe_yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date-like scalar such as 2024-13-45
        raise UserError(f"{p}: not valid YAML ({yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"{p}: YAML nested too deeply") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{p}: expected a mapping (phrases: {{phrase: weight}})")
    if "phrases" not in data and all(isinstance(v, (int, float)) for v in data.values()):
        data = {"phrases": data}
    unknown = sorted(str(k) for k in data if k not in {f.name for f in fields(PhraseSet)})
    if unknown:
        raise UserError(f"{p}: unknown setting(s) {', '.join(unknown)}")
    ps = PhraseSet(**data)
    if not isinstance(ps.phrases, dict) or not ps.phrases:
        raise UserError(f"{p}: `phrases` must map each phrase to a signed weight")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for k, v in ps.phrases.items():
        if not number(v):
            raise UserError(f"{p}: the weight of {brief(k)} must be a finite number, not {brief(v)}")
    for name in ("pos_alpha", "neg_alpha"):
        if not number(getattr(ps, name)):
            raise UserError(f"{p}: {name} must be a finite number, not {brief(getattr(ps, name))}")
    layers = ps.layer if isinstance(ps.layer, list) else [ps.layer]
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise UserError(f"{p}: layer must be an integer or a list of integers, not {brief(ps.layer)}")
    if ps.speaker is not None and not isinstance(ps.speaker, str):
        raise UserError(f"{p}: speaker must be a name, not {brief(ps.speaker)}")
    if ps.pool not in ("mean", "last"):
        raise UserError(f"{p}: pool must be mean or last, not {ps.pool!r}")
    ps.phrases = {str(k): float(v) for k, v in ps.phrases.items()}
    return ps


def load_pairs(path) -> list[tuple[str, str]]:
    """YAML/JSON list of [toward, away] pairs or {positive, negative} objects; or JSONL of such objects."""
    import yaml
    from convsim.config import safe_yaml, yaml_problem
    from convsim.fsutil import read_user_text

    p = Path(path)
    text = read_user_text(p, "pairs file", max_bytes=8 << 20)
    try:
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = safe_yaml(text)
    except (ValueError, yaml.YAMLError) as e:
        raise UserError(f"{p}: cannot read ({yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"{p}: nested too deeply") from None
    if isinstance(rows, dict) and "pairs" in rows:
        rows = rows["pairs"]
    out = []
    text_like = lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)  # noqa: E731
    for i, r in enumerate(rows if isinstance(rows, list) else [None], 1):
        if (
            isinstance(r, dict)
            and "positive" in r
            and "negative" in r
            and text_like(r["positive"])
            and text_like(r["negative"])
        ):
            out.append((str(r["positive"]), str(r["negative"])))
        elif isinstance(r, (list, tuple)) and len(r) == 2 and text_like(r[0]) and text_like(r[1]):
            out.append((str(r[0]), str(r[1])))
        else:
            raise UserError(f"{p}: pair {i} must be [toward, away] or {{positive: ..., negative: ...}}")
    if not out:
        raise UserError(f"{p}: no pairs")
    return out


def parse_numbers(text: str, what: str, cast=float) -> list:
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of numbers, not {text!r}") from None


# ----------------------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="build|sweep")
    b = sub.add_parser(
        "build",
        help="build a steering vector for a run",
        description=(
            "Build a steering vector from weighted phrases, contrastive pairs, or the run's own training "
            "messages (most positive vs most negative by VADER, or one speaker vs another)."
        ),
    )
    b.add_argument("run_dir")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--phrases", metavar="FILE.yaml", help="phrase -> signed weight (see examples/steer-happy.yaml)")
    src.add_argument("--pairs", metavar="FILE", help="contrastive pairs: YAML/JSON list of [toward, away], or JSONL")
    src.add_argument(
        "--from-data",
        choices=["sentiment", "speakers"],
        help="the run's training messages: positive vs negative, or --speaker vs the others",
    )
    b.add_argument("--out", required=True, metavar="VECTOR", help="file to write (.safetensors)")
    b.add_argument("--layer", help="decoder layer(s), comma-separated; negative counts from the last (default -5)")
    b.add_argument("--pool", choices=["mean", "last"], help="pool a text's tokens by mean (default) or last")
    b.add_argument(
        "--speaker",
        help="phrases/pairs: prefix with this speaker's token; sentiment: only their "
        "messages; speakers: the person to steer toward (default: first target)",
    )
    b.add_argument("--method", choices=["mean", "pca"], default="mean", help="pairs: mean difference or PCA")
    b.add_argument("--k", type=int, default=None, help="from-data: messages per side (sentiment 64, speakers 256)")
    b.add_argument(
        "--normalize",
        type=float,
        metavar="FRACTION",
        help="rescale each layer's direction to FRACTION of that layer's residual norm (e.g. 0.02 "
        "for a multi-layer vector), so strength 1 adds that fraction at every layer",
    )
    b.add_argument("--json", action="store_true")

    s = sub.add_parser(
        "sweep",
        help="measure effect (VADER) and cost (perplexity) against strength",
        description=(
            "Sample replies for held-out test contexts at each strength and score their VADER compound "
            "sentiment; score the real held-out replies' perplexity under the same steering. Writes "
            "sweep.json and sweep.png to --out."
        ),
    )
    s.add_argument("run_dir")
    s.add_argument("vector")
    s.add_argument("--strengths", default="0,2,4,8", help="comma-separated; 0 (the baseline) is always added")
    s.add_argument("--n", type=int, default=20, help="held-out contexts (default 20)")
    s.add_argument("--samples", type=int, default=1, help="replies sampled per context, in one batch (default 1)")
    s.add_argument("--layers", help="apply at these layers instead of the vector's own (comma-separated)")
    s.add_argument(
        "--positions",
        choices=["all", "new"],
        default="new",
        help="steer decode steps only (new, default: the seed's, and what --steer does) or prompt too (all)",
    )
    s.add_argument("--speaker", help="only contexts where this person replies (default: the run's targets)")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--max-ppl-ratio",
        type=float,
        default=1.2,
        help="the recommended strength is the largest effect with perplexity within this ratio",
    )
    s.add_argument("--out", help="directory for sweep.json and sweep.png (default: VECTOR's name + -sweep)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    return build(args) if args.action == "build" else sweep(args)


# ----------------------------------------------------------------------------- build


def build(args) -> int:
    from convsim.steering import vectors as st
    from convsim.runs import open_run

    run_ = open_run(args.run_dir)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'vector.safetensors'}")
    layer = parse_numbers(args.layer, "--layer", int) if args.layer else None
    ps = load_phrase_set(args.phrases) if args.phrases else None
    pairs = load_pairs(args.pairs) if args.pairs else None
    if args.k is not None and args.k < 2:
        raise UserError("--k must be at least 2")
    if args.speaker and not (ps and ps.speaker == args.speaker):
        run_.check_speaker(args.speaker)
    model, tok = run_.load()
    fmt = run_.fmt
    meta = dict(base_model=run_.model_name, adapter_hash=run_.adapter_hash)
    t0 = time.time()
    if ps is not None:
        speaker = args.speaker or ps.speaker
        v = st.from_phrases(
            model,
            tok,
            ps.phrases,
            layer if layer is not None else ps.layer,
            ps.pos_alpha,
            ps.neg_alpha,
            args.pool or ps.pool,
            st.speaker_prefix(tok, fmt, speaker),
            **meta,
        )
        v.info["speaker"] = speaker
    elif pairs is not None:
        v = st.from_pairs(
            model,
            tok,
            pairs,
            layer if layer is not None else -5,
            args.method,
            args.pool or "mean",
            st.speaker_prefix(tok, fmt, args.speaker),
            **meta,
        )
    else:
        messages = [m for c in run_.split("train") for m in c.messages]
        if args.from_data == "sentiment":
            if args.speaker:
                messages = [m for m in messages if m.speaker == args.speaker]
            v = st.from_sentiment(
                model, tok, fmt, messages, args.k or 64, layer if layer is not None else -5, args.pool or "mean", **meta
            )
        else:
            toward = args.speaker or run_.targets[0]
            v = st.from_speakers(
                model,
                tok,
                fmt,
                messages,
                toward,
                run_.other_speaker(toward),
                args.k or 256,
                layer if layer is not None else -5,
                args.pool or "mean",
                **meta,
            )
    if getattr(args, "normalize", None) is not None:
        v = v.normalized(args.normalize)
    v.save(out)
    grid = ",".join(f"{x:g}" for x in [0.0] + st.suggest_strengths(v))
    summary = {
        "vector": str(out),
        "method": v.method,
        "layers": v.layers,
        "suggested_strengths": grid,
        "norms": {str(k): round(n, 4) for k, n in v.norms().items()},
        "model": v.base_model,
        "adapter": v.adapter_hash,
        "seconds": round(time.time() - t0, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        norms = ", ".join(f"layer {k}: {n:.3g}" for k, n in v.norms().items())
        print(f"wrote {out} ({v.method}; {norms})")
        print(
            f"next: convsim steer sweep {args.run_dir} {out} --strengths {grid}   "
            "(2.5-15% of the residual stream's norm)"
        )
    return 0


# ----------------------------------------------------------------------------- sweep


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
    from convsim.steering.vectors import steer, vader

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
    targets = [run_.check_speaker(args.speaker)] if args.speaker else run_.targets
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

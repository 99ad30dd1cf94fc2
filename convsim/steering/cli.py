"""`convsim steer`: build steering vectors for a run, sweep their strength to see what they do, and export
them for other engines.

    convsim steer build runs/me --phrases examples/steer-happy.yaml --out happy.safetensors
    convsim steer build runs/me --from-data sentiment --speaker Ana --out ana-happy.safetensors
    convsim steer sweep runs/me happy.safetensors --strengths 0,4,8,12 --n 24 --samples 3 --out sweeps/happy
    convsim steer export happy.safetensors --format gguf --out happy.gguf    # llama.cpp control vector

The sweep measures, for held-out test contexts of the run, the effect (mean VADER compound score of
replies sampled under steering, same contexts and seeds at every strength) against the cost (perplexity
of the real held-out replies under the same steering, scored on the reply's text tokens only), writes
sweep.json and draws the dose-response curve as sweep.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from convsim.errors import UserError
from convsim.steering.files import load_pairs, load_phrase_set, parse_numbers
from convsim.steering.sweep import sweep

HELP = (
    "Build steering vectors (phrases, contrastive pairs, a person's own messages), sweep their strength, "
    "export them for llama.cpp."
)
EXAMPLES = """
  convsim steer build runs/me --phrases examples/steer-happy.yaml --out happy.safetensors
  convsim steer build runs/me --pairs pairs.yaml --method pca --layer -6 --out calm.safetensors
  convsim steer build runs/me --from-data sentiment --speaker Ana --out ana-happy.safetensors
  convsim steer build runs/me --from-data speakers --speaker Ana --out more-ana.safetensors
  convsim steer sweep runs/me happy.safetensors --strengths 0,4,8,12 --n 24 --samples 3 --out sweeps/happy
  convsim chat runs/me --as Ana --steer happy.safetensors:8          # then use it (decode steps, as swept)
  convsim steer export happy.safetensors --format gguf --out happy.gguf
  llama-cli -m exports/ana/model.gguf --control-vector-scaled happy.gguf 8    # scale = convsim's strength

Strength multiplies the vector as built; what matters is strength x |vector| against the residual
stream (`build` prints the norm and suggests strengths). On Gemma 3 270M fine-tuned on a chat, a vector from
the run's own 256 most positive vs negative messages at layer 16 of 18 (`--from-data sentiment --layer 16
--k 256`), applied at all positions, moved VADER sentiment clearly at a small perplexity cost at
strengths 2 to 2.5 (bench/results/steering.json has the sweep).
Lists of negative layers: --layer=-6,-5.
"""


# ----------------------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="build|sweep|export")
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

    e = sub.add_parser(
        "export",
        help="write a steering vector for another engine (llama.cpp's control-vector GGUF)",
        description=(
            "Write VECTOR as the control-vector GGUF llama.cpp reads with --control-vector-scaled FILE SCALE: "
            "convsim's layer k becomes direction.k (both steer the output of that decoder layer), and "
            "SCALE means the same as convsim's strength. llama.cpp steers every position, like "
            "`steer sweep --positions all`."
        ),
    )
    e.add_argument("vector", help="a convsim steering vector (.safetensors)")
    e.add_argument("--format", default="gguf", help="gguf (llama.cpp control vector; the only one so far)")
    e.add_argument("--out", required=True, metavar="FILE", help="file to write; must not exist")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    return {"build": build, "sweep": sweep, "export": export}[args.action](args)


# ----------------------------------------------------------------------------- export


def export(args) -> int:
    from convsim.steering.llamacpp import export_vector

    summary = export_vector(args.vector, args.format, args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {summary['out']} ({', '.join(summary['llama_cpp_layers'])}; for {summary['model']}); use it with: "
            f"llama-cli -m MODEL.gguf --control-vector-scaled {summary['out']} STRENGTH"
        )
    return 0


# ----------------------------------------------------------------------------- build


def build(args) -> int:
    from convsim.steering import build as st
    from convsim.steering.vectors import suggest_strengths
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
        run_.check_person(args.speaker)
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
    grid = ",".join(f"{x:g}" for x in [0.0] + suggest_strengths(v))
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

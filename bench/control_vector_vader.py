"""A steering vector as a llama.cpp control vector moves the sentiment of replies as convsim's own steering does.

    CONVSIM_LLAMA_CLI=path/to/llama-cli python bench/control_vector_vader.py --run runs/me
    python bench/control_vector_vader.py --run runs/me --strengths -4,0,4 --n 16 --tokens 32 --no-save

Builds a happy-minus-sad vector on the run (`convsim steer build RUN --phrases examples/steer-happy.yaml`),
exports it (`convsim steer export --format gguf`) and the run (`convsim export --format gguf`, f16), then for
--n held-out contexts of the run's test split (spread over the split) and each strength S generates one greedy
reply of at most --tokens tokens twice: with `llama-cli --control-vector-scaled VECTOR S` on the exported file,
and with convsim's `steer(model, vector, S, positions="all")` on the fp32 run (what llama.cpp's scale S is, see
docs/EXPORT.md). Both stop at another speaker's token or end of sequence; the person's own tokens inside a
burst become spaces. Each reply is scored with VADER's compound score (the scorer `convsim steer sweep` uses);
the result is the mean per strength and engine, its shift from strength 0, and how many replies the two
engines wrote identically. Writes bench/results/control-vector-vader.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from export_gguf import machine  # bench/ is on the path when a bench script runs

from convsim.data.examples import build_examples, render
from convsim.export.hf import stop_ids
from convsim.runs import open_run
from convsim.steering.apply import steer
from convsim.steering.build import vader
from convsim.steering.sweep import pick
from convsim.steering.vectors import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "control-vector-vader.json"


def llama_reply(cli: str, model: Path, prompt: str, others: list[str], n: int, threads: int, cvec=None) -> str:
    """llama-cli's greedy continuation of `prompt` (it adds bos), stopped at another speaker's token."""
    args = [cli, "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1", "-no-cnv"]
    args += ["--no-display-prompt", "--no-warmup", "--no-escape", "-c", "1024", "-t", str(threads), "--seed", "0"]
    for o in others:
        args += ["-r", o]
    if cvec is not None:
        args += ["--control-vector-scaled", str(cvec[0]), f"{cvec[1]:g}"]
    p = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"llama-cli failed: {p.stderr[-2000:]}")
    return p.stdout.split(" [end of text]")[0]  # what llama-cli prints at end of sequence


def convsim_reply(model, tok, ids: list[int], stops: list[int], n: int) -> str:
    """convsim's greedy continuation of `ids`, stopped at the same tokens, as text (speaker tokens kept)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
            temperature=None, top_p=None, top_k=None, eos_token_id=stops, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    return tok.decode(new, skip_special_tokens=False)


def burst_text(text: str, speaker: str, others: list[str]) -> str:
    """The reply burst as one text: cut at another speaker's token, the person's own tokens as spaces."""
    for o in others:
        text = text.split(o)[0]
    return " ".join(text.replace(f"[{speaker}]", " ").split())


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd / math.sqrt(len(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--phrases", default=str(ROOT / "examples" / "steer-happy.yaml"))
    ap.add_argument("--strengths", default="-4,0,4", help="comma-separated; must hold 0 (default -4,0,4)")
    ap.add_argument("--n", type=int, default=16, help="held-out contexts (default 16)")
    ap.add_argument("--tokens", type=int, default=32, help="most tokens per reply (default 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cli", default=os.environ.get("CONVSIM_LLAMA_CLI", ""))
    ap.add_argument("--note", default="")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    strengths = [float(x) for x in args.strengths.split(",")]
    if 0.0 not in strengths or not (args.llama_cli and os.access(args.llama_cli, os.X_OK)):
        sys.exit("need 0 among --strengths and a llama-cli binary (--llama-cli or CONVSIM_LLAMA_CLI)")

    from convsim.cli import main as convsim

    t0 = time.time()
    run = open_run(args.run)
    fmt, meta = run.fmt, run.meta
    examples = pick(build_examples(run.split("test"), run.targets, meta.context_size, meta.max_burst), args.n)
    an = vader()
    with tempfile.TemporaryDirectory() as tmp:
        vec, cvec, gg = Path(tmp) / "happy.safetensors", Path(tmp) / "happy.gguf", Path(tmp) / "gguf"
        assert convsim(["steer", "build", args.run, "--phrases", args.phrases, "--out", str(vec)]) == 0
        assert convsim(["steer", "export", str(vec), "--format", "gguf", "--out", str(cvec)]) == 0
        assert convsim(["export", args.run, "--format", "gguf", "--out", str(gg)]) == 0
        v = SteeringVector.load(vec)
        model, tok = run.load(device="cpu", dtype=torch.float32)
        model.eval()

        import llama_cpp

        vocab = llama_cpp.Llama(str(gg / "model.gguf"), vocab_only=True, verbose=False)
        rows = {"llama.cpp": {s: [] for s in strengths}, "convsim": {s: [] for s in strengths}}
        same_prompt_ids = 0
        for e in examples:
            ids = render(tok, fmt, e.context, e.speaker).input_ids
            prompt = "".join(f"[{m.speaker}] {m.text}\n" for m in e.context) + f"[{e.speaker}]"
            same_prompt_ids += vocab.tokenize(prompt.encode(), add_bos=True, special=False) == ids
            others = [f"[{s}]" for s in fmt.speakers if s != e.speaker]
            stops = stop_ids(tok, fmt, e.speaker)
            for s in strengths:
                cv = (cvec, s) if s != 0 else None
                text = llama_reply(args.llama_cli, gg / "model.gguf", prompt, others, args.tokens, args.threads, cv)
                rows["llama.cpp"][s].append(burst_text(text, e.speaker, others))
                with steer(model, v, s, positions="all"):
                    text = convsim_reply(model, tok, ids, stops, args.tokens)
                rows["convsim"][s].append(burst_text(text, e.speaker, others))
            print(f"{len(rows['convsim'][0.0])}/{len(examples)} contexts, {time.time() - t0:.0f} s", file=sys.stderr)
        vocab.close()

    engines = {}
    for name, by_s in rows.items():
        scores = {s: [an.polarity_scores(t)["compound"] if t else 0.0 for t in texts] for s, texts in by_s.items()}
        per = {}
        for s in strengths:
            m, se = mean_se(scores[s])
            d_m, d_se = mean_se([a - b for a, b in zip(scores[s], scores[0.0])])  # paired: same contexts
            per[f"{s:g}"] = {
                "vader_mean": round(m, 4),
                "vader_se": round(se, 4),
                "shift_vs_0": round(d_m, 4),
                "shift_se": round(d_se, 4),
                "empty_replies": sum(1 for t in by_s[s] if not t),
                "replies": by_s[s],
            }
        engines[name] = per
    identical = {f"{s:g}": sum(a == b for a, b in zip(rows["llama.cpp"][s], rows["convsim"][s])) for s in strengths}
    signs = {f"{s:g}": [math.copysign(1, engines[e][f"{s:g}"]["shift_vs_0"]) for e in engines] for s in strengths if s}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "model": run.model_name,
        "commit": commit,
        "command": " ".join(["python", *sys.argv]),
        "run": {"steps": meta.get("global_step"), "speakers": list(fmt.speakers)},
        "vector": {"phrases": Path(args.phrases).name, "layers": v.layers, "positions": "all"},
        "contexts": len(examples),
        "max_new_tokens": args.tokens,
        "decoding": "greedy, stopped at another speaker's token or end of sequence",
        "scorer": "vaderSentiment compound of the reply burst",
        "strengths": strengths,
        "engines": engines,
        "identical_replies": identical,
        "prompt_ids_equal_in_llama_cpp": same_prompt_ids,
        "same_direction": all(len(set(x)) == 1 for x in signs.values()),
        "machine": machine(),
        "seconds": round(time.time() - t0, 1),
    }
    if args.note:
        result["note"] = args.note
    summary = {e: {s: r["vader_mean"] for s, r in per.items()} for e, per in engines.items()}
    print(json.dumps({"vader_mean": summary, "identical_replies": identical}, indent=2))
    if not args.no_save:
        OUT.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

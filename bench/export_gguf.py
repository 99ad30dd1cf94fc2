"""The GGUF export in llama.cpp: file size, perplexity of held-out replies and greedy agreement, per format.

    python bench/export_gguf.py --run runs/me              # needs the gguf-runtime extra (llama-cpp-python)
    python bench/export_gguf.py --run runs/me --n 20 --no-save

For each of f16, q8_0 and q4_k_m (--quants): `convsim export RUN --format gguf` into a temporary directory, load
the file with llama-cpp-python, and measure on up to --n held-out replies (the run's test split, then val, targets only):
the perplexity of the reply tokens given the prompt (the same tokens and the same reply-only mask convsim's
training loss uses), its ratio to the run's own fp32 perplexity (base + adapter in transformers), how many of
the first 32 greedy tokens of a probe prompt match convsim's fp32 greedy tokens (no stops), whether every
speaker token is one token in llama.cpp, and whether generation with `stop=["[Other]"]` ends where the other
speaker's token comes. Writes bench/results/export-gguf.json, with the machine it ran on and --note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from convsim.data.examples import build_examples, render, render_example
from convsim.data.schema import Message
from convsim.export.gguf_file import llama_greedy
from convsim.inference.generate import greedy_ids
from convsim.runs import open_run

OUT = Path(__file__).parent / "results" / "export-gguf.json"
N_GREEDY = 32
PROBE = ["hey how are you", "Not bad. Working late again.", "lol yes", "Maybe tomorrow then."]
QUANTS = ("f16", "q8_0", "q4_k_m")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reply_nll(logits: np.ndarray, ids: list[int], loss: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the tokens with loss 1, each predicted from the position before."""
    lp = log_softmax(logits)
    pos = [t for t in range(1, len(ids)) if loss[t]]
    return -sum(lp[t - 1, ids[t]] for t in pos), len(pos)


def leading_match(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    cpu = names[0] if names else (platform.processor() or platform.machine())
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=50, help="held-out replies (default 50)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quants", default=",".join(QUANTS), help=f"comma-separated (default {','.join(QUANTS)})")
    ap.add_argument("--note", default="", help="a sentence stored with the result (the run, the machine's load)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import llama_cpp

    from convsim.cli import main as convsim

    run = open_run(args.run)
    fmt, meta = run.fmt, run.meta
    model, tok = run.load(device="cpu", dtype=torch.float32)
    model.eval()
    held = build_examples(run.split("test") + run.split("val"), run.targets, meta.context_size, meta.max_burst)
    held = held[: args.n]
    rendered = [render_example(tok, fmt, ex) for ex in held]

    t0 = time.time()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for r in rendered:
            logits = model(input_ids=torch.tensor([r.input_ids])).logits[0].float().numpy()
            a, b = reply_nll(logits, r.input_ids, r.loss_mask)
            nll, count = nll + a, count + b
    fp32_ppl = math.exp(nll / count)

    speakers = list(fmt.speakers)
    persona, other = speakers[0], speakers[1 % len(speakers)]
    history = [Message(speakers[(i + 1) % len(speakers)], t) for i, t in enumerate(PROBE)]
    probe = render(tok, fmt, history, persona).input_ids
    want = greedy_ids(model, probe, N_GREEDY)
    other_id = tok.convert_tokens_to_ids(f"[{other}]")

    formats, singles, stops = {}, [], []
    n_ctx = max(len(r.input_ids) for r in rendered + [render(tok, fmt, history, persona)]) + 128
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            out = Path(tmp) / quant
            rc = convsim(["export", args.run, "--format", "gguf", "--out", str(out), "--quant", quant, "--as", persona])
            assert rc == 0, f"export {quant} failed"
            path = out / "model.gguf"
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=args.threads, logits_all=True, verbose=False)
            singles.append(
                all(
                    llm.tokenize(f"[{s}]".encode(), add_bos=False, special=False)
                    == [tok.convert_tokens_to_ids(f"[{s}]")]
                    for s in speakers
                )
            )
            q_nll, q_count = 0.0, 0
            for r in rendered:
                llm.reset()
                llm.eval(r.input_ids)
                a, b = reply_nll(np.array(llm.scores[: len(r.input_ids)]), r.input_ids, r.loss_mask)
                q_nll, q_count = q_nll + a, q_count + b
            ppl = math.exp(q_nll / q_count)
            got = llama_greedy(llm, probe, N_GREEDY)
            seq = llama_greedy(llm, probe, 96)
            if other_id in seq:
                llm.reset()
                res = llm.create_completion(probe, max_tokens=96, temperature=0.0, stop=[f"[{other}]"])["choices"][0]
                cut = seq.index(other_id)
                stops.append(
                    res["finish_reason"] == "stop"
                    and res["text"] == llm.detokenize(seq[:cut]).decode("utf-8", errors="replace")
                )
            else:
                stops.append(None)  # the model did not hand over within 96 tokens: nothing to stop at
            formats[quant] = {
                "bytes": path.stat().st_size,
                "ppl": round(ppl, 4),
                "ppl_ratio_vs_fp32": round(ppl / fp32_ppl, 4),
                "greedy_match_tokens": leading_match(got, want),
            }
            llm.close()

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "model": run.model_name,
        "commit": commit,
        "command": " ".join(["python", *sys.argv]),
        "run": {"steps": meta.get("global_step"), "speakers": speakers},
        "held_out_replies": len(held),
        "reply_tokens": count,
        "fp32_ppl": round(fp32_ppl, 4),
        "greedy_tokens_compared": N_GREEDY,
        "formats": formats,
        "speaker_tokens_single": all(singles),
        "stops_at_speaker": None if None in stops else all(stops),
        "llama_cpp_python": llama_cpp.__version__,
        "machine": machine(),
        "seconds": round(time.time() - t0, 1),
    }
    if args.note:
        result["note"] = args.note
    print(json.dumps(result, indent=2))
    if not args.no_save:
        OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

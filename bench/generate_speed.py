"""Generation speed: convsim's generation path against plain `generate`, side by side on one device.

- batch 1, greedy, a fixed number of new tokens (stopping disabled so both make the same count):
  plain `model.generate` vs `convsim.inference.fastgen.generate` (static cache reused across calls, compiled decode
  step replayed as a CUDA graph); medians over repeats after warm-up; the greedy tokens are compared.
- time to first token and tokens/s of a chat reply through `convsim.inference.generate.stream_reply` (the path
  `convsim chat --stream` uses), fast path on and off.
- batched reply throughput: `convsim.inference.generate.replies_from_prompts` (the path `convsim eval` uses).

    python bench/generate_speed.py --run RUN_DIR --out gen.json          # a trained run (adapter applied)
    python bench/generate_speed.py --model gemma-3-270m --out gen.json   # the base model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out")
    a = ap.parse_args()
    from convsim.inference import fastgen
    from convsim.data.examples import PromptFormat, build_examples
    from convsim.inference.generate import SampleConfig, prompt_ids, replies_from_prompts, stream_reply

    if a.run:
        from convsim.runs import open_run

        run = open_run(a.run)
        model, tok = run.load()
        fmt = run.fmt
        exs = build_examples(run.split("test"), run.targets, 8, 8)
    else:
        from convsim.modeling.models import load

        model, tok = load(a.model)
        fmt = PromptFormat(style="base", speakers=("Ana", "Ben"), special_tokens=False)
        from convsim.data.schema import Message

        hist = [
            Message("Ana" if i % 2 else "Ben", t, None)
            for i, t in enumerate(["hey", "how was the trip?", "long but fun", "did you see the lake?"])
        ]
        exs = [type("E", (), {"context": hist, "speaker": "Ana"})()]
    model.eval()
    dev = next(model.parameters()).device
    card = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU x{os.cpu_count()}"
    e = exs[0]
    ids = prompt_ids(tok, fmt, e.context, e.speaker, 1024)
    x = torch.tensor([ids], device=dev)
    kw = dict(
        attention_mask=torch.ones_like(x),
        max_new_tokens=a.new_tokens,
        min_new_tokens=a.new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
    )
    res = {"card": card, "prompt_tokens": len(ids), "new_tokens": a.new_tokens, "torch": torch.__version__}

    with torch.inference_mode():
        plain_out, _ = timed(lambda: model.generate(input_ids=x, **kw), 1)  # warm-up
        plain_out, plain_s = timed(lambda: model.generate(input_ids=x, **kw), a.repeats)
        t = time.perf_counter()
        fast_out, _ = timed(lambda: fastgen.generate(model, x, **kw), 2)  # compiles
        res["fast_warmup_s"] = round(time.perf_counter() - t, 1)
        fast_out, fast_s = timed(lambda: fastgen.generate(model, x, **kw), a.repeats)
    res["fast_path_active"] = fastgen.enabled(model) and not fastgen._broken
    res["fast_path_error"] = fastgen._broken[0][:300] if fastgen._broken else None
    p, f = plain_out[0, len(ids) :].tolist(), fast_out[0, len(ids) :].tolist()
    same = next((i for i, (u, v) in enumerate(zip(p, f)) if u != v), len(p))
    res.update(
        plain_tokens_per_s=a.new_tokens / plain_s,
        fast_tokens_per_s=a.new_tokens / fast_s,
        speedup=plain_s / fast_s,
        greedy_tokens_identical_prefix=same,
    )
    print(
        f"batch 1: plain {res['plain_tokens_per_s']:.1f} tok/s, fast {res['fast_tokens_per_s']:.1f} tok/s "
        f"(x{res['speedup']:.2f}); greedy identical for {same}/{a.new_tokens} tokens",
        flush=True,
    )

    # the chat path: time to first token and tokens/s, streaming
    def chat_once(fast: bool):
        os.environ["CONVSIM_FAST_GENERATE"] = "1" if fast else "0"
        cfg = SampleConfig(temperature=0.0, max_new_tokens=64)
        t0 = time.perf_counter()
        first = None
        n = 0
        for _, delta in stream_reply(model, tok, fmt, e.context, e.speaker, cfg):
            if first is None:
                first = time.perf_counter() - t0
            n += 1
        return first, time.perf_counter() - t0

    for fast in (False, True):
        chat_once(fast)
        runs = [chat_once(fast) for _ in range(a.repeats)]
        res[f"chat_{'fast' if fast else 'plain'}"] = {
            "ttft_s_median": statistics.median(r[0] for r in runs if r[0] is not None),
            "reply_s_median": statistics.median(r[1] for r in runs),
        }
    os.environ["CONVSIM_FAST_GENERATE"] = "1"
    print("chat:", res["chat_plain"], res["chat_fast"], flush=True)

    # batched replies (eval's path)
    prompts = [prompt_ids(tok, fmt, ex.context, ex.speaker, 1024) for ex in exs[: a.batch * 2]]
    if len(prompts) >= 2:
        spk = exs[0].speaker
        prompts = [prompt_ids(tok, fmt, ex.context, spk, 1024) for ex in exs[: a.batch * 2]]
        cfg = SampleConfig(temperature=0.0, max_new_tokens=48)
        sync()
        t = time.perf_counter()
        outs = replies_from_prompts(model, tok, fmt, prompts, spk, cfg, batch_size=a.batch)
        sync()
        dt = time.perf_counter() - t
        words = sum(len(" ".join(o).split()) for o in outs)
        res["batched"] = {
            "replies": len(prompts),
            "batch_size": a.batch,
            "seconds": dt,
            "replies_per_s": len(prompts) / dt,
            "words": words,
        }
        print("batched:", res["batched"], flush=True)
    res["command"] = "python bench/generate_speed.py " + " ".join(sys.argv[1:])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

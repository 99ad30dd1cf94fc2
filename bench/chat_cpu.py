"""Chat on the CPU: time to the first token and decode speed of the embedded Gemma 3 270M over a
multi-turn chat, with and without reusing the last turn's KV cache (convsim.inference.generate.TurnCache).

    python bench/chat_cpu.py                          # base model, plain-text speaker tags
    python bench/chat_cpu.py --run runs/me            # a fine-tuned run: its adapter, tokenizer, speakers, chat
    python bench/chat_cpu.py --turns 4 --no-save      # a quick check
    nice python bench/chat_cpu.py --threads 1         # torch threads (default: torch.get_num_threads())

Writes bench/results/chat_cpu.json (the command, the machine: nproc, CPU model, load average before and
after, and the numbers). A greedy chat: the script's other person says a line, the model answers, for
--turns turns after a --history-messages long start. At every turn the same prompt is answered twice,
side by side and in alternating order: once computing the whole prompt (what chat did before), once from
the cache of the previous turn (what chat does now); both must give the same reply. Time to first token
is from the call to the end of the first forward pass (prompt building and tokenizing included); decode
speed is tokens after the first over the time after the first. Medians over the turns after the first
(the first turn has no cache in either mode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from convsim.data.examples import PromptFormat
from convsim.data.schema import Message
from convsim.inference.generate import SampleConfig, TurnCache, reply

OUT = Path(__file__).parent / "results" / "chat_cpu.json"
A = [
    "hey how are you",
    "lol yes",
    "i love pizza so much",
    "are you coming tonight?",
    "haha ok",
    "omg that is amazing",
    "i feel happy today",
    "see you soon!!",
    "did you see the game yesterday",
    "my sister is visiting this weekend",
    "ugh work was so long today",
    "wanna get coffee tomorrow morning?",
]
B = [
    "Not bad. Working late again.",
    "I think so, yes.",
    "That sounds good to me.",
    "Maybe tomorrow then.",
    "I am reading a book about history.",
    "Sure, I will bring the snacks.",
    "Fine, thank you.",
    "The train was late again, so I walked.",
    "What time works for you?",
    "I finally fixed the bike.",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def script(args, run):
    """(speakers, history, the lines the other person says, who the model plays, who the other is)."""
    if run is None:
        rng = random.Random(0)
        history = [
            Message("Ana" if i % 2 else "Ben", rng.choice(A if i % 2 else B)) for i in range(args.history_messages)
        ]
        lines = [rng.choice(B) for _ in range(args.turns)]
        return ["Ana", "Ben"], history, lines, "Ana", "Ben"
    convs = sorted(run.conversations, key=lambda c: len(c.messages), reverse=True)
    msgs = [m for c in convs for m in c.messages]  # longest conversations first, one long chat
    as_ = args.as_ or run.targets[0]
    history = msgs[: args.history_messages]
    lines = [m.text for m in msgs[args.history_messages :] if m.speaker != as_][: args.turns]
    lines += [lines[i % max(1, len(lines))] if lines else "ok" for i in range(args.turns - len(lines))]
    other = run.other_speaker(as_)
    return run.speakers, history, lines, as_, other


class Clock:
    """Times of the forward passes of one `generate` call (a hook on the model's outermost module)."""

    def __init__(self, module):
        self.t: list[float] = []
        self.handle = module.register_forward_hook(lambda *a: self.t.append(time.perf_counter()))

    def measure(self, fn):
        self.t.clear()
        t0 = time.perf_counter()
        out = fn()
        n = len(self.t)
        ttft = self.t[0] - t0
        rate = (n - 1) / (self.t[-1] - self.t[0]) if n > 1 else None
        return out, ttft, rate, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a run directory trained on gemma-3-270m (default: the base model)")
    p.add_argument("--as", dest="as_", help="who the model plays (with --run; default the run's first target)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--history-messages", type=int, default=40, help="messages before the first turn")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-context-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    if args.run:
        from convsim.runs import open_run

        run = open_run(args.run)
        model, tok = run.load(device="cpu")
        fmt = run.fmt
        speakers, history, lines, as_, me = script(args, run)
    else:
        from convsim.modeling.models import load

        run = None
        model, tok = load("gemma-3-270m", device="cpu")
        speakers, history, lines, as_, me = script(args, None)
        fmt = PromptFormat("base", tuple(speakers), special_tokens=False)
    load_s = time.perf_counter() - t0
    top = model.get_base_model() if hasattr(model, "get_base_model") else model
    clock = Clock(top)
    cfg = SampleConfig(temperature=0, max_new_tokens=args.max_new_tokens, max_context_tokens=args.max_context_tokens)
    cache = TurnCache()
    reply(model, tok, fmt, history[-4:], as_, SampleConfig(temperature=0, max_new_tokens=4))  # warm-up

    rows, same = [], True
    for turn, line in enumerate(lines):
        history.append(Message(me, line))
        res = {}
        order = ("plain", "reuse") if turn % 2 == 0 else ("reuse", "plain")
        for mode in order:
            c = cache if mode == "reuse" else None
            out, ttft, rate, n = clock.measure(lambda: reply(model, tok, fmt, history, as_, cfg, cache=c)[0])
            res[mode] = dict(text=out, ttft_ms=round(1000 * ttft, 1), decode_tok_s=rate and round(rate, 1), tokens=n)
        same &= res["plain"]["text"] == res["reuse"]["text"]
        prompt_len = cache.reused + cache.fed
        rows.append(
            dict(
                turn=turn + 1,
                prompt_tokens=prompt_len,
                fed=cache.fed,
                reused=cache.reused,
                **{f"{m}_{k}": v for m in res for k, v in res[m].items() if k != "text"},
            )
        )
        print(
            f"turn {turn + 1}: prompt {prompt_len} tokens ({cache.reused} from the cache) | first token "
            f"{res['plain']['ttft_ms']:.0f} ms plain, {res['reuse']['ttft_ms']:.0f} ms reused | decode "
            f"{res['plain']['decode_tok_s']} / {res['reuse']['decode_tok_s']} tok/s | {as_}: {' / '.join(res['reuse']['text'])[:60]!r}",
            flush=True,
        )
        history += [Message(as_, t) for t in res["reuse"]["text"]] or [Message(as_, "ok")]
    clock.handle.remove()

    later = rows[1:] or rows
    med = lambda key: round(statistics.median(r[key] for r in later if r[key] is not None), 1)  # noqa: E731
    summary = {
        "ttft_ms_plain": med("plain_ttft_ms"),
        "ttft_ms_reuse": med("reuse_ttft_ms"),
        "ttft_ratio_plain_over_reuse": round(med("plain_ttft_ms") / med("reuse_ttft_ms"), 2),
        "decode_tok_s_plain": med("plain_decode_tok_s"),
        "decode_tok_s_reuse": med("reuse_decode_tok_s"),
        "prompt_tokens_median": med("prompt_tokens"),
        "same_replies": same,
        "turns_measured": len(later),
        "first_turn_ttft_ms": rows[0]["plain_ttft_ms"],
    }
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": "gemma-3-270m" + (f" + adapter {args.run}" if args.run else " (base, plain-text speaker tags)"),
        "dtype": str(next(model.parameters()).dtype),
        "load_s": round(load_s, 1),
        "settings": {
            k: getattr(args, k) for k in ("turns", "history_messages", "max_new_tokens", "max_context_tokens")
        },
        "summary": summary,
        "turns": rows,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(summary, indent=1))
    if not same:
        print("warning: the replies with and without the cache differ", file=sys.stderr)
    if not args.no_save:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {OUT}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Import throughput: synthetic WhatsApp exports through `convsim import`, the CLI's own code path.

    python bench/import_throughput.py                      # 1,000,000 messages; writes bench/results/import.json
    python bench/import_throughput.py --messages 100000 --no-save

Generates an Android-style export in a temporary directory (24-hour clock, day-first dates, two main
speakers and a few others, multi-line messages, media notices, system lines, some e-mails, phone
numbers and URLs to scrub, silences that split sessions), then times `convsim.cli.main(["import", ...])`
in this process: reading, parsing, cleaning, scrubbing, session split and writing conversations.jsonl
and import.json. Side by side in the same run: the same import with --no-scrub, and the floor of just
reading, decoding and splitting the file into lines. The goal is 1M messages in under 30 s on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from convsim.cli import main as convsim_main

GOAL_S = 30.0
WORDS = (
    "ok yes no lol haha sure maybe tomorrow tonight dinner coffee work later what why how "
    "really nice great cool love that idea see you soon home train late sorry thanks"
).split()
SPEAKERS = ["Ana López", "Ben", "Ana López", "Ben", "Ana López", "Ben", "Caro 🌻", "李雷"]


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    t = datetime(2021, 1, 1, 9, 0)
    lines = []
    for i in range(n):
        t += timedelta(seconds=rng.choice((5, 20, 45, 90, 300)) if rng.random() > 0.002 else 4 * 3600)
        head = f"{t.day:02d}/{t.month:02d}/{t.year}, {t.hour:02d}:{t.minute:02d} - "
        r = rng.random()
        if r < 0.005:
            lines.append(head + "Ben added Caro 🌻")
            continue
        who = rng.choice(SPEAKERS)
        if r < 0.025:
            text = "<Media omitted>"
        elif r < 0.03:
            text = f"mail me at user{rng.randrange(500)}@example.com or call +44 7700 {rng.randrange(900000, 999999)}"
        elif r < 0.035:
            text = f"look https://example.org/p/{rng.randrange(10000)}"
        else:
            text = " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))
            if r > 0.97:
                text += "\n" + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
        lines.append(f"{head}{who}: {text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def timed_import(src: Path, out: Path, *extra: str) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of this process, the --json summary)."""
    buf = io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(buf):
        rc = convsim_main(["import", str(src), "--out", str(out), "--json", *extra])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if rc != 0:
        raise SystemExit(f"import failed with exit code {rc}")
    return seconds, cpu, json.loads(buf.getvalue())


def floor(src: Path) -> float:
    t0 = time.perf_counter()
    text = src.read_bytes().decode("utf-8")
    lines = text.split("\n")
    assert lines
    return time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU {cpu}, Python {platform.python_version()}, {platform.system()}"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/import.json")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "WhatsApp Chat with Ben.txt"
        t0 = time.perf_counter()
        generate(src, args.messages)
        print(
            f"generated {args.messages:,} message lines ({src.stat().st_size / 1e6:.1f} MB) "
            f"in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        floor_s = floor(src)
        seconds, cpu, summary = timed_import(src, Path(tmp) / "data")
        seconds_ns, _, _ = timed_import(src, Path(tmp) / "data-noscrub", "--no-scrub")
        written = (Path(tmp) / "data" / "conversations.jsonl").stat().st_size
    load_after = os.getloadavg()[0]
    rate = args.messages / seconds
    print(f"{'run':<34} {'seconds':>8} {'messages/s':>12}")
    print(f"{'read+decode+split lines (floor)':<34} {floor_s:>8.2f} {args.messages / floor_s:>12,.0f}")
    print(f"{'convsim import --no-scrub':<34} {seconds_ns:>8.2f} {args.messages / seconds_ns:>12,.0f}")
    print(f"{'convsim import (default, scrub)':<34} {seconds:>8.2f} {rate:>12,.0f}   ({cpu:.2f} s CPU)")
    goal = ("met" if seconds < GOAL_S else "MISSED") if args.messages >= 1_000_000 else "needs --messages 1000000"
    print(
        f"kept {summary['messages']:,} messages in {summary['conversations']:,} conversations; "
        f"import/floor = {seconds / floor_s:.1f}x; goal {GOAL_S:.0f} s for 1M: {goal}; "
        f"load average {load_before:.1f} before, {load_after:.1f} after (other work on the machine slows this)"
    )
    if not args.no_save:
        result = {
            "messages": args.messages,
            "seconds": round(seconds, 3),
            "messages_per_s": round(rate),
            "cpu_seconds": round(cpu, 3),
            "seconds_no_scrub": round(seconds_ns, 3),
            "seconds_floor_read_split": round(floor_s, 3),
            "kept_messages": summary["messages"],
            "conversations": summary["conversations"],
            "dropped": summary["dropped"],
            "scrubbed": summary["scrubbed"],
            "output_bytes": written,
            "goal_seconds_for_1m": GOAL_S,
            "machine": machine(),
            "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            "command": "python bench/import_throughput.py"
            + (f" --messages {args.messages}" if args.messages != 1_000_000 else ""),
            "date": datetime.now().isoformat(timespec="seconds"),
        }
        out = Path(__file__).resolve().parent / "results" / "import.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

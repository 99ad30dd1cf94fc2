"""`convsim stats DATA_DIR`: per-speaker statistics of an imported data dir (its conversations.jsonl).

    convsim stats data/ana
    convsim stats data/ana --json

Per speaker: messages; length in characters and words (mean, median); burst size, i.e. how many
messages they send in a row before someone else speaks (mean, median); reply delay, the seconds from
the other person's last message to this speaker's first message of a burst (median; only within a
conversation and where both times are known). `speaker_stats(convs)` is the pure function behind it.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import datetime
from statistics import mean, median

from convsim.data.schema import Conversation, aware, read_conversations
from convsim.errors import UserError

HELP = "Per-speaker statistics of an imported data dir: messages, length, burst size, reply delay."
EXAMPLES = """
  convsim stats data/ana
  convsim stats data/ana --json
"""


def add_arguments(p) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="a directory written by `convsim import`")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    convs = read_conversations(args.data_dir)
    if not any(c.messages for c in convs):
        raise UserError(f"{args.data_dir}: conversations.jsonl holds no messages (run `convsim import` again?)")
    stats = speaker_stats(convs)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        return 0
    print(
        f"{stats['conversations']:,} conversations, {stats['messages']:,} messages, {len(stats['speakers'])} speakers"
    )
    head = f"{'speaker':<24} {'messages':>9} {'chars mean/med':>15} {'words mean/med':>15} {'burst mean/med':>15} {'reply s (med)':>13}"
    print(head)
    for name, s in stats["speakers"].items():
        delay = "-" if s["reply_delay_s_median"] is None else f"{s['reply_delay_s_median']:g}"
        print(
            f"{_fit(name, 24)} {s['messages']:>9,} {s['chars_mean']:>8.1f}/{s['chars_median']:<6g} "
            f"{s['words_mean']:>8.1f}/{s['words_median']:<6g} {s['burst_mean']:>8.2f}/{s['burst_median']:<6g} {delay:>13}"
        )
    return 0


def speaker_stats(convs: list[Conversation]) -> dict:
    chars: dict[str, list[int]] = {}
    words: dict[str, list[int]] = {}
    bursts: dict[str, list[int]] = {}
    delays: dict[str, list[float]] = {}
    for c in convs:
        prev_speaker = None
        prev_time = None
        run = 0
        for m in c.messages:
            chars.setdefault(m.speaker, []).append(len(m.text))
            words.setdefault(m.speaker, []).append(len(m.text.split()))
            t = _time(m.time)
            if m.speaker != prev_speaker:
                if prev_speaker is not None:
                    bursts.setdefault(prev_speaker, []).append(run)
                    if t is not None and prev_time is not None:
                        delays.setdefault(m.speaker, []).append(max(0.0, (t - prev_time).total_seconds()))
                run = 0
                prev_speaker = m.speaker
            run += 1
            prev_time = t
        if prev_speaker is not None:
            bursts.setdefault(prev_speaker, []).append(run)
    order = sorted(chars, key=lambda s: (-len(chars[s]), s))
    speakers = {}
    for s in order:
        d = delays.get(s, [])
        speakers[s] = {
            "messages": len(chars[s]),
            "chars_mean": round(mean(chars[s]), 2),
            "chars_median": median(chars[s]),
            "words_mean": round(mean(words[s]), 2),
            "words_median": median(words[s]),
            "bursts": len(bursts.get(s, [])),
            "burst_mean": round(mean(bursts[s]), 3) if bursts.get(s) else 0.0,
            "burst_median": median(bursts[s]) if bursts.get(s) else 0,
            "reply_delay_s_median": median(d) if d else None,
            "replies_timed": len(d),
        }
    return {"conversations": len(convs), "messages": sum(len(v) for v in chars.values()), "speakers": speakers}


def _time(value: str | None) -> datetime | None:
    return aware(value)  # offsets compared; no offset: UTC


def _fit(name: str, width: int) -> str:
    """`name` cut or padded to `width` terminal columns (CJK characters take two)."""
    out, used = [], 0
    for ch in name:
        w = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else (0 if unicodedata.combining(ch) else 1)
        if used + w > width - 1 and len(name) > len(out) + 1:
            out.append("…")
            used += 1
            break
        out.append(ch)
        used += w
    return "".join(out) + " " * max(0, width - used)

"""`convsim reply`: sample reply bursts as one person for a given history, non-interactively.

printf '[Ben] are you coming?\n' | convsim reply runs/me --as Ana --history - --n 3 --json
"""

from __future__ import annotations

import json
import sys

from convsim.chat.chatio import add_sampling_arguments, copy_guard, sample_config, steering
from convsim.data.transcript import read_transcript

HELP = "Sample K reply bursts as one person for a history file (`[Name] text` lines or JSONL)."
EXAMPLES = """
  printf '[Ben] are you coming tonight?\\n' | convsim reply runs/me --as Ana --history -
  convsim reply runs/me --as Ana --history chat.txt --n 5 --json
  convsim reply runs/me --as Ana --history chat.txt --temperature 0      # greedy, deterministic
"""


def add_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--as", dest="speaker", required=True, help="who replies")
    p.add_argument("--history", required=True, help="file with the conversation so far, or - for stdin")
    p.add_argument("--n", type=int, default=1, help="number of sampled bursts")
    p.add_argument("--json", action="store_true")
    add_sampling_arguments(p)


def run(args):
    from convsim.inference.bursts import empty_note
    from convsim.inference.generate import reply
    from convsim.runs import open_run

    run_ = open_run(args.run_dir)
    run_.check_person(args.speaker)
    history = read_transcript(args.history, run_.speakers)
    model, tok = run_.load()
    guard = copy_guard(run_, tok, args)
    with steering(model, args.steer):
        bursts = reply(model, tok, run_.fmt, history, args.speaker, sample_config(args), n=max(1, args.n), guard=guard)
    note = empty_note(args.speaker)
    if args.json:
        rows = [{"messages": b, **({} if b else {"note": note})} for b in bursts]
        print(json.dumps({"replies": rows}, ensure_ascii=False))
    else:
        for i, b in enumerate(bursts):
            if i:
                print("---")
            for m in b:
                print(f"[{args.speaker}] {m}")
            if not b:
                print(f"[{args.speaker}] …")
    if any(not b for b in bursts):
        print(note, file=sys.stderr)
    return 0

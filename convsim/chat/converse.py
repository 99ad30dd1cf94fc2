"""`convsim converse`: the model plays everyone. The next speaker is drawn from the model's own
distribution over the speaker tokens at the end of each burst (or taken round robin).
"""

from __future__ import annotations

import random
import sys

import torch

from convsim.chat.chatio import add_sampling_arguments, copy_guard, sample_config, steering
from convsim.data.examples import render, tag_ids
from convsim.data.schema import Message

HELP = "Let the model play every speaker and print the conversation as it goes."
EXAMPLES = """
  convsim converse runs/me --turns 10
  convsim converse runs/me --start "[Ana] guess what happened today" --save
  convsim converse runs/group --speakers Ana,Ben,Cleo --round-robin --temperature 0.8
"""


def add_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--speakers", help="comma-separated people who take part (default: all of the run's)")
    p.add_argument("--turns", type=int, default=8, help="number of bursts to generate")
    p.add_argument("--start", help="opening message, `[Name] text` (default: a greeting by the first speaker)")
    p.add_argument("--round-robin", action="store_true", help="take turns in order instead of sampling who speaks")
    p.add_argument("--save", action="store_true")
    p.add_argument("--db")
    add_sampling_arguments(p)


def next_speaker(model, tok, fmt, history, speakers, temperature: float, rng: random.Random) -> str:
    """Sample who speaks next from the model's probabilities of the speakers' tokens."""
    probe = speakers[0]
    ids = render(tok, fmt, history, probe).input_ids
    ids = ids[: len(ids) - len(tag_ids(tok, fmt, probe))]
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=x).logits[0, -1].float()
    first = [tag_ids(tok, fmt, s)[0] for s in speakers]
    scores = logits[first]
    if history:  # the one who just spoke ended their burst
        scores[speakers.index(history[-1].speaker)] = -float("inf") if len(speakers) > 1 else scores[0]
    if temperature <= 0:
        return speakers[int(scores.argmax())]
    p = torch.softmax(scores / temperature, dim=0).tolist()
    return rng.choices(speakers, weights=p)[0]


def run(args):
    from convsim.data.transcript import parse_transcript
    from convsim.inference.bursts import empty_note
    from convsim.inference.generate import reply
    from convsim.runs import open_run
    from convsim.chat.history import now, save_session

    run_ = open_run(args.run_dir)
    speakers = [run_.check_person(s.strip()) for s in args.speakers.split(",")] if args.speakers else run_.people
    model, tok = run_.load()
    guard = copy_guard(run_, tok, args)
    cfg = sample_config(args)
    rng = random.Random(args.seed)
    history = (
        parse_transcript(args.start, run_.speakers, "--start") if args.start else [Message(speakers[0], "hey", now())]
    )
    for m in history:
        print(f"[{m.speaker}] {m.text}")
    generated = set()
    order = speakers[1:] + speakers[:1]
    with steering(model, args.steer):
        for turn in range(args.turns):
            who = (
                order[turn % len(order)]
                if args.round_robin
                else next_speaker(model, tok, run_.fmt, history, speakers, args.temperature or 1.0, rng)
            )
            texts = reply(model, tok, run_.fmt, history, who, cfg, guard=guard)[0]
            if not texts:
                print(empty_note(who), file=sys.stderr)
                texts = ["…"]
            for t in texts:
                print(f"[{who}] {t}", flush=True)
                generated.add(len(history))
                history.append(Message(who, t, now()))
    if args.save:
        sid = save_session(
            args.db or run_.path / "conversations.sqlite",
            "converse",
            history,
            run_.model_name,
            run_.adapter_hash,
            vars(cfg),
            args.steer,
            generated,
        )
        print(f"(saved as session {sid})")
    return 0

"""`convsim chat`: you write as one person, the model answers as another. Reads a terminal or a pipe.

In-chat commands: /quit, /reset, /as NAME, /me NAME, /history, /save.
"""

from __future__ import annotations

import sys

from convsim.chat.chatio import add_sampling_arguments, copy_guard, sample_config, steering
from convsim.data.schema import Message

HELP = "Chat with a simulated person: you write as --me, the model answers as --as."
EXAMPLES = """
  convsim chat runs/me --as Ana                     # you are the other speaker
  convsim chat runs/me --as Ana --me Ben --stream --save
  printf 'hi!\\nhow was your day?\\n/quit\\n' | convsim chat runs/me --as Ana --temperature 0
  convsim chat runs/me --as Ana --steer happy.safetensors:4 --tda
"""
COMMANDS_HELP = "commands: /quit /reset /as NAME /me NAME /history /save"


def add_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--as", dest="speaker", required=True, help="who the model plays")
    p.add_argument("--me", help="who you are (default: the other speaker)")
    p.add_argument("--stream", action="store_true", help="print the reply token by token")
    p.add_argument(
        "--tda",
        action="store_true",
        help="after each reply, show the most similar training messages (needs `convsim tda index RUN_DIR` first)",
    )
    p.add_argument("--tda-method", default="activations", choices=["activations", "gradients"])
    p.add_argument("--tda-k", type=int, default=3, help="training messages shown after each reply (default 3)")
    p.add_argument("--save", action="store_true", help="save the conversation to the database on exit")
    p.add_argument("--db", help="database for --save and /save (default RUN_DIR/conversations.sqlite)")
    p.add_argument(
        "--no-kv-reuse",
        action="store_true",
        help="compute the whole prompt every turn instead of reusing the last turn's KV cache",
    )
    add_sampling_arguments(p)


def run(args):
    from convsim.inference.bursts import empty_note
    from convsim.inference.generate import TurnCache, reply, stream_reply
    from convsim.runs import open_run
    from convsim.chat.history import now, save_session

    run_ = open_run(args.run_dir)
    as_ = run_.check_person(args.speaker)
    me = run_.check_speaker(args.me) if args.me else run_.other_speaker(as_)
    model, tok = run_.load()
    guard = copy_guard(run_, tok, args)
    cfg = sample_config(args)
    db = args.db or str(run_.path / "conversations.sqlite")
    tty = sys.stdin.isatty()
    history: list[Message] = []
    generated: set[int] = set()
    cache = None if args.no_kv_reuse else TurnCache()  # the last turn's keys/values: only new messages are computed
    tda = None
    if args.tda:
        from convsim.tda.query import Attributor

        tda = Attributor(run_, model, tok, method=args.tda_method, k=args.tda_k)

    def save():
        sid = save_session(db, "chat", history, run_.model_name, run_.adapter_hash, vars(cfg), args.steer, generated)
        print(f"(saved as session {sid} in {db})", file=sys.stderr)

    if tty:
        print(f"You are {me}; {as_} answers. {COMMANDS_HELP}", file=sys.stderr)
    while True:
        if tty:
            print(f"[{me}] ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/quit":
                break
            elif cmd == "/reset":
                history.clear()
                generated.clear()
                print("(history cleared)")
                if cache is not None:
                    cache.reset()
            elif cmd == "/as":
                as_ = run_.check_person(arg.strip())
                me = run_.other_speaker(as_) if me == as_ else me
                print(f"(the model now plays {as_}; you are {me})")
            elif cmd == "/me":
                me = run_.check_speaker(arg.strip())
                as_ = run_.other_speaker(me) if me == as_ else as_
                print(f"(you are now {me}; the model plays {as_})")
            elif cmd == "/history":
                for m in history:
                    print(f"[{m.speaker}] {m.text}")
            elif cmd == "/save":
                save()
            else:
                print(f"(unknown command {cmd}; {COMMANDS_HELP})")
            continue
        history.append(Message(me, line, now()))
        with steering(model, args.steer):
            if args.stream:
                texts: list[str] = []
                for i, delta in stream_reply(model, tok, run_.fmt, history, as_, cfg, cache=cache, guard=guard):
                    if i >= len(texts):
                        if texts:
                            print()
                        texts.append("")
                        print(f"[{as_}] ", end="")
                    texts[i] += delta
                    print(delta, end="", flush=True)
                print()
            else:
                texts = reply(model, tok, run_.fmt, history, as_, cfg, cache=cache, guard=guard)[0]
                for t in texts:
                    print(f"[{as_}] {t}")
        if not texts:
            print(f"[{as_}] …")
            print(empty_note(as_), file=sys.stderr)
        for t in texts:
            generated.add(len(history))
            history.append(Message(as_, t, now()))
        if tda is not None and texts:
            before = history[: len(history) - len(texts)]
            for hit in tda.query(texts, as_, context=before):
                print(f"    ~ {hit['score']:.2f} [{hit['speaker']}] {hit['text'][:100]}")
        sys.stdout.flush()
    if args.save and history:
        save()
    return 0

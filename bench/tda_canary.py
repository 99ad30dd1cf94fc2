"""Canary recall: does attribution find the training message a reply was learnt from?

    python bench/tda_canary.py --data data/chitchat --model gemma-3-270m --work /tmp/canary \\
        --out bench/results/tda_canary.json --canaries 20 --repeat 8 --train-args "--epochs 2 --batch-size 32"
    python bench/tda_canary.py --data tests-data --model tiny-gemma3 --work /tmp/c --out /tmp/c.json \\
        --canaries 4 --train-args "--max-steps 20 --batch-size 8"          # a CPU smoke run (numbers meaningless)

What it does, side by side in one run:
1. plants M made-up messages (distinctive invented sentences, seeded) into train-split conversations of
   DATA_DIR, each replacing a one-message reply of a target speaker that follows another speaker's
   message, so each canary is a training example with a real context; with --repeat R each canary is
   planted R times by one speaker in different places (said once, the 270M model learnt none of 20 in 2 or
   5 epochs: bench/results/tda_canary_gpu.json), and finding any copy counts (same split rule as `convsim
   train`: the canaries' conversations are checked against the run's split afterwards);
2. trains with `convsim train` (a subprocess; `--train-args` are passed through). An existing finished
   run in WORK/run made from the same planted data is reused;
3. for each canary, prompts the model with the canary's own context and generates its reply greedily;
   the reply reproduces the canary when it equals it (case, spacing and punctuation aside);
4. indexes the training messages with each variant (`convsim.tda.index.update_index`, timed) and queries
   each with the generated reply as the canary's speaker (the gradients methods also get the context);
   a hit is the canary's own training message among the top 5. Also reported: the same with the search
   restricted to the canary's speaker, and with the canary's own text as the query (a sanity check: it
   should be about 1.0).

Variants (`--variants`, comma-separated): activations (the default index: middle layer, mean pool,
centred), activations-last-raw (last layer, not centred: the naive choice), activations-last,
activations-mid-raw, gradients (count-sketched LoRA gradients, centred), gradients-raw.

Needs no faiss: queries fall back to exact numpy search. Prints progress and a table; writes JSON
atomically (with the machine and card it ran on).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "activations": dict(method="activations"),
    "activations-last-raw": dict(method="activations", layer="last", center=False),
    "activations-last": dict(method="activations", layer="last"),
    "activations-mid-raw": dict(method="activations", center=False),
    "gradients": dict(method="gradients"),
    "gradients-raw": dict(method="gradients", center=False),
}
DEFAULT_VARIANTS = "activations,activations-last-raw,activations-last,activations-mid-raw,gradients,gradients-raw"

ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "pl", "qu", "r", "s", "sk", "t",
          "tr", "v", "z", "zh", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
CODAS = ["", "", "n", "r", "l", "sk", "x", "m", "th"]
TEMPLATES = [
    "my cousin keeps {n} {adj} {noun}s in the {Place} lighthouse",
    "the {Place} ferry only takes {noun}s painted {adj} on thursdays",
    "I traded {n} jars of {adj} {noun} jam for a ticket to {Place}",
    "remember the {adj} {noun} we buried under the {Place} bridge in {year}?",
    "grandma says the {Place} choir sings to {n} {adj} {noun}s every full moon",
    "we should name the boat {Place} {noun} and paint it {adj}",
    "the {adj} {noun} festival in {Place} starts at {hour} sharp",
    "my password used to be {noun}{n}{Place} until the {adj} incident",
]
ADJ = ["violet", "crooked", "humming", "frostbitten", "velvet", "lopsided", "copper", "whispering", "striped"]


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def canary_texts(m: int, seed: int) -> list[str]:
    """M distinct invented sentences: real grammar, made-up names, numbers nobody would guess."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < m:
        t = TEMPLATES[len(out) % len(TEMPLATES)].format(
            n=rng.randint(13, 97), adj=rng.choice(ADJ), noun=word(rng, 2), Place=word(rng, 2).capitalize(),
            year=rng.randint(1961, 1999), hour=f"{rng.randint(1, 11)}:{rng.choice(['05', '17', '41', '53'])}")
        if t not in out:
            out.append(t)
    return out


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def token_f1(a: str, b: str) -> float:
    x, y = normalise(a).split(), normalise(b).split()
    if not x or not y:
        return 0.0
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    if not common:
        return 0.0
    p, r = common / len(x), common / len(y)
    return 2 * p * r / (p + r)


def plant(convs, targets, split_ids: set[str], m: int, seed: int, context_size: int, repeat: int = 1):
    """Replace M x REPEAT single-message replies of target speakers in train conversations by M canaries,
    each said REPEAT times by one speaker in different places (a message seen once is rarely learnt).
    Copies are far apart: none inside another's context (one per conversation first, then spaced out)."""
    rng = random.Random(seed)
    slots = []
    for ci, c in enumerate(convs):
        if c.id not in split_ids:
            continue
        msgs = c.messages
        for i in range(1, len(msgs)):
            s = msgs[i].speaker
            if s in targets and msgs[i - 1].speaker != s and (i + 1 == len(msgs) or msgs[i + 1].speaker != s):
                slots.append((ci, i))
    rng.shuffle(slots)
    taken: dict[int, list[int]] = {}                 # conversation -> indices already used

    def free(ci, i, one_per_conv):
        used = taken.get(ci, [])
        return not used if one_per_conv else all(abs(j - i) > context_size + 1 for j in used)

    groups: list[list[tuple[int, int]]] = []
    for _ in range(m):
        group: list[tuple[int, int]] = []
        for one_per_conv in (True, False):
            for ci, i in slots:
                if len(group) >= repeat:
                    break
                if group and convs[ci].messages[i].speaker != convs[group[0][0]].messages[group[0][1]].speaker:
                    continue
                if free(ci, i, one_per_conv):
                    taken.setdefault(ci, []).append(i)
                    group.append((ci, i))
        if len(group) < repeat:
            raise SystemExit(f"only {len(groups)} canaries x {repeat} fit in the train split; use fewer "
                             "--canaries or a smaller --repeat")
        groups.append(group)
    from convsim.chats.schema import Message
    canaries = []
    for group, text in zip(groups, canary_texts(m, seed)):
        speaker = convs[group[0][0]].messages[group[0][1]].speaker       # every copy's (chosen so above)
        copies = []
        for ci, i in group:
            msgs = convs[ci].messages
            old = msgs[i]
            msgs[i] = Message(old.speaker, text, old.time)
            copies.append({"conv": convs[ci].id, "index": i, "time": old.time, "replaced": old.text,
                           "context": [[x.speaker, x.text, x.time] for x in msgs[max(0, i - context_size):i]]})
        first = copies[0]                           # the copy whose context prompts the model
        canaries.append({"conv": first["conv"], "index": first["index"], "speaker": speaker,
                         "time": first["time"], "text": text, "replaced": first["replaced"], "context": first["context"],
                         "copies": [{k: x[k] for k in ("conv", "index", "time")} for x in copies]})
    return canaries


def machine() -> str:
    card = ""
    try:
        import torch
        if torch.cuda.is_available():
            card = ", " + torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores{card}"


def step(msg: str) -> None:
    print(f"[canary] {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data dir with conversations.jsonl")
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True, help="working directory (planted data, run, indexes)")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--canaries", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1, help="copies of each canary planted (by one speaker, apart)")
    p.add_argument("--train-args", default="", help='passed to `convsim train`, e.g. "--epochs 2 --batch-size 16"')
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faiss", action="store_true", help="behave as if faiss were not installed (numpy search)")
    args = p.parse_args(argv)
    if args.no_faiss:
        sys.modules["faiss"] = None               # `import faiss` now raises ImportError
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    from convsim.chats.examples import split_conversations
    from convsim.chats.schema import Message, read_conversations, speakers_of, write_conversations
    from convsim.config import TrainConfig
    from convsim.fsutil import write_json

    work = Path(args.work)
    data, run_dir = work / "data", work / "run"
    train_args = shlex.split(args.train_args)
    cfg = TrainConfig()
    targets = [train_args[i + 1] for i, a in enumerate(train_args[:-1]) if a == "--target"]

    # 1. plant
    convs = read_conversations(args.data)
    targets = targets or speakers_of(convs)
    split = split_conversations(convs, cfg.val_fraction, cfg.test_fraction)
    canaries = plant(convs, set(targets), {c.id for c in split["train"]}, args.canaries, args.seed, cfg.context_size,
                     args.repeat)
    planted = json.dumps(canaries, sort_keys=True)
    step(f"planted {len(canaries)} canaries x {args.repeat} into {len(split['train'])} train conversations "
         f"({sum(len(c.messages) for c in convs)} messages); e.g. {canaries[0]['speaker']}: {canaries[0]['text']!r}")
    previous = work / "canaries.json"
    reuse = (run_dir / "run.json").exists() and previous.exists() and previous.read_text() == planted and \
        json.loads((run_dir / "run.json").read_text()).get("status") == "done"
    train_summary, train_seconds = None, None
    if reuse:
        step(f"reusing the finished run in {run_dir} (same planted data)")
    else:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        write_conversations(data / "conversations.jsonl", convs)
        (work / "canaries.json").write_text(planted)
        # 2. train
        cmd = [sys.executable, "-m", "convsim", "train", str(data), "--out", str(run_dir), "--model", args.model,
               *train_args, "--json"]
        step("training: " + " ".join(shlex.quote(c) for c in cmd[1:]))
        t0 = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        train_seconds = round(time.time() - t0, 1)
        if proc.returncode != 0:
            raise SystemExit(f"convsim train failed ({proc.returncode})")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        train_summary = json.loads(lines[-1]) if lines else None
        step(f"trained in {train_seconds}s")

    from convsim.generate import SampleConfig, reply
    from convsim.runs import open_run
    from convsim.tda.index import IndexSpec, training_messages, update_index
    from convsim.tda.query import Attributor

    run = open_run(run_dir)
    in_train = set(run.meta["split"]["train"])
    dropped = [c for c in canaries if any(x["conv"] not in in_train for x in c["copies"])]
    canaries = [c for c in canaries if c not in dropped]
    if dropped:
        step(f"warning: {len(dropped)} canaries' conversations are not in the run's train split; left out")
    model, tok = run.load()
    device = str(next(model.parameters()).device)

    # 3. generate
    step(f"generating {len(canaries)} greedy replies on {device}")
    cfg_gen = SampleConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    for c in canaries:
        context = [Message(s, t, tm) for s, t, tm in c["context"]]
        texts = reply(model, tok, run.fmt, context, c["speaker"], cfg_gen)[0]
        c["generated"] = texts
        joined = " ".join(texts)
        c["reproduced"] = bool(texts) and (normalise(joined) == normalise(c["text"])
                                           or normalise(texts[0]) == normalise(c["text"]))
        c["token_f1"] = round(token_f1(texts[0] if texts else "", c["text"]), 3)
    n = len(canaries)
    reproduced = sum(c["reproduced"] for c in canaries) / max(n, 1)
    step(f"reproduced {sum(c['reproduced'] for c in canaries)}/{n}; e.g. {canaries[0]['text']!r} -> "
         f"{canaries[0]['generated']!r}")

    # 4. index and query
    n_messages = len(training_messages(run))
    recall, recall_spk, self_recall, index_seconds, specs = {}, {}, {}, {}, {}
    for name in variants:
        spec = IndexSpec(**VARIANTS[name])
        where = run_dir / "tda-bench" / name
        step(f"indexing {n_messages} training messages: {name} {VARIANTS[name]}")
        t0 = time.time()
        stats = update_index(run, spec, model, tok, directory=where, progress=sys.stderr.isatty(), rebuild=True,
                             log=lambda msg: None)
        index_seconds[name] = round(time.time() - t0, 2)
        specs[name] = {**VARIANTS[name], "layer": stats["layer"], "dim": stats["dim"]}
        tda = Attributor(run, model, tok, method=spec.method, k=args.k, directory=where)
        hits = {"any": 0, "speaker": 0, "self": 0}
        for c in canaries:
            keys = {(c["speaker"], x["time"], c["text"]) for x in c["copies"]}     # any copy is the canary
            context = [Message(s, t, tm) for s, t, tm in c["context"]]
            found = lambda res: any((h["speaker"], h["time"], h["text"]) in keys for h in res)  # noqa: E731
            own = found(tda.query(c["generated"], c["speaker"], context=context)) if c["generated"] else False
            hits["any"] += own
            if c["generated"]:
                hits["speaker"] += found(tda.query(c["generated"], c["speaker"], speaker=c["speaker"],
                                                   context=context))
            hits["self"] += found(tda.query(c["text"], c["speaker"], context=context))
            c.setdefault("found", {})[name] = own
        recall[name] = round(hits["any"] / max(n, 1), 3)
        recall_spk[name] = round(hits["speaker"] / max(n, 1), 3)
        self_recall[name] = round(hits["self"] / max(n, 1), 3)
        step(f"  {name}: recall@{args.k} {recall[name]:.2f} (speaker-filtered {recall_spk[name]:.2f}, "
             f"own text {self_recall[name]:.2f}), indexed in {index_seconds[name]}s")

    try:
        import faiss  # noqa: F401
        search = "faiss"
    except ImportError:
        search = "numpy exact (faiss not installed)"
    result = {
        f"canary_recall_at_{args.k}": recall,
        f"canary_recall_at_{args.k}_speaker_filtered": recall_spk,
        f"own_text_recall_at_{args.k}": self_recall,
        "reproduced": round(reproduced, 3),
        "reproduced_token_f1": round(sum(c["token_f1"] for c in canaries) / max(n, 1), 3),
        "empty_replies": sum(not c["generated"] for c in canaries),
        "n_canaries": n,
        "copies_per_canary": args.repeat,
        "index_seconds": index_seconds,
        "index_messages": n_messages,
        "variants": specs,
        "model": args.model,
        "train_args": args.train_args,
        "train_seconds": train_seconds,
        "train": train_summary,
        "search": search,
        "device": device,
        "machine": machine(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "canaries": [{k: c[k] for k in ("speaker", "text", "generated", "reproduced", "token_f1", "found")}
                     for c in canaries],
    }
    write_json(args.out, result, private=False)

    width = max(len(v) for v in variants)
    print(f"\n{'variant':<{width}}  recall@{args.k}  speaker-only  own-text  index s")
    for name in variants:
        print(f"{name:<{width}}  {recall[name]:>8.2f}  {recall_spk[name]:>12.2f}  {self_recall[name]:>8.2f}  "
              f"{index_seconds[name]:>7}")
    print(f"reproduced {reproduced:.2f} of {n} canaries; {n_messages} training messages; search: {search}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

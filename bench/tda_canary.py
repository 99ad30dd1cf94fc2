"""Canary recall: does attribution find the training message a reply was learnt from?

    python bench/tda_canary.py --data data/chitchat --model gemma-3-270m --work /tmp/canary \\
        --out bench/results/tda_canary.json --canaries 20 --repeat 16 --prefix-words 3 \\
        --variants activations,activations-last-raw --train-args "--epochs 2 --batch-size 32"
    python bench/tda_canary.py --data /tmp/small --model tiny-gemma3 --work /tmp/c --out /tmp/c.json \\
        --canaries 4 --repeat 3 --prefix-words 3 --train-args "--max-steps 20 --batch-size 8"
    # a CPU smoke run in about a minute (numbers meaningless); /tmp/small: a few conversations, e.g.
    # tests/conftest.py's synthetic_conversations(20, 20) written with convsim.data.schema.write_conversations

What it does, side by side in one run:
1. plants M made-up messages (distinctive invented sentences, seeded) into train-split conversations of
   DATA_DIR, each replacing a one-message reply of a target speaker that follows another speaker's
   message, so each canary is a training example with a real context; with --repeat R each canary is
   planted R times by one speaker in different places (said once, the 270M model learnt none of 20 in 2 or
   5 epochs: bench/results/tda_canary_gpu.json; said 8 times, in 2 epochs, it reproduced 3 of 20 from a
   1-word prefix and 5 of 20 from a 3-word one, with 8 frames shared by the 20 canaries:
   bench/results/tda-canary-gpu-r8-k1.json, -r8-k3.json; said 16 times with a frame per canary, as in
   the first command above, it reproduced 5 of 20 from 1 word and 16 of 20 from 3 words:
   bench/results/tda-canary-gpu-k1.json, -k3.json), and finding any copy counts (same split rule as `convsim
   train`: the canaries' conversations are checked against the run's split afterwards);
2. trains with `convsim train` (a subprocess; `--train-args` are passed through). An existing finished
   run in WORK/run made from the same planted data (same --data, --canaries, --repeat, --seed, targets)
   is reused, so runs that differ only in --prefix-words, --variants or --k do not train again;
3. for each canary, prompts the model with the canary's own context and generates its reply greedily.
   With --prefix-words K (the secret-sharer way of eliciting a memorised sequence), the prompt also has
   the speaker's turn already begun with the canary's first K words, tokenised exactly as training renders
   a reply that starts with them (checked: the prompt ids are a prefix of the rendered training example
   with the canary as reply; where a tokeniser merges across the cut, the prompt takes the rendered
   example's own tokens up to the last whole word, and `prompt_from_render` counts such canaries); the
   model completes the turn, and the generated reply is prefix + completion. The canary is *reproduced*
   when the completion equals the rest of the canary (case, spacing and punctuation aside); also reported:
   the mean token F1 of the completion against that rest. K = 0 (default): no prefix, the whole reply is
   generated and compared with the whole canary;
4. indexes the training messages with each variant (`convsim.tda.index.update_index`, timed) and queries
   each with the generated reply (prefix + completion) as the canary's speaker (the gradients methods also
   get the context); a hit is the canary's own training message (any copy) among the top 5. Reported per
   variant, with hit counts: recall over all canaries; over the reproduced ones only
   (`canary_recall_at_5_reproduced`); with the search restricted to the canary's speaker; with the canary's
   own text as the query (a sanity check: it should be about 1.0); and, with K > 0, with the prefix alone
   as the query (`canary_recall_at_5_prefix_only`, a control).

Canaries come from TEMPLATES, one sentence frame per canary (30 frames; with more --canaries than that
the frames are used again in turn, so canaries then share frames). Frames were shared before (8 for 20
canaries), and the model mixed canaries of one frame: "my cousin keeps 62 copper bruthrouls in the
Rairsil lighthouse" came out as "my cousin keeps 24k gold plated gel pens in the Brarzuth lighthouse"
(bench/results/tda-canary-gpu-r8-k3.json). Each frame opens with 3 ordinary chat words, a different 3 for
each frame (first words repeat: "my", "i", "we", "the", ...), and its invented words and numbers (the
secret part) come after them, so a prefix of K <= 3 words holds no invented token and K = 1 is generic.
(Before, some frames had an invented word or a number among their first 3 words, and the prefix-only
control was 0.35-0.40 at K = 3.) A 3-word opening still belongs to one canary only, so the prefix alone
may find it: the recall the completion earns is what exceeds the prefix-only control.

Variants (`--variants`, comma-separated, run in the order given): activations (the default index: middle
layer, mean pool, centred), activations-last-raw (last layer, not centred: the naive choice),
activations-last, activations-mid-raw, gradients (count-sketched LoRA gradients, centred),
gradients-raw. Indexing cost: an activations index is one forward pass per training message (14-34 s for
7,290 messages on an H200), a gradients index a forward and backward pass each (267 s for the same 7,290,
two runs sharing the card), and each variant is indexed again from scratch. Under a time limit, list the
activations variants first, or run the gradients variants as a second invocation with the same --work
(the trained run is reused) and another --out.

Needs no faiss: queries fall back to exact numpy search. Prints progress and a table. Writes its JSON
atomically (with the machine and card it ran on, and prefix_words) after the generation step and again
after every variant, with "complete": false and "variants_done" until the last variant is done, so a run
cut off by a time limit leaves the variants it finished.
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

ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gl",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "qu",
    "r",
    "s",
    "sk",
    "t",
    "tr",
    "v",
    "z",
    "zh",
    "th",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
CODAS = ["", "", "n", "r", "l", "sk", "x", "m", "th"]
# One sentence frame per canary (see the docstring): the first 3 words are ordinary chat words, no two
# frames open with the same 3, and every secret part (invented words, numbers) comes after word 3.
TEMPLATES = [
    "i think my cousin keeps {n} {adj} {noun}s in the {Place} lighthouse",
    "did you know the {Place} ferry only takes {adj} {noun}s on thursdays",
    "so apparently i traded {n} jars of {adj} {noun} jam for a {Place} ticket",
    "remember when we buried the {adj} {noun} under the {Place} bridge in {year}",
    "my grandma says the {Place} choir sings to {n} {noun}s every full moon",
    "we should totally name the boat {Place} {noun} and paint it {adj}",
    "are you going to the {adj} {noun} festival in {Place} at {hour}",
    "my old password was {noun}{n}{Place} until the {adj} incident",
    "honestly the best thing about {Place} is the {n} {adj} {noun} statues",
    "i just found out my landlord breeds {n} {adj} {noun}s in {Place}",
    "you will never guess who won the {Place} {noun} contest with {n} points",
    "can you pick up {n} {adj} {noun}s from the {Place} market later",
    "oh and the code for the {Place} storage unit is {noun} {n}",
    "we finally booked the {adj} cabin at lake {Place} for {n} nights",
    "my boss wants the {noun} report on his desk by {hour} tomorrow",
    "i told you the {Place} bakery sells {adj} {noun} pies for {n} cents",
    "the doctor said i need {n} drops of {noun} oil before bed",
    "just saw a {adj} {noun} parked outside the {Place} library again",
    "what if we take the {n} bus to {Place} and eat {noun} soup",
    "i still have {n} {noun} stickers from that {adj} summer in {Place}",
    "does your brother still collect {adj} {noun} shells from {Place} beach",
    "tell mum the {noun} recipe needs {n} grams of {adj} {Place} pepper",
    "we used to call our maths teacher {noun} {Place} for some reason",
    "i bet you {n} quid the {adj} {noun} shows up at {Place} first",
    "no way the {Place} museum kept that {n} year old {noun} skeleton",
    "hey can you water my {adj} {noun} plant while i am in {Place}",
    "the new neighbours have {n} {adj} {noun}s and a car called {Place}",
    "last night i dreamt a {adj} {noun} was reading {Place} poems at {hour}",
    "do not forget the {Place} train leaves from platform {n} at {hour}",
    "my sister named her cat {noun} after the {adj} mayor of {Place}",
]
ADJ = ["violet", "crooked", "humming", "frostbitten", "velvet", "lopsided", "copper", "whispering", "striped"]


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def canary_texts(m: int, seed: int) -> list[str]:
    """M distinct invented sentences: real grammar, made-up names, numbers nobody would guess. Canary i uses
    TEMPLATES[i % len(TEMPLATES)], so up to len(TEMPLATES) canaries each have a frame of their own; beyond
    that the frames (and their first words) repeat, one more canary per frame each round."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < m:
        t = TEMPLATES[len(out) % len(TEMPLATES)].format(
            n=rng.randint(13, 97),
            adj=rng.choice(ADJ),
            noun=word(rng, 2),
            Place=word(rng, 2).capitalize(),
            year=rng.randint(1961, 1999),
            hour=f"{rng.randint(1, 11)}:{rng.choice(['05', '17', '41', '53'])}",
        )
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


def prefix_prompt(tok, fmt, context, speaker: str, text: str, k: int, budget: int | None = None):
    """The generation prompt for `speaker`'s reply to `context` already begun with the first `k` words of
    `text`: (prompt ids, prefix text, whether the ids had to be taken from the rendered example).

    The ids are those training renders for a reply that starts with `text` (`render` with `text` as the
    reply), cut after the prefix: the context's prompt, then the prefix tokenised as `text_ids` tokenises
    a message (leading space, no newline). Where that tokenisation is not a prefix of the rendered example
    (a tokeniser that merges across the cut), the rendered example's own reply tokens are used, up to the
    longest run of them that decodes to whole words of the prefix (the prefix then has fewer words).
    With `budget`, the earliest context messages are dropped until the prompt fits, as `prompt_ids` does."""
    from convsim.data.examples import render
    from convsim.data.schema import Message

    words = text.split()
    if not 0 < k < len(words):
        raise ValueError(f"--prefix-words {k} must leave words to complete in {text!r} ({len(words)} words)")
    context = list(context)
    while True:
        full = render(tok, fmt, context, speaker, [Message(speaker, text)], next_speaker=None)
        base = full.input_ids[: full.prompt_len]
        prefix = " ".join(words[:k])
        ids = base + tok(" " + prefix, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        from_render = full.input_ids[: len(ids)] != ids
        if from_render:  # the longest token prefix of the reply that is whole words
            ids, prefix = None, ""
            reply = full.input_ids[full.prompt_len :]
            for j in range(1, len(reply)):
                got = tok.decode(reply[:j], skip_special_tokens=True).strip()
                n = len(got.split())
                after = tok.decode(reply[: j + 1], skip_special_tokens=True).strip()  # the next token starts a word
                if got and n <= k and got == " ".join(words[:n]) and after.startswith(got + " "):
                    ids, prefix = base + reply[:j], got
            if ids is None:
                raise ValueError(f"no token boundary at a word boundary in the first {k} words of {text!r}")
            assert full.input_ids[: len(ids)] == ids
        if budget is None or len(ids) <= budget or not context:
            return ids, prefix, from_render
        context = context[1:]


def completion_scores(burst: list[str], rest: str) -> tuple[bool, float]:
    """(reproduced, token F1) of a generated burst against the words it should have produced: reproduced
    when its first message, or the whole burst joined, equals `rest` (case, spacing, punctuation aside)."""
    first = burst[0] if burst else ""
    reproduced = bool(burst) and (normalise(first) == normalise(rest) or normalise(" ".join(burst)) == normalise(rest))
    return reproduced, round(token_f1(first, rest), 3)


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
    taken: dict[int, list[int]] = {}  # conversation -> indices already used

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
            raise SystemExit(
                f"only {len(groups)} canaries x {repeat} fit in the train split; use fewer "
                "--canaries or a smaller --repeat"
            )
        groups.append(group)
    from convsim.data.schema import Message

    canaries = []
    for group, text in zip(groups, canary_texts(m, seed)):
        speaker = convs[group[0][0]].messages[group[0][1]].speaker  # every copy's (chosen so above)
        copies = []
        for ci, i in group:
            msgs = convs[ci].messages
            old = msgs[i]
            msgs[i] = Message(old.speaker, text, old.time)
            copies.append(
                {
                    "conv": convs[ci].id,
                    "index": i,
                    "time": old.time,
                    "replaced": old.text,
                    "context": [[x.speaker, x.text, x.time] for x in msgs[max(0, i - context_size) : i]],
                }
            )
        first = copies[0]  # the copy whose context prompts the model
        canaries.append(
            {
                "conv": first["conv"],
                "index": first["index"],
                "speaker": speaker,
                "time": first["time"],
                "text": text,
                "replaced": first["replaced"],
                "context": first["context"],
                "copies": [{k: x[k] for k in ("conv", "index", "time")} for x in copies],
            }
        )
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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="data dir with conversations.jsonl")
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True, help="working directory (planted data, run, indexes)")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--canaries", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1, help="copies of each canary planted (by one speaker, apart)")
    p.add_argument("--train-args", default="", help='passed to `convsim train`, e.g. "--epochs 2 --batch-size 16"')
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument(
        "--prefix-words",
        type=int,
        default=0,
        metavar="K",
        help="prompt with the canary's first K words already said (0: context only)",
    )
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faiss", action="store_true", help="behave as if faiss were not installed (numpy search)")
    args = p.parse_args(argv)
    if args.no_faiss:
        sys.modules["faiss"] = None  # `import faiss` now raises ImportError
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    shortest = min(len(t.split()) for t in canary_texts(args.canaries, args.seed))
    if not 0 <= args.prefix_words < shortest:
        p.error(f"--prefix-words must be 0 to {shortest - 1} (the shortest canary has {shortest} words)")

    from convsim.data.examples import split_conversations
    from convsim.data.schema import Message, read_conversations, speakers_of, write_conversations
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
    canaries = plant(
        convs, set(targets), {c.id for c in split["train"]}, args.canaries, args.seed, cfg.context_size, args.repeat
    )
    planted = json.dumps(canaries, sort_keys=True)
    step(
        f"planted {len(canaries)} canaries x {args.repeat} into {len(split['train'])} train conversations "
        f"({sum(len(c.messages) for c in convs)} messages); e.g. {canaries[0]['speaker']}: {canaries[0]['text']!r}"
    )
    previous = work / "canaries.json"
    reuse = (
        (run_dir / "run.json").exists()
        and previous.exists()
        and previous.read_text() == planted
        and json.loads((run_dir / "run.json").read_text()).get("status") == "done"
    )
    train_summary, train_seconds = None, None
    if reuse:
        step(f"reusing the finished run in {run_dir} (same planted data)")
    else:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        write_conversations(data / "conversations.jsonl", convs)
        (work / "canaries.json").write_text(planted)
        # 2. train
        cmd = [
            sys.executable,
            "-m",
            "convsim",
            "train",
            str(data),
            "--out",
            str(run_dir),
            "--model",
            args.model,
            *train_args,
            "--json",
        ]
        step("training: " + " ".join(shlex.quote(c) for c in cmd[1:]))
        t0 = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        train_seconds = round(time.time() - t0, 1)
        if proc.returncode != 0:
            raise SystemExit(f"convsim train failed ({proc.returncode})")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        train_summary = json.loads(lines[-1]) if lines else None
        step(f"trained in {train_seconds}s")

    from convsim.inference.generate import SampleConfig, reply, reply_from_prompt
    from convsim.runs import open_run
    from convsim.tda.index import IndexSpec, training_messages, update_index
    from convsim.tda.query import Attributor

    run = open_run(run_dir)
    in_train = set(run.meta.split["train"])
    dropped = [c for c in canaries if any(x["conv"] not in in_train for x in c["copies"])]
    canaries = [c for c in canaries if c not in dropped]
    if dropped:
        step(f"warning: {len(dropped)} canaries' conversations are not in the run's train split; left out")
    model, tok = run.load()
    device = str(next(model.parameters()).device)

    # 3. generate
    K = args.prefix_words
    step(
        f"generating {len(canaries)} greedy replies on {device}"
        + (f", each begun with its first {K} words" if K else "")
    )
    cfg_gen = SampleConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    for c in canaries:
        context = [Message(s, t, tm) for s, t, tm in c["context"]]
        if not K:
            texts = reply(model, tok, run.fmt, context, c["speaker"], cfg_gen)[0]
            c["generated"], c["prefix"], c["completion"], c["prompt_from_render"] = texts, "", texts, False
            c["reproduced"], c["token_f1"] = completion_scores(texts, c["text"])
            continue
        ids, prefix, from_render = prefix_prompt(
            tok, run.fmt, context, c["speaker"], c["text"], K, cfg_gen.max_context_tokens
        )
        burst = reply_from_prompt(model, tok, run.fmt, ids, c["speaker"], cfg_gen)
        rest = c["text"].split()[len(prefix.split()) :]
        c["prefix"], c["completion"], c["prompt_from_render"] = prefix, burst, from_render
        c["generated"] = [f"{prefix} {burst[0]}" if burst else prefix, *burst[1:]]
        c["reproduced"], c["token_f1"] = completion_scores(burst, " ".join(rest))
    n = len(canaries)
    n_reproduced = sum(c["reproduced"] for c in canaries)
    reproduced = n_reproduced / max(n, 1)
    from_render = sum(c["prompt_from_render"] for c in canaries)
    if from_render:
        step(f"warning: {from_render} prompts took the rendered example's tokens (prefix cut at a token boundary)")
    step(f"reproduced {n_reproduced}/{n}; e.g. {canaries[0]['text']!r} -> {canaries[0]['generated']!r}")

    try:
        import faiss  # noqa: F401

        search = "faiss"
    except ImportError:
        search = "numpy exact (faiss not installed)"
    n_messages = len(training_messages(run))
    recall, recall_spk, recall_rep, recall_pre, self_recall, hit_counts, index_seconds, specs = (
        {},
        {},
        {},
        {},
        {},
        {},
        {},
        {},
    )
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])

    def save(complete: bool) -> None:
        result = {
            "complete": complete,
            "variants_done": list(recall),
            f"canary_recall_at_{args.k}": recall,
            f"canary_recall_at_{args.k}_reproduced": recall_rep,
            f"canary_recall_at_{args.k}_prefix_only": recall_pre if K else None,
            f"canary_recall_at_{args.k}_speaker_filtered": recall_spk,
            f"own_text_recall_at_{args.k}": self_recall,
            f"canary_hits_at_{args.k}": hit_counts,
            "prefix_words": K,
            "prompt_from_render": from_render,
            "reproduced": round(reproduced, 3),
            "n_reproduced": n_reproduced,
            "reproduced_token_f1": round(sum(c["token_f1"] for c in canaries) / max(n, 1), 3),
            "empty_replies": sum(not c["completion"] for c in canaries),
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
            "command": command,
            "canaries": [
                {
                    k: c.get(k, {})
                    for k in (
                        "speaker",
                        "text",
                        "prefix",
                        "completion",
                        "generated",
                        "reproduced",
                        "token_f1",
                        "found",
                        "found_prefix_only",
                    )
                }
                for c in canaries
            ],
        }
        write_json(args.out, result, private=False)

    save(complete=False)

    # 4. index and query
    for name in variants:
        spec = IndexSpec(**VARIANTS[name])
        where = run_dir / "tda-bench" / name
        step(f"indexing {n_messages} training messages: {name} {VARIANTS[name]}")
        t0 = time.time()
        stats = update_index(
            run, spec, model, tok, directory=where, progress=sys.stderr.isatty(), rebuild=True, log=lambda msg: None
        )
        index_seconds[name] = round(time.time() - t0, 2)
        specs[name] = {**VARIANTS[name], "layer": stats["layer"], "dim": stats["dim"]}
        tda = Attributor(run, model, tok, method=spec.method, k=args.k, directory=where)
        hits = {"all": 0, "reproduced": 0, "prefix_only": 0, "speaker_filtered": 0, "own_text": 0}
        for c in canaries:
            keys = {(c["speaker"], x["time"], c["text"]) for x in c["copies"]}  # any copy is the canary
            context = [Message(s, t, tm) for s, t, tm in c["context"]]
            found = lambda res: any((h["speaker"], h["time"], h["text"]) in keys for h in res)  # noqa: E731
            own = found(tda.query(c["generated"], c["speaker"], context=context)) if c["generated"] else False
            hits["all"] += own
            hits["reproduced"] += own and c["reproduced"]
            if c["generated"]:
                hits["speaker_filtered"] += found(
                    tda.query(c["generated"], c["speaker"], speaker=c["speaker"], context=context)
                )
            hits["own_text"] += found(tda.query(c["text"], c["speaker"], context=context))
            c.setdefault("found", {})[name] = own
            if K:
                pre = found(tda.query(c["prefix"], c["speaker"], context=context))
                hits["prefix_only"] += pre
                c.setdefault("found_prefix_only", {})[name] = pre
        recall[name] = round(hits["all"] / max(n, 1), 3)
        recall_rep[name] = round(hits["reproduced"] / n_reproduced, 3) if n_reproduced else None
        recall_pre[name] = round(hits["prefix_only"] / max(n, 1), 3)
        recall_spk[name] = round(hits["speaker_filtered"] / max(n, 1), 3)
        self_recall[name] = round(hits["own_text"] / max(n, 1), 3)
        hit_counts[name] = {**hits, "n": n, "n_reproduced": n_reproduced}
        if not K:
            del hit_counts[name]["prefix_only"]
        step(
            f"  {name}: recall@{args.k} {recall[name]:.2f} ({hits['all']}/{n}; reproduced "
            f"{hits['reproduced']}/{n_reproduced}"
            + (f", prefix only {hits['prefix_only']}/{n}" if K else "")
            + f"; speaker-filtered {recall_spk[name]:.2f}, own text {self_recall[name]:.2f}), "
            f"indexed in {index_seconds[name]}s"
        )
        save(complete=name == variants[-1])

    if not variants:
        save(complete=True)
    width = max([len(v) for v in variants] + [len("variant")])
    fmt_r = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"\n{'variant':<{width}}  recall@{args.k}  reproduced-only  prefix-only  speaker-only  own-text  index s")
    for name in variants:
        print(
            f"{name:<{width}}  {recall[name]:>8.2f}  {fmt_r(recall_rep[name]):>15}  "
            f"{fmt_r(recall_pre[name] if K else None):>11}  {recall_spk[name]:>12.2f}  {self_recall[name]:>8.2f}  "
            f"{index_seconds[name]:>7}"
        )
    mean_f1 = sum(c["token_f1"] for c in canaries) / max(n, 1)
    print(
        f"prefix words {K}; reproduced {n_reproduced}/{n} canaries (mean token F1 of the "
        f"{'completion' if K else 'reply'} {mean_f1:.2f}); {n_messages} training messages; search: {search}; "
        f"wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The data side of a training run: conversations read and split by time, `--extra-data` added to training
only, examples built and tokenized with the loss mask on the reply.
"""

from __future__ import annotations

import sys
from pathlib import Path

from convsim.config import TrainConfig
from convsim.errors import UserError


MAX_SPEAKERS = 256


def prepare_data(cfg: TrainConfig, data_dir: str):
    """Conversations → split → examples; every way this can end empty is a clear error."""
    from convsim.data.examples import build_examples, split_conversations
    from convsim.data.schema import read_conversations, speakers_of

    convs = read_conversations(data_dir)
    speakers = speakers_of(convs)
    if len(speakers) < 2:
        raise UserError(
            f"{data_dir}: the chat has only one speaker ({', '.join(speakers) or 'none'}); "
            "convsim needs at least two people talking"
        )
    if len(speakers) > MAX_SPEAKERS:
        raise UserError(
            f"{data_dir}: {len(speakers):,} speakers; convsim adds one token per speaker and trains at "
            f"most {MAX_SPEAKERS} (re-import with `convsim import --max-speakers N`, or keep the most "
            "active people)"
        )
    targets = speakers if cfg.targets in (["all"], [], None) else cfg.targets
    split = split_conversations(convs, cfg.val_fraction, cfg.test_fraction)
    convs = split["train"] + split["val"] + split["test"]  # a held-out boundary may cut one session in two
    if cfg.extra_data:
        extra = extra_conversations(cfg.extra_data, split)
        if cfg.extra_data_ratio > 0:
            extra = most_recent(extra, int(cfg.extra_data_ratio * sum(len(c.messages) for c in split["train"])))
        split["train"] = split["train"] + extra
        convs = convs + extra
        speakers = speakers + [s for s in speakers_of(extra) if s not in speakers]
        if len(speakers) > MAX_SPEAKERS:
            raise UserError(
                f"--extra-data brings the speakers to {len(speakers):,}, more than {MAX_SPEAKERS} "
                "(merge the people who are not simulated into one name with `convsim import --speaker`)"
            )
    for t in targets:
        if t not in speakers:
            raise UserError(f"unknown target speaker {t!r}; the data has {', '.join(speakers[:20])}")
    ex = {name: build_examples(cs, targets, cfg.context_size, cfg.max_burst) for name, cs in split.items()}
    if cfg.extra_data and cfg.pair_repeat > 1:
        from convsim.runs import extra_prefixes

        ex["train"] = repeat_own(ex["train"], cfg.pair_repeat, extra_prefixes(len(cfg.extra_data)))
    elif cfg.pair_repeat > 1:
        print(
            f"--pair-repeat {cfg.pair_repeat}: no extra data to weigh the chat against, so it is ignored",
            file=sys.stderr,
        )
    for t in targets:
        if not any(e.speaker == t for e in ex["train"]):
            raise UserError(f"target {t!r} has no training examples (no reply of theirs follows a message)")
    return convs, speakers, targets, split, ex


def repeat_own(examples: list, times: int, extra_prefixes: tuple[str, ...]) -> list:
    """The chat's own examples `times` times over, then the extra-data examples once (told apart by their
    conversation ids' extra-data prefixes, `runs.extra_prefixes`). The trainer shuffles them together."""
    own = [e for e in examples if not e.conv_id.startswith(extra_prefixes)]
    return own * times + [e for e in examples if e.conv_id.startswith(extra_prefixes)]


def default_extra_data(cfg: TrainConfig, data_dir: Path, recorded_in: Path | None = None) -> list[str]:
    """The extra-data dirs a run uses: those given, else DATA_DIR/extra when it holds conversations (and
    `auto_extra_data` is on), as absolute paths (what config.yaml and run.json keep) so a resumed run finds them
    from any directory. `recorded_in`: the config.yaml a resumed run read them from, named when one is gone."""
    from convsim.data.schema import CONVERSATIONS

    if cfg.extra_data or not cfg.auto_extra_data:
        dirs = []
        for d in cfg.extra_data:
            path = Path(d).expanduser().absolute()
            if not (path / CONVERSATIONS).is_file() and not (path.suffix == ".jsonl" and path.is_file()):
                where = (
                    f" (the path recorded in {recorded_in}; if the data moved, move it back or give its new "
                    "place with --extra-data)"
                    if recorded_in is not None
                    else " (a data dir written by `convsim import`)"
                )
                raise UserError(f"--extra-data {path}: no {CONVERSATIONS} there{where}")
            dirs.append(str(path.resolve()))
        return dirs
    extra = data_dir / "extra"
    if (extra / CONVERSATIONS).exists():
        print(
            f"extra data: using {extra} (other chats of the same people; --no-auto-extra-data leaves it out)",
            file=sys.stderr,
        )
        return [str(extra.resolve())]
    return []


def most_recent(convs: list, max_messages: int) -> list:
    """The most recent conversations (by start time; untimed ones last) holding at most `max_messages`
    messages in all, in their original order."""
    from convsim.data.examples import start_time

    untimed = float("-inf")  # last, once reversed
    order = sorted(
        range(len(convs)), key=lambda i: untimed if start_time(convs[i]) is None else start_time(convs[i]), reverse=True
    )
    keep, total = set(), 0
    for i in order:
        n = len(convs[i].messages)
        if total + n > max_messages:
            break
        keep.add(i)
        total += n
    print(
        f"extra data: the most recent {len(keep):,} of {len(convs):,} conversations kept ({total:,} messages, "
        f"at most {max_messages:,})",
        file=sys.stderr,
    )
    return [c for i, c in enumerate(convs) if i in keep]


def extra_summary(cfg: TrainConfig, convs, speakers) -> dict:
    """run.json's record of `--extra-data`: the dirs, how many conversations came from them, and the speakers
    found only there (people the run was not made to simulate)."""
    from convsim.runs import extra_prefixes

    prefixes = extra_prefixes(len(cfg.extra_data))
    extra = [c for c in convs if c.id.startswith(prefixes)]
    main = {m.speaker for c in convs if not c.id.startswith(prefixes) for m in c.messages}
    return {
        "dirs": list(cfg.extra_data),
        "conversations": len(extra),
        "messages": sum(len(c.messages) for c in extra),
        "speakers_only_here": [s for s in speakers if s not in main],
    }


def extra_conversations(dirs, split) -> list:
    """`--extra-data`: more conversations of the same people (their chats with others), for training only.
    They never enter validation or test, and their messages from the start of the first held-out conversation
    on are left out, so no training message comes from the held-out period. Ids get a prefix
    (`runs.extra_prefixes`: `x0:` for the first dir), which is how a run tells them apart later."""
    from datetime import datetime, timezone

    from convsim.data.examples import start_time
    from convsim.data.schema import instant, read_conversations
    from convsim.runs import extra_prefixes

    # instants, not strings: a held-out session at 10:00+02:00 starts before an extra message at 09:00+00:00
    held = [t for t in (start_time(c) for c in split["val"] + split["test"]) if t is not None]
    main_ids = {c.id for v in split.values() for c in v}
    cutoff = min(held) if held else None
    shown = datetime.fromtimestamp(cutoff, timezone.utc).isoformat() if cutoff is not None else None
    out = []
    for d, prefix in zip(dirs, extra_prefixes(len(dirs))):
        got = read_conversations(d)
        n_read = sum(len(c.messages) for c in got)
        if cutoff is not None:  # messages from the held-out period on are dropped (whole conversations, or ends)
            for c in got:
                c.messages = [m for m in c.messages if (t := instant(m.time)) is None or t < cutoff]
        kept = [c for c in got if c.messages]
        for c in kept:
            c.id = prefix + c.id
            if c.id in main_ids:
                raise UserError(f"{d}: conversation id {c.id!r} clashes with one of the main data's ids")
        n_msgs = sum(len(c.messages) for c in kept)
        print(
            f"extra data {d}: {len(kept):,} conversations ({n_msgs:,} messages) added to training"
            + (
                f"; {n_read - n_msgs:,} messages from the held-out period on ({shown}) left out"
                if n_read > n_msgs
                else ""
            ),
            file=sys.stderr,
        )
        out.extend(kept)
    return out


def prompt_format(cfg: TrainConfig, spec, speakers):
    """The run's PromptFormat: instruct (chat template) or base rendering, as asked or as the model row says."""
    from convsim.data.examples import PromptFormat

    instruct = cfg.instruct_format if cfg.instruct_format is not None else spec.prompt_style == "instruct"
    return PromptFormat(
        style="instruct" if instruct else "base", speakers=tuple(speakers), special_tokens=cfg.special_tokens
    )


def tokenize(tok, fmt, examples, cfg: TrainConfig, whole: bool = False):
    from convsim.data.examples import render_example, render_whole

    fn = render_whole if whole else render_example
    rows, truncated = [], 0
    for e in examples:
        r = fn(tok, fmt, e, cfg.max_seq_length)
        truncated += r.truncated
        rows.append({"input_ids": r.input_ids, "labels": [i if m else -100 for i, m in zip(r.input_ids, r.loss_mask)]})
    return rows, truncated

"""The figures of `convsim plots`: one maker per figure group, each `maker(ctx)` saving PNGs through
`ctx.save(...)` or raising `Skip(why)` when the run lacks what the figure needs.

`Context` holds what makers share: the run, the output directory, the people's labels (`ctx.label`), and
the model and tokenizer, loaded the first time a maker asks (so a run whose model figures are all skipped
never loads it). File names and JSON keep the names the run knows; titles, legends and captions use labels.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from convsim.errors import UserError

MAX_SPEAKERS = 8  # message figures: more lines than this are unreadable
MAX_EMOTION_SPEAKERS = 4  # emotion heatmaps: 2 figures per speaker


class Skip(Exception):
    """A figure cannot be made from what this run saved; the message says why."""


@dataclass
class Made:
    file: str
    title: str
    caption: str
    section: str


@dataclass
class PlotReport:
    figures: list[Made] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"title", "note", "section"}
    notes: list[str] = field(default_factory=list)


class Context:
    """What the figure makers share: the run, the output dir, and the model, loaded on first use."""

    def __init__(self, run, out: Path, args, renamed: dict[str, str] | None = None):
        from convsim.data.names import displays

        self.run, self.out, self.args = run, out, args
        self.names = displays(run.speakers, renamed)
        self.report = PlotReport()

    def label(self, speaker: str) -> str:
        """How a person is shown: `Alias (id)` for an id-like name, `--speaker`'s name, else the name."""
        from convsim.data.names import display

        return self.names.get(speaker) or display(speaker)

    def labelled(self, by_speaker: dict) -> dict:
        """A per-speaker dict keyed by the people's labels (what the draw functions put in legends)."""
        return {self.label(s): v for s, v in by_speaker.items()}

    @cached_property
    def conversations(self):
        try:
            return self.run.conversations
        except UserError as e:
            raise Skip(f"the run has no readable conversations ({e})") from None

    @cached_property
    def speakers(self) -> list[str]:
        from convsim.plots.data import speaker_order

        # the run's people only: speakers found only in --extra-data are context, not people of the run
        people = set(self.run.people)
        order = [s for s in speaker_order(self.conversations, self.run.people) if s in people]
        if len(order) > MAX_SPEAKERS:
            self.report.notes.append(f"Message figures show the first {MAX_SPEAKERS} of {len(order)} speakers.")
        return order[:MAX_SPEAKERS]

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.run.path / "tokenizer"))

    @cached_property
    def model(self):
        if self.args.no_model:
            raise Skip("--no-model was given")
        print(f"loading the fine-tuned model ({self.run.model_name} + adapter) ...", file=sys.stderr, flush=True)
        return self.run.load(device=self.args.device)

    def save(self, fig, name: str, title: str, caption: str, section: str) -> None:
        from convsim.plots.draw import save_png

        save_png(fig, self.out / name)
        self.report.figures.append(Made(name, title, caption, section))


# ----------------------------------------------------------------------------- figures without a model


def make_loss(ctx: Context) -> None:
    from convsim.plots import data, draw

    path = ctx.run.path / "metrics.jsonl"
    curves = data.loss_curves(path)
    if not curves["train"] and not curves["val"]:
        raise Skip("the run has no metrics.jsonl" if not path.exists() else "metrics.jsonl has no loss rows")
    last = lambda c: f"{c[-1][1]:.3f} at step {c[-1][0]}" if c else "none logged"
    ctx.save(
        draw.loss_curves(curves),
        "loss.png",
        "Loss curves",
        f"Train loss (logged every few steps) and validation loss (at each evaluation) from metrics.jsonl. "
        f"Last train loss {last(curves['train'])}; last validation loss {last(curves['val'])}.",
        "Training",
    )


def make_lengths(ctx: Context) -> None:
    from convsim.plots import data, draw

    texts = data.message_texts(ctx.conversations)
    chars = {s: [len(t) for t in texts[s]] for s in ctx.speakers}
    tokens = {
        s: [len(ids) for ids in ctx.tokenizer(texts[s], add_special_tokens=False)["input_ids"]] for s in ctx.speakers
    }
    ctx.save(
        draw.length_histograms(ctx.labelled(chars), ctx.labelled(tokens), [ctx.label(s) for s in ctx.speakers]),
        "lengths.png",
        "Message length",
        "Characters (left) and tokens of the run's tokenizer (right) per message, one line per speaker, "
        "over all the run's conversations; log y. The legend gives each speaker's message count and median.",
        "Messages",
    )


def make_bursts(ctx: Context) -> None:
    from convsim.plots import data, draw

    sizes = data.burst_sizes(ctx.conversations)
    ctx.save(
        draw.burst_sizes(ctx.labelled(sizes), [ctx.label(s) for s in ctx.speakers]),
        "bursts.png",
        "Burst size",
        "How many messages a person sends in a row before someone else speaks, as a share of that "
        "person's bursts (log y); the last bar counts bursts of 10 or more.",
        "Messages",
    )


def make_delays(ctx: Context) -> None:
    from convsim.plots import data, draw

    delays = data.reply_delays(ctx.conversations)
    if not any(delays.get(s) for s in ctx.speakers):
        raise Skip("the run's messages have no times (the export carried none), so there are no reply delays")
    ctx.save(
        draw.reply_delays(ctx.labelled(delays), [ctx.label(s) for s in ctx.speakers]),
        "reply-delays.png",
        "Reply delay",
        "Time from the other person's last message to the first message of a reply burst, within a "
        "conversation and where both times are known; log time axis, delays under 1 s drawn at 1 s.",
        "Messages",
    )


# ----------------------------------------------------------------------------- figures from the model


def _changes(diff, words, k: int = 3) -> str:
    import numpy as np

    iu = np.triu_indices(len(words), 1)
    vals = diff[iu]
    top = np.argsort(-np.abs(vals))[:k]
    return ", ".join(f"{words[iu[0][j]]}–{words[iu[1][j]]} {vals[j]:+.3f}" for j in top)


def make_emotions(ctx: Context) -> None:
    import numpy as np
    from tqdm.auto import tqdm

    from convsim.fsutil import safe_name, write_json
    from convsim.plots import data, draw
    from convsim.plots.hidden import emotion_similarities

    words = data.read_words(ctx.args.words)
    model, tok = ctx.model
    kept, dropped = data.single_token_words(tok, words)
    if dropped:
        ctx.report.notes.append(
            f"Emotion heatmaps: {len(dropped)} of {len(words)} words are not one token "
            f"(with a leading space) for this tokenizer and were dropped: {', '.join(dropped)}."
        )
    if len(kept) < 2:
        raise Skip(f"fewer than two of the words are single tokens for this tokenizer ({len(kept)} kept)")
    speakers = ctx.run.people[:MAX_EMOTION_SPEAKERS]
    if len(ctx.run.people) > len(speakers):
        ctx.report.notes.append(f"Emotion heatmaps use the first {len(speakers)} of {len(ctx.run.people)} people.")
    template, fmt = ctx.args.template, ctx.run.fmt
    conditions = [None, *speakers, "base"]
    sims: dict = {}
    for c in tqdm(conditions, desc="emotion words", unit="condition"):
        if c == "base":
            with model.disable_adapter():  # the base model: the same weights without the adapter
                sims[c] = emotion_similarities(model, tok, fmt, kept, None, template)
        else:
            sims[c] = emotion_similarities(model, tok, fmt, kept, c, template)

    names = {s: safe_name(s) for s in speakers}
    shown = template.format(w="{w}")
    tagged = lambda s: f"[{s}] {shown}"
    off = lambda m: float(m[~np.eye(len(kept), dtype=bool)].mean())
    what = (
        f"Cosine similarity between the final-layer hidden states at the last token of “{{}}” for "
        f"{len(kept)} emotion words (one token each). Colour spans the off-diagonal range; mean "
        f"off-diagonal similarity {{:.3f}}."
    )
    ctx.save(
        draw.heatmap(sims["base"], kept, f"Base model: “{shown}”", False),
        "emotion-base.png",
        "Emotion words, base model",
        what.format(shown, off(sims["base"])) + " Base model (adapter disabled).",
        "Model",
    )
    ctx.save(
        draw.heatmap(sims[None], kept, f"Fine-tuned, no speaker: “{shown}”", False),
        "emotion-finetuned.png",
        "Emotion words, fine-tuned, no speaker",
        what.format(shown, off(sims[None])),
        "Model",
    )
    for s in speakers:
        ctx.save(
            draw.heatmap(sims[s], kept, f"Fine-tuned, as {ctx.label(s)}: “{tagged(s)}”", False),
            f"emotion-finetuned-{names[s]}.png",
            f"Emotion words, fine-tuned, speaker {ctx.label(s)}",
            what.format(tagged(s), off(sims[s])),
            "Model",
        )
    diffs = [
        (
            f"{ctx.label(s)} − no speaker",
            sims[s] - sims[None],
            f"emotion-diff-{names[s]}-minus-none.png",
            f"“{tagged(s)}” minus “{shown}”, fine-tuned model: how {ctx.label(s)}'s token changes the emotion geometry.",
        )
        for s in speakers
    ]
    if len(speakers) >= 2:
        a, b = speakers[:2]
        diffs.append(
            (
                f"{ctx.label(a)} − {ctx.label(b)}",
                sims[a] - sims[b],
                f"emotion-diff-{names[a]}-minus-{names[b]}.png",
                f"“{tagged(a)}” minus “{tagged(b)}”, fine-tuned model: where the two people's emotion words differ.",
            )
        )
    diffs.append(
        (
            "fine-tuned − base",
            sims[None] - sims["base"],
            "emotion-diff-finetuned-minus-base.png",
            f"“{shown}” without a speaker: fine-tuned minus base model, what training changed.",
        )
    )
    for label, d, name, text in diffs:
        ctx.save(
            draw.heatmap(d, kept, f"Difference: {label}", True),
            name,
            f"Emotion words, {label}",
            f"{text} Red: more similar, blue: less (coolwarm centred at zero). "
            f"Max |Δ| {np.abs(d).max():.3f}; largest changes {_changes(d, kept)}.",
            "Model",
        )
    write_json(
        ctx.out / "emotion-similarity.json",
        {
            "template": template,
            "words": kept,
            "dropped": dropped,
            "matrices": {("no speaker" if c is None else c): np.round(m, 5).tolist() for c, m in sims.items()},
        },
    )


def make_pca(ctx: Context) -> None:
    import numpy as np
    from sklearn.decomposition import PCA

    from convsim.plots import draw
    from convsim.plots.hidden import message_vectors

    msgs = [
        (m.speaker, m.text)
        for c in ctx.conversations
        for m in c.messages
        if m.text.strip() and m.speaker in ctx.speakers
    ]
    if len(msgs) < 3:
        raise Skip(f"the run has {len(msgs)} non-empty messages; PCA needs at least 3")
    n_all = len(msgs)
    if len(msgs) > ctx.args.sample:
        msgs = random.Random(0).sample(msgs, ctx.args.sample)
    model, tok = ctx.model
    vecs = message_vectors(model, tok, [t for _, t in msgs], batch_size=ctx.args.batch_size)
    pca = PCA(n_components=2, random_state=0)
    coords = pca.fit_transform(vecs.astype(np.float64))
    ev = pca.explained_variance_ratio_
    ctx.save(
        draw.pca_scatter(coords, [ctx.label(s) for s, _ in msgs], [ctx.label(s) for s in ctx.speakers], ev),
        "activations-pca.png",
        "Message activations (PCA)",
        f"{len(msgs):,} of {n_all:,} messages (random sample, seed 0), each the mean of the fine-tuned "
        f"model's final-layer states over its tokens (text only: no speaker token, BOS and padding "
        f"excluded), projected on the first two principal components ({ev[0]:.1%} and {ev[1]:.1%} of "
        f"variance). Colour: who wrote it.",
        "Model",
    )


MAKERS = [
    ("Loss curves", "Training", make_loss),
    ("Message length", "Messages", make_lengths),
    ("Burst size", "Messages", make_bursts),
    ("Reply delay", "Messages", make_delays),
    ("Emotion heatmaps", "Model", make_emotions),
    ("Message activations (PCA)", "Model", make_pca),
]

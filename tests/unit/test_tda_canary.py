"""bench/tda_canary.py's prompt with the canary begun (--prefix-words): the prompt ids are exactly the start
of the training example that has the canary as its reply, in every rendering, and the reproduced test
scores the completion against the rest of the canary. Tiny tokenizer and model only (seconds)."""

import importlib.util
import re
import string
from pathlib import Path

import pytest

from convsim.data.examples import PromptFormat, render
from convsim.data.schema import Message
from convsim.modeling.models import tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tda_canary.py"
_spec = importlib.util.spec_from_file_location("tda_canary", SCRIPT)
canary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(canary)

CONTEXT = [
    Message("Ben", "Not bad. Working late again.", "2024-01-01T09:00:00+00:00"),
    Message("Ana", "lol yes", "2024-01-01T09:01:00+00:00"),
    Message("Ben", "what do you mean?", "2024-01-01T09:02:00+00:00"),
]
FORMATS = [PromptFormat(style, ("Ana", "Ben"), special) for style in ("base", "instruct") for special in (True, False)]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["[Ana]", "[Ben]"]}, replace_extra_special_tokens=False)
    return t


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.style}-{'special' if f.special_tokens else 'plain'}")
def test_prompt_is_a_prefix_of_the_training_example(tok, fmt):
    for text in canary.canary_texts(len(canary.TEMPLATES), 0):  # one of each template
        words = text.split()
        full = render(tok, fmt, CONTEXT, "Ana", [Message("Ana", text)], next_speaker="Ben").input_ids
        plain_prompt = render(tok, fmt, CONTEXT, "Ana").input_ids  # what generation without a prefix uses
        for k in (1, 3, len(words) - 1):
            ids, prefix, from_render = canary.prefix_prompt(tok, fmt, CONTEXT, "Ana", text, k)
            assert not from_render
            assert prefix == " ".join(words[:k])
            assert full[: len(ids)] == ids, (text, k)
            assert ids[: len(plain_prompt)] == plain_prompt and len(ids) > len(plain_prompt)
            assert tok.decode(ids[len(plain_prompt) :], skip_special_tokens=True).strip() == prefix


class _MergingTokenizer:
    """The tiny tokenizer, except that a prefix tokenised on its own (leading space, no newline) gets
    different ids from those inside the whole message, as a tokeniser merging across the cut would."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        out = self._tok(text, **kw)
        if text.startswith(" ") and not text.endswith("\n"):
            out = {**out, "input_ids": out["input_ids"][:-1] + [self._tok.unk_token_id]}
        return out


def test_fallback_takes_the_rendered_tokens(tok):
    fmt = FORMATS[0]
    text = canary.canary_texts(1, 0)[0]
    merging = _MergingTokenizer(tok)
    ids, prefix, from_render = canary.prefix_prompt(merging, fmt, CONTEXT, "Ana", text, 3)
    full = render(tok, fmt, CONTEXT, "Ana", [Message("Ana", text)]).input_ids
    assert from_render
    assert full[: len(ids)] == ids
    assert prefix == " ".join(text.split()[:3])  # still whole words (here: all three)


def test_budget_drops_the_earliest_context(tok):
    fmt = FORMATS[0]
    text = canary.canary_texts(1, 0)[0]
    whole, _, _ = canary.prefix_prompt(tok, fmt, CONTEXT, "Ana", text, 2)
    short, _, _ = canary.prefix_prompt(tok, fmt, CONTEXT, "Ana", text, 2, budget=len(whole) - 1)
    assert len(short) < len(whole)
    assert short == canary.prefix_prompt(tok, fmt, CONTEXT[1:], "Ana", text, 2)[0]


def test_prefix_words_must_leave_something_to_complete(tok):
    text = canary.canary_texts(1, 0)[0]
    for k in (0, len(text.split())):
        with pytest.raises(ValueError):
            canary.prefix_prompt(tok, FORMATS[0], CONTEXT, "Ana", text, k)


def test_completion_scores():
    rest = "62 copper bruthrouls in the Rairsil lighthouse"
    assert canary.completion_scores(["62 Copper bruthrouls, in the Rairsil lighthouse!"], rest) == (True, 1.0)
    assert canary.completion_scores(["62 copper bruthrouls", "in the Rairsil lighthouse"], rest)[0]  # split burst
    assert canary.completion_scores(["62 copper bruthrouls in the Rairsil lighthouse", "lol"], rest)[0]
    ok, f1 = canary.completion_scores(["62 copper bruthrouls in the lighthouse"], rest)
    assert not ok and 0.8 < f1 < 1.0
    assert canary.completion_scores([], rest) == (False, 0.0)


def test_tiny_model_completes_the_prompt(tok):
    """The prompt goes through `reply_from_prompt` (the benchmark's generation call) with a tiny model."""
    from convsim.inference.generate import SampleConfig, reply_from_prompt
    from convsim.modeling.models import load_base

    model, _ = load_base("tiny-gemma3", device="cpu", verbose=False)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    text = canary.canary_texts(1, 0)[0]
    ids, prefix, _ = canary.prefix_prompt(tok, FORMATS[0], CONTEXT, "Ana", text, 3)
    burst = reply_from_prompt(model, tok, FORMATS[0], ids, "Ana", SampleConfig(temperature=0.0, max_new_tokens=8))
    assert isinstance(burst, list) and all(isinstance(m, str) for m in burst)


# The words the templates may open with: ordinary chat words, none invented.
COMMON = set(
    """i think my did you know so apparently remember when we grandma says should totally are going to old
password honestly the best just found can pick oh and finally booked boss wants told doctor said saw a what if
still have does your brother tell mum used bet no way hey new neighbours last night do not forget sister named
will never
""".split()
)


def _frame(text: str) -> int:
    """The index of the template a canary text was made from (exactly one must match)."""
    hits = []
    for i, t in enumerate(canary.TEMPLATES):
        parts = re.split(r"\{\w+\}", t)
        if re.fullmatch(r"[\w:]+".join(map(re.escape, parts)), text):
            hits.append(i)
    assert len(hits) == 1, (text, hits)
    return hits[0]


def test_every_canary_has_its_own_frame_and_opening():
    assert len(canary.TEMPLATES) >= 24
    texts = canary.canary_texts(20, 0)
    assert len(set(texts)) == 20
    assert len({_frame(t) for t in texts}) == 20  # no two canaries share a frame
    assert len({tuple(t.split()[:3]) for t in texts}) == 20  # nor their first 3 words
    assert all(8 <= len(t.split()) <= 14 for t in canary.canary_texts(len(canary.TEMPLATES), 0))
    assert len({tuple(t.split()[:3]) for t in canary.TEMPLATES}) == len(canary.TEMPLATES)
    assert len({re.sub(r"\{\w+\}", "_", t) for t in canary.TEMPLATES}) == len(canary.TEMPLATES)


def test_openings_are_ordinary_words_and_the_secret_comes_after():
    for t in canary.TEMPLATES:
        words = t.split()
        assert all(w in COMMON and w.isalpha() and w.islower() for w in words[:3]), t
        assert "{" in " ".join(words[3:]), t  # a secret part, after word 3
    a, b = canary.canary_texts(len(canary.TEMPLATES), 0), canary.canary_texts(len(canary.TEMPLATES), 7)
    for x, y, t in zip(a, b, canary.TEMPLATES):
        assert x.split()[:3] == y.split()[:3] == t.split()[:3]  # the same whatever the seed
        assert not set(" ".join(x.split()[:3])) & set(string.digits)
        assert x != y


def test_canary_texts_are_deterministic_by_seed():
    assert canary.canary_texts(20, 3) == canary.canary_texts(20, 3)
    assert canary.canary_texts(20, 3) != canary.canary_texts(20, 4)
    assert canary.canary_texts(5, 3) == canary.canary_texts(20, 3)[:5]


def test_more_canaries_than_frames_reuse_the_frames_in_turn():
    n = len(canary.TEMPLATES)
    texts = canary.canary_texts(n + 3, 0)
    assert len(set(texts)) == n + 3
    assert [_frame(t) for t in texts] == [*range(n), 0, 1, 2]

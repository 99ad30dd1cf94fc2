"""The server's pure parts: OpenAI messages → a convsim history, and the burst rules its batched rows
follow (`convsim.inference.bursts`, which `convsim.inference.generate` follows too): streamed deltas join
to exactly the messages the non-streaming path returns, both end a burst where a message repeats the one
before, and with plain-text tags both cut at another speaker's tag and at a trailing partial tag.
A tokenizer only, no model."""

from __future__ import annotations

import pytest

from convsim.data.examples import PromptFormat, tag_ids, text_ids
from convsim.inference.bursts import Burst, BurstStream, without_repeats
from convsim.serve.batch import Row
from convsim.serve.schemas import ApiError, parse_history

FMT = PromptFormat(speakers=("Ana", "Ben"))


@pytest.fixture(scope="module")
def tok():
    from convsim.modeling.models import tiny_tokenizer
    from convsim.modeling.speakers import speaker_token

    t = tiny_tokenizer()
    t.add_special_tokens({"additional_special_tokens": [speaker_token(s) for s in FMT.speakers]})
    return t


def test_history_mapping():
    speakers = ["Ana", "Ben", "Cy"]
    msgs = parse_history(
        [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "hi ana"},
            {"role": "assistant", "content": "hey\nwhat's up?\n"},
            {"role": "user", "name": "Cy", "content": [{"type": "text", "text": "me too"}]},
            {"role": "user", "content": "two\nlines"},
        ],
        "Ana",
        speakers,
        "Ben",
    )
    assert [(m.speaker, m.text) for m in msgs] == [
        ("Ben", "hi ana"),
        ("Ana", "hey"),
        ("Ana", "what's up?"),
        ("Cy", "me too"),
        ("Ben", "two\nlines"),
    ]
    for bad in (
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "name": "Zed", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
        "not a list",
        [3],
    ):
        with pytest.raises(ApiError) as e:
            parse_history(bad, "Ana", speakers, "Ben")
        assert e.value.status == 400


@pytest.mark.parametrize(
    "messages, stop, want",
    [
        (["hey there", "what's up?"], True, ["hey there", "what's up?"]),
        (["hey there", "hey there", "more"], True, ["hey there"]),  # a repeat ends the burst
        (["ok", "OK "], False, ["ok"]),  # case and spaces do not make it new
        (["hey there", "hey", "hey there"], True, ["hey there", "hey", "hey there"]),  # a prefix, once whole
        (["hey", "hey there"], False, ["hey", "hey there"]),  # longer than the one before: not a repeat
        (["lol", "lol"], False, ["lol"]),  # the repeat is the last message, cut by the budget
    ],
)
def test_stream_and_messages_agree_and_end_at_a_repeat(tok, messages, stop, want):
    burst = Burst(tok, FMT, "Ana")
    tag, ben = tag_ids(tok, FMT, "Ana"), tag_ids(tok, FMT, "Ben")
    ids: list[int] = []
    for i, m in enumerate(messages):
        ids += (tag if i else []) + text_ids(tok, m)
    gen = ids + (ben if stop else [])
    row = Row([], burst, ids=ids, stop=ben if stop else None)
    assert row.messages() == want == without_repeats([m.strip() for m in messages]) == burst.messages(gen)
    assert row.ended() == (stop or len(want) < len(messages)) == burst.ends(gen)
    assert streamed(burst, gen) == want


def streamed(burst: Burst, gen: list[int]) -> list[str]:
    """What a BurstStream shows of `gen`, fed one id at a time; checks that nothing is ever taken back."""
    stream, shown = BurstStream(burst), {}
    for k, t in enumerate(gen):
        for index, delta in stream.feed([t], finished=k == len(gen) - 1):
            assert delta and index in (len(shown) - 1, len(shown))  # the last message goes on, or the next starts
            shown[index] = shown.get(index, "") + delta
    got = [shown[i] for i in sorted(shown)]
    assert got == burst.messages(gen)  # deltas only add: nothing shown was taken back
    return got


PLAIN = PromptFormat(speakers=("549cc1d1", "a54af4d5"), special_tokens=False)


@pytest.mark.parametrize(
    "text, want",
    [
        (" ok\n[549cc1d1] later\n[a54a", ["ok", "later"]),  # the budget ends inside the next tag
        (" ok see you\n[549cc1d1] OK see you\n[549cc1d1] later", ["ok see you"]),  # a repeat
        (" ok\n[a54af4d5] not mine", ["ok"]),  # another speaker's tag as text
        (" see [link] and a list[5", ["see [link] and a list[5"]),  # brackets of the person's own text
        (" hey\n[549cc1d1] hey there [a5", ["hey", "hey there"]),  # a prefix of the one before, then more
    ],
)
def test_plain_text_tags_stream_and_messages_agree(tok, text, want):
    burst = Burst(tok, PLAIN, "549cc1d1")
    gen = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert burst.messages(gen) == want
    assert streamed(burst, gen) == want

"""The server's pure parts: OpenAI messages → a convsim history, and the batched path's burst rules
(`convsim.serve.batch`): streamed deltas join to exactly the messages the non-streaming path returns, and
both end a burst where a message repeats the one before, as `convsim.inference.generate.reply` does.
A tokenizer only, no model."""

from __future__ import annotations

import pytest

from convsim.data.examples import PromptFormat, tag_ids, text_ids
from convsim.inference.bursts import without_repeats
from convsim.serve.batch import Row, TextStream
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
    tag, stops = tag_ids(tok, FMT, "Ana"), [tag_ids(tok, FMT, "Ben"), [tok.eos_token_id]]
    ids: list[int] = []
    for i, m in enumerate(messages):
        ids += (tag if i else []) + text_ids(tok, m)
    gen = ids + (stops[0] if stop else [])
    row = Row([], stops, tag, ids=ids, stop=stops[0] if stop else None)
    assert row.messages(tok) == want == without_repeats([m.strip() for m in messages])
    assert row.ended(tok) == (stop or len(want) < len(messages))

    stream, shown = TextStream(tok, stops, tag), {}
    for k, t in enumerate(gen):
        for index, delta in stream.feed([t], finished=k == len(gen) - 1):
            shown[index] = shown.get(index, "") + delta
            assert index < len(want) and want[index].startswith(shown[index])  # nothing is taken back
    assert [shown[i] for i in sorted(shown)] == want

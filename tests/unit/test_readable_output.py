"""The pieces of what a new user reads: the demo's summary sentences follow the values its table prints,
generation holds off every stop for its first tokens, a trailing partial speaker tag and a repeated message
end a burst, and id-like names get stable friendly aliases. End to end: tests/cli/test_first_hour.py."""

import contextlib

import pytest

from conftest import tiny_trained_model
from convsim.data.examples import PromptFormat
from convsim.data.names import alias, display, displays, looks_like_id
from convsim.data.schema import Message
from convsim.demo import summary, table_lines
from convsim.inference.bursts import Burst, without_partial_tag
from convsim.inference.generate import SampleConfig, reply


def table(ft, ic, base):
    return {"ppl_finetuned": ft, "ppl_in_context": ic, "ppl_base": base}


def test_summary_when_fine_tuning_wins():
    said = summary({"Ana": table(10.0, 12.0, 15.0), "549cc1d1": table(20.0, 21.5, 25.0)}, "20 steps")
    assert said[0] == "Ana: fine-tuning beat prompting (10.0 vs 12.0) and beat the base model (15.0)."
    assert said[1].startswith(f"{display('549cc1d1')}: fine-tuning beat prompting (20.0 vs 21.5)")
    assert said[-1] == "Fine-tuning beat prompting for every person here, after 20 steps."


def test_summary_when_fine_tuning_loses():
    # the figures of a loaded CPU run: fine-tuning behind prompting for both, behind the base model for one
    said = summary({"A": table(25.1, 20.7, 23.7), "B": table(29.0, 28.6, 30.0)}, "9 steps")
    assert said[0] == "A: fine-tuning lost to prompting (25.1 vs 20.7) and lost to the base model (23.7)."
    assert said[1] == "B: fine-tuning lost to prompting (29.0 vs 28.6) and beat the base model (30.0)."
    assert said[-1].startswith("Fine-tuning did not beat prompting for anyone here after 9 steps.")
    assert "GPU" in said[-1] and "--steps" in said[-1]


def test_summary_mixed_and_compares_printed_values():
    said = summary({"A": table(10.0, 12.0, 15.0), "B": table(20.04, 20.01, 30.0)}, "20 steps")
    assert "tied with prompting (20.0 vs 20.0)" in said[1]  # equal as printed: not a win
    assert said[-1].startswith("Fine-tuning beat prompting for 1 of 2 people after 20 steps (for A)")
    assert "--steps" in said[-1]


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny():
    model, tok, ids = tiny_trained_model()
    model.eval()
    return model, tok, ids


@contextlib.contextmanager
def favour(model, token_id, by=1e4):
    """Makes `token_id` the most likely next token everywhere (a hook on the output head)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += by
        return output

    h = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def test_no_stop_before_the_first_tokens(tiny):
    model, tok, ids = tiny
    fmt = PromptFormat(style="base", speakers=("Ana", "Ben"))
    hist = [Message("Ben", "are you coming?", "2024-01-01T00:00:00+00:00")]
    with favour(model, ids["Ben"]):  # the other speaker's token: a stop at the very first step
        assert reply(model, tok, fmt, hist, "Ana", SampleConfig(temperature=0, min_new_tokens=0))[0] == []
        got = reply(model, tok, fmt, hist, "Ana", SampleConfig(temperature=0, max_new_tokens=12, min_new_tokens=4))
    assert got[0] != []  # four tokens were written before the stop came


class Script:
    """Makes the model write `ids` in order, one per forward pass (a hook on the output head), then end of
    text; `calls` counts the passes since the last `reset`."""

    def __init__(self, model, ids, eos):
        self.ids, self.eos, self.calls = list(ids), eos, 0
        self.handle = model.get_output_embeddings().register_forward_hook(self.hook)

    def reset(self):
        self.calls = 0

    def hook(self, module, inputs, output):
        want = self.ids[self.calls] if self.calls < len(self.ids) else self.eos
        self.calls += 1
        output = output.clone()
        output[..., want] += 1e4
        return output


def test_streamed_reply_ends_at_a_repeat_as_reply_does(tiny):
    """`chat --stream` (stream_reply) ends a burst where a message repeats the one before, as `reply` does:
    the streamed text equals the non-streamed reply, and generation stops once the burst is over."""
    from convsim.inference.generate import stream_reply

    model, tok, ids = tiny
    fmt = PromptFormat(style="base", speakers=("Ana", "Ben"))
    hist = [Message("Ben", "are you coming?", "2024-01-01T00:00:00+00:00")]
    hello, later = (tok(" " + t, add_special_tokens=False).input_ids for t in ("see you", "later maybe"))
    script = Script(model, hello + [ids["Ana"]] + hello + [ids["Ana"]] + later + [ids["Ana"]] + later, tok.eos_token_id)
    cfg = SampleConfig(temperature=0, max_new_tokens=40)
    try:
        want = reply(model, tok, fmt, hist, "Ana", cfg)[0]
        whole = script.calls
        script.reset()
        shown: dict[int, str] = {}
        for i, delta in stream_reply(model, tok, fmt, hist, "Ana", cfg):
            shown[i] = shown.get(i, "") + delta
    finally:
        script.handle.remove()
    assert want == ["see you"]
    assert [shown[i] for i in sorted(shown)] == want
    assert script.calls < whole  # the repeat ended the streamed generation early


def test_partial_tag_is_cut():
    tags = ["[549cc1d1]", "[a54af4d5]"]
    assert without_partial_tag("ok see you\n[5", tags) == "ok see you"
    assert without_partial_tag("ok see you [a54a", tags) == "ok see you"
    assert without_partial_tag("see [link]", tags) == "see [link]"
    assert without_partial_tag("a list[5", tags) == "a list[5"  # not at a word start: the person's text


def test_burst_cuts_a_partial_tag_and_a_repeated_message_together(tiny):
    """Both ends of a burst on the plain-text-tag path (in-context prompts): the length limit falling
    inside the next tag, and a message that repeats the one before it."""
    _, tok, _ = tiny
    me, other = "549cc1d1", "a54af4d5"
    fmt = PromptFormat(style="base", speakers=(me, other), special_tokens=False)

    def burst(text):
        row = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        return Burst(tok, fmt, me).messages(row)

    assert burst(" ok\n[549cc1d1] later\n[a54a") == ["ok", "later"]
    assert burst(" ok see you\n[549cc1d1] OK see you\n[549cc1d1] later\n[a54a") == ["ok see you"]
    assert burst(" ok\n[a54af4d5] not mine") == ["ok"]


# ----------------------------------------------------------------------------- readable people


def test_aliases_are_stable_and_distinct():
    assert looks_like_id("549cc1d1") and looks_like_id("12345") and not looks_like_id("Riya")
    assert alias("549cc1d1") == alias("549cc1d1") != "" and alias("Ana") == ""
    assert display("Ana") == "Ana" and display("549cc1d1") == f"{alias('549cc1d1')} (549cc1d1)"
    ids = [f"{i:08x}" for i in range(1, 30, 3)]
    shown = displays(ids)
    assert len({v.split(" ")[0] for v in shown.values()}) == len(ids)
    assert table_lines({"549cc1d1": table(1.0, 2.0, 3.0)})[1].startswith(display("549cc1d1"))


def test_renames_shown_beside_the_run_name():
    from convsim.errors import UserError
    from convsim.data.names import renames

    got = renames(["549cc1d1=Riya", "Ana= Anna "], known=["549cc1d1", "a54af4d5", "Ana"])
    assert got == {"549cc1d1": "Riya", "Ana": "Anna"}
    shown = displays(["549cc1d1", "a54af4d5", "Ana", "Ben"], got)
    assert shown["549cc1d1"] == "Riya (549cc1d1)" and shown["Ana"] == "Anna (Ana)" and shown["Ben"] == "Ben"
    taken = alias("a54af4d5")  # a name given with --speaker is never also someone's alias
    assert not displays(["549cc1d1", "a54af4d5"], {"549cc1d1": taken})["a54af4d5"].startswith(taken + " ")
    for bad, why in (("Riya", "NAME=SHOWN"), ("549cc1d1=", "NAME=SHOWN"), ("Zed=Z", "unknown speaker 'Zed'")):
        with pytest.raises(UserError, match=why):
            renames([bad], known=["549cc1d1"])


def test_plot_labels():
    from types import SimpleNamespace

    from convsim.plots.figures import Context

    ctx = Context(SimpleNamespace(speakers=["549cc1d1", "Ana"]), None, None, {"Ana": "Anna"})
    assert ctx.label("549cc1d1") == display("549cc1d1") and ctx.label("Ana") == "Anna (Ana)"
    assert ctx.label("Cy") == "Cy"  # someone of the chat without a token of the run
    assert ctx.labelled({"Ana": [1], "549cc1d1": [2]}) == {"Anna (Ana)": [1], display("549cc1d1"): [2]}

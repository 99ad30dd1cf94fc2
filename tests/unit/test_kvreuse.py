"""KV-cache reuse across chat turns (issue #5): the same greedy tokens as a fresh prefill, only the new
part of the prompt computed, and trimming to the token budget in blocks so reuse survives it.

    pytest tests/unit/test_kvreuse.py       # a few seconds (tiny random models)
"""

import pytest
import torch

from conftest import synthetic_conversations
from convsim.data.examples import PromptFormat
from convsim.data.schema import Message
from convsim.inference.bursts import Burst
from convsim.inference.generate import (
    SampleConfig,
    TurnCache,
    _generate,
    _gen_kwargs,
    reply,
    stream_reply,
)
from convsim.modeling.layers import decoder_layers
from convsim.modeling.models import load
from convsim.modeling.speakers import add_speaker_tokens

GREEDY = SampleConfig(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module", params=["tiny-gemma3", "tiny-llama"])
def model_tok(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other (10x slower on a busy box)
    torch.manual_seed(0)
    model, tok = load(request.param)
    add_speaker_tokens(model, tok, ["Ana", "Ben"])
    yield model.eval(), tok
    torch.set_num_threads(threads)


def conversation(n):
    return synthetic_conversations(1, per_conv=n, seed=3)[0].messages


def test_same_tokens_as_a_fresh_prefill(model_tok):
    model, tok = model_tok
    fmt = PromptFormat("base", ("Ana", "Ben"))
    burst = Burst(tok, fmt, "Ana")
    msgs = conversation(30)
    cache = TurnCache()
    for turn, upto in enumerate((8, 9, 14, 22, 30)):  # prompts of ~60 to ~250 tokens: past tiny-gemma3's window 64
        ids = cache.prompt(tok, fmt, msgs[:upto], "Ana", 4096)
        x = torch.tensor([ids])
        kw = dict(attention_mask=torch.ones_like(x), **_gen_kwargs(GREEDY, burst, len(ids)))
        with torch.inference_mode():
            plain = model.generate(input_ids=x, **kw)
            cached = _generate(model, x, cache, **kw)
        assert torch.equal(plain, cached), f"turn {turn}"
        if turn:
            assert cache.reused > 0 and cache.fed < len(ids) // 2, (cache.reused, cache.fed)


def chat(model, tok, fmt, cache, budget, turns=8, stream=False):
    """A greedy chat: Ben's scripted lines, Ana's replies from the model; returns Ana's replies."""
    cfg = SampleConfig(temperature=0, max_new_tokens=10, max_context_tokens=budget)
    lines = [m.text for m in conversation(40) if m.speaker == "Ben"]
    history = list(conversation(12))
    out, reused = [], []
    for i in range(turns):
        history.append(Message("Ben", lines[i % len(lines)]))
        if stream:
            got: list[str] = []
            for k, delta in stream_reply(model, tok, fmt, history, "Ana", cfg, cache=cache):
                got += [""] * (k + 1 - len(got))
                got[k] += delta
        else:
            got = reply(model, tok, fmt, history, "Ana", cfg, cache=cache)[0]
        out.append(got)
        reused.append(cache.reused if cache else 0)
        history += [Message("Ana", t) for t in got] or [Message("Ana", "ok")]
    return out, reused


def test_chat_with_reuse_says_what_chat_without_says(model_tok):
    model, tok = model_tok
    fmt = PromptFormat("base", ("Ana", "Ben"))
    budget = 160  # small: the history outgrows it after a few turns
    plain, _ = chat(model, tok, fmt, None, budget)
    exact, reused = chat(model, tok, fmt, TurnCache(slack=0), budget)  # trims one message at a time, as plain
    assert exact == plain
    assert sum(r > 0 for r in reused) >= 2
    # streaming: compared with streaming without the cache (a random model's reply can end in half a
    # UTF-8 character, which the stream drops and `reply` keeps as U+FFFD)
    assert (
        chat(model, tok, fmt, TurnCache(slack=0), budget, stream=True)[0]
        == chat(model, tok, fmt, None, budget, stream=True)[0]
    )


def test_block_trimming_keeps_the_cache_useful(model_tok):
    model, tok = model_tok
    fmt = PromptFormat("base", ("Ana", "Ben"))
    budget = 160
    cache = TurnCache(slack=0.3)
    lines = [m.text for m in conversation(40) if m.speaker == "Ben"]
    history, fresh = list(conversation(12)), 0
    for i in range(10):
        history.append(Message("Ben", lines[i % len(lines)]))
        ids = cache.prompt(tok, fmt, history, "Ana", budget)
        assert len(ids) <= budget
        # the cached path gives what a fresh prefill of the same (block-trimmed) history gives
        cfg = SampleConfig(temperature=0, max_new_tokens=10, max_context_tokens=budget)
        want = reply(model, tok, fmt, history[cache.start :], "Ana", cfg)[0]
        got = reply(model, tok, fmt, history, "Ana", cfg, cache=cache)[0]
        assert got == want
        fresh += cache.reused == 0
        history += [Message("Ana", t) for t in got] or [Message("Ana", "ok")]
    assert cache.start > 0 and fresh <= 4, fresh  # trimmed, yet most turns reused the cache


def test_hooks_or_another_history_reset_it(model_tok):
    model, tok = model_tok
    fmt = PromptFormat("base", ("Ana", "Ben"))
    cache, msgs = TurnCache(), conversation(20)
    reply(model, tok, fmt, msgs[:10], "Ana", GREEDY, cache=cache)
    reply(model, tok, fmt, msgs[:12], "Ana", GREEDY, cache=cache)
    assert cache.reused > 0
    h = decoder_layers(model)[0].register_forward_hook(lambda m, i, o: None)  # e.g. a steering vector
    try:
        reply(model, tok, fmt, msgs[:13], "Ana", GREEDY, cache=cache)
        assert cache.reused == 0
    finally:
        h.remove()
    other = conversation(25)[14:]
    reply(model, tok, fmt, other, "Ana", GREEDY, cache=cache)
    assert cache.reused <= 2 and cache.start == 0  # BOS (and perhaps a tag) in common
    sampled = SampleConfig(temperature=0.7, max_new_tokens=8, seed=0)
    assert len(reply(model, tok, fmt, msgs[:5], "Ana", sampled, n=2, cache=cache)) == 2  # n > 1: plain generate


def test_cache_argument_follows_the_model_forward_not_a_training_wrapper():
    """generate's cache keyword is read from the model class: `cache` on transformers 5.24, `past_key_values` on
    5.17 (the GPU machine's); training's reply-loss wrapper on the instance must not change the answer."""
    import torch
    from convsim.config import TrainConfig
    from convsim.inference.generate import cache_argument
    from convsim.modeling.loss import install_reply_loss
    from convsim.training.backends import build_model

    model, tok, spec, ids = build_model(TrainConfig(model="tiny-gemma3", lora_r=4), ["Ana", "Ben"], "cpu")
    import inspect

    want = (
        "cache" if "cache" in inspect.signature(type(model.get_base_model()).forward).parameters else "past_key_values"
    )
    assert cache_argument(model) == want
    install_reply_loss(model)
    assert cache_argument(model) == want

    class Old(torch.nn.Module):  # a 5.17-style forward
        def forward(self, input_ids=None, past_key_values=None, **kw):
            return None

    assert cache_argument(Old()) == "past_key_values"

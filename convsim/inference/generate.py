"""Generation as a person: build the prompt with `render`, sample a reply *burst* (one or more messages
of that speaker) and stop, while generating, when another speaker's token, end of text or end of turn
comes. No speaker token, whole or partial, ever reaches the caller.

    msgs = reply(model, tok, fmt, history, "Ana", SampleConfig(temperature=0))     # ["hey", "what's up?"]
    for i, delta in stream_reply(model, tok, fmt, history, "Ana", cfg): print(delta, end="")

The rules of a burst (its stops, the hold-off of stops for the first tokens, how ids become messages, and
streaming them) live in `convsim.inference.bursts`, which the server's batched rows use too; batched,
streamed and cached (TurnCache) generation here all go through them and so give the same replies.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from convsim.data.examples import PromptFormat, render
from convsim.data.schema import Message
from convsim.inference import fastgen
from convsim.inference.bursts import Burst, BurstStream, NoEarlyStop, StopOnSequences, StopOnText
from convsim.inference.nocopy import CopyIndex, NoCopy
from convsim.modeling.layers import causal_lm


@dataclass
class SampleConfig:
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 96
    min_new_tokens: int = 2  # no stop (another speaker, end of text, an empty message) before this many tokens
    max_context_tokens: int = 1024  # history beyond this budget is dropped, oldest first
    seed: int | None = None


def prompt_ids(tok, fmt: PromptFormat, history: Sequence[Message], speaker: str, budget: int) -> list[int]:
    return render(tok, fmt, history, speaker, max_len=budget).input_ids


def _gen_kwargs(cfg: SampleConfig, burst: Burst, prompt_len: int, more_criteria=(), guard: CopyIndex | None = None):
    """`generate`'s arguments for one burst: its stops, no stop before `cfg.min_new_tokens`, the sampling,
    and with a `guard`, no span of training text completed (`nocopy`)."""
    criteria = [StopOnSequences(burst.stops, prompt_len)]
    if burst.texts:
        criteria.append(StopOnText(burst.tok, burst.texts, prompt_len))
    kw = dict(
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=burst.tok.pad_token_id,
        stopping_criteria=StoppingCriteriaList(criteria + list(more_criteria)),
        logits_processor=LogitsProcessorList(
            [NoEarlyStop(burst.early_stops(), prompt_len, min(cfg.min_new_tokens, cfg.max_new_tokens))]
            + ([NoCopy(guard, prompt_len)] if guard is not None else [])
        ),
    )
    if cfg.temperature and cfg.temperature > 0:
        kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def greedy_ids(model, ids: list[int], n: int, processors=()) -> list[int]:
    """Exactly `n` greedy tokens after `ids`, with no stop of any kind: the raw continuation that other
    runtimes (an exported GGUF in llama.cpp) and checks (the copy guard) are compared against."""
    x = torch.tensor([ids], device=_device(model))
    with torch.inference_mode():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList(list(processors)),
        )
    return out[0, len(ids) :].tolist()


def _device(model):
    return next(model.parameters()).device


def reply(
    model,
    tok,
    fmt: PromptFormat,
    history: Sequence[Message],
    speaker: str,
    cfg: SampleConfig = SampleConfig(),
    n: int = 1,
    cache: TurnCache | None = None,
    guard: CopyIndex | None = None,
) -> list[list[str]]:
    """`n` sampled bursts for `speaker` after `history`; each burst is a list of messages. With a
    `TurnCache`, the conversation's previous turn is not computed again; with a `guard`, no training span is
    copied."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    ids = (cache.prompt if cache is not None else prompt_ids)(tok, fmt, history, speaker, cfg.max_context_tokens)
    burst = Burst(tok, fmt, speaker)
    x = torch.tensor([ids], device=_device(model))
    with torch.inference_mode():
        out = _generate(
            model,
            x,
            cache,
            attention_mask=torch.ones_like(x),
            num_return_sequences=n,
            **_gen_kwargs(cfg, burst, len(ids), guard=guard),
        )
    return [burst.messages(row) for row in out[:, len(ids) :].tolist()]


def reply_from_prompt(
    model,
    tok,
    fmt: PromptFormat,
    ids: list[int],
    speaker: str,
    cfg: SampleConfig = SampleConfig(),
    guard: CopyIndex | None = None,
) -> list[str]:
    """One burst after explicit prompt ids (in-context baselines). With plain-text tags, also stops on the
    text of another speaker's tag and cuts there."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    burst = Burst(tok, fmt, speaker)
    x = torch.tensor([ids], device=_device(model))
    with torch.inference_mode():
        out = fastgen.generate(
            model, x, attention_mask=torch.ones_like(x), **_gen_kwargs(cfg, burst, len(ids), guard=guard)
        )
    return burst.messages(out[0, len(ids) :].tolist())


def replies_from_prompts(
    model,
    tok,
    fmt: PromptFormat,
    prompts: Sequence[list[int]],
    speaker: str,
    cfg: SampleConfig = SampleConfig(),
    batch_size: int = 16,
    guard: CopyIndex | None = None,
) -> list[list[str]]:
    """`reply_from_prompt` for many prompts, generated in left-padded batches (evaluation). Rows stop
    independently; each row is cut at its first stop exactly as the single-prompt path cuts."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    burst = Burst(tok, fmt, speaker)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[list[str]] = [[] for _ in prompts]
    dev = _device(model)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        x = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in idx], device=dev)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=dev)
        with torch.inference_mode():
            gen = model.generate(input_ids=x, attention_mask=mask, **_gen_kwargs(cfg, burst, width, guard=guard))
        for row, i in zip(gen[:, width:].tolist(), idx):
            out[i] = burst.messages(row)
    return out


class _QueueStreamer(BaseStreamer):
    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.first = True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self):
        self.q.put(None)


def stream_reply(
    model,
    tok,
    fmt: PromptFormat,
    history: Sequence[Message],
    speaker: str,
    cfg: SampleConfig = SampleConfig(),
    cache: TurnCache | None = None,
    guard: CopyIndex | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (message index, text delta) while generating. The deltas of each index join to exactly the
    messages `reply` returns for the same settings and seed (`bursts.BurstStream`)."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    ids = (cache.prompt if cache is not None else prompt_ids)(tok, fmt, history, speaker, cfg.max_context_tokens)
    burst = Burst(tok, fmt, speaker)
    stream = BurstStream(burst)
    x = torch.tensor([ids], device=_device(model))
    streamer = _QueueStreamer()
    error: list[BaseException] = []
    gone = threading.Event()  # the burst is over (a repeat ends it before any stop) or the caller left

    def work():
        try:
            with torch.inference_mode():
                _generate(
                    model,
                    x,
                    cache,
                    attention_mask=torch.ones_like(x),
                    streamer=streamer,
                    **_gen_kwargs(cfg, burst, len(ids), [_StopWhen(gone)], guard=guard),
                )
        except BaseException as e:  # surfaced in the consumer
            error.append(e)
            streamer.end()

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while not stream.over:
            item = streamer.q.get()
            yield from stream.feed(item or [], finished=item is None)
    finally:
        gone.set()
        th.join()
    if error:
        raise error[0]


class _StopWhen(StoppingCriteria):
    """Stops every row once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# ----------------------------------------------------------------------------- KV cache reuse across turns


class TurnCache:
    """The KV cache of a conversation's last prompt + reply, reused by its next turn (`reply(...,
    cache=c)`, `stream_reply(..., cache=c)`).

    A chat's next prompt starts with the tokens of the last one, so only the new messages need a forward
    pass before the first token: the cache is cropped to the longest common token prefix and the rest is
    fed. When the history outgrows the token budget, the oldest messages are dropped in a block (down to
    `1 - slack` of the budget) rather than one per turn, so the prefix, and with it the cache, stays valid
    for the next turns; `slack=0` trims exactly as `reply` does without a cache. For one prompt the
    output is what plain `generate` gives (tests/unit/test_kvreuse.py).

    One cache per conversation and model; changing the model's weights or steering needs `reset()`
    (adding or removing hooks on the decoder layers resets it by itself). Batch 1 only: `n > 1` and
    the CUDA fast path (`convsim.inference.fastgen`) generate without it.

        cache = TurnCache()                       # one per conversation
        msgs = reply(model, tok, fmt, history, "Ana", cfg, cache=cache)[0]
    """

    def __init__(self, slack: float = 0.25):
        self.slack = slack
        self.reset()

    def reset(self) -> None:
        self.kv = None
        self.ids: list[int] = []  # the tokens whose keys and values `kv` holds
        self.start = 0  # history[:start] was dropped to keep within the budget
        self._dropped: list[Message] = []
        self._key = None
        self.reused = self.fed = 0  # last call: prompt tokens taken from the cache / computed

    def prompt(self, tok, fmt: PromptFormat, history: Sequence[Message], speaker: str, budget: int) -> list[int]:
        """Prompt ids for `history`, trimmed at the front in blocks so the prefix stays stable."""
        history = list(history)
        if self.start > len(history) or history[: self.start] != self._dropped:
            self.start, self._dropped = 0, []  # a different conversation (or /reset)
        ids = prompt_ids(tok, fmt, history[self.start :], speaker, None)
        if len(ids) > budget:
            target = int(budget * (1 - self.slack))
            while self.start < len(history) - 1 and len(ids) > target:
                self.start += 1
                ids = prompt_ids(tok, fmt, history[self.start :], speaker, None)
            self._dropped = history[: self.start]
            ids = prompt_ids(tok, fmt, history[self.start :], speaker, budget)
        return ids

    def generate(self, model, x, **kw):
        """`generate` for one prompt, starting from the cached prefix; keeps the new cache."""
        from transformers import DynamicCache

        key = _state_key(model)
        if key != self._key:
            self.kv, self.ids, self._key = None, [], key
        ids = x[0].tolist()
        n = 0
        for a, b in zip(self.ids, ids[:-1]):  # at least the last prompt token is fed
            if a != b:
                break
            n += 1
        kv = self.kv if (self.kv is not None and n > 0) else None
        if kv is None:
            kv, n = DynamicCache(), 0  # no config: full layers even where the model slides, so crop works
        elif kv.get_seq_length() > n:
            kv.crop(n - kv.get_seq_length())  # negative: tokens to remove from the end
        self.kv, self.ids = None, []  # an error mid-generate must not leave a half-updated cache behind
        self.reused, self.fed = n, len(ids) - n
        out = model.generate(input_ids=x, **{cache_argument(model): kv}, **kw)
        self.kv, self.ids = kv, out[0, : kv.get_seq_length()].tolist()
        return out


def cache_argument(model) -> str:
    """What this transformers version calls the cache a forward pass takes: `cache` (5.24) or
    `past_key_values` (5.17, which the GPU machine and Unsloth use), read from the model's class (training
    may have wrapped the instance's forward: modeling.loss.install_reply_loss)."""
    return _cache_argument(type(causal_lm(model)))


@functools.lru_cache(maxsize=None)
def _cache_argument(cls) -> str:
    import inspect

    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "cache"
    return "cache" if "cache" in params else "past_key_values"


def _state_key(model):
    """What the cached keys and values depend on besides the tokens: the model and the hooks on it."""
    from convsim.modeling.layers import decoder_layers

    try:
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in decoder_layers(model))
    except Exception:
        hooks = None
    return id(model), hooks


def _generate(model, x, cache: TurnCache | None, **kw):
    """Plain or fast-path generate, or from `cache` where it applies (batch 1, not the CUDA fast path)."""
    batch = x.shape[0] * kw.get("num_return_sequences", 1)
    if cache is None or batch != 1 or fastgen.enabled(model, batch):
        return fastgen.generate(model, x, **kw)
    return cache.generate(model, x, **kw)

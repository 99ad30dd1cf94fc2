"""Generation as a person: build the prompt with `render`, sample a reply *burst* (one or more messages
of that speaker) and stop, while generating, when another speaker's token, end of text or end of turn
comes. No speaker token, whole or partial, ever reaches the caller.

    msgs = reply(model, tok, fmt, history, "Ana", SampleConfig(temperature=0))     # ["hey", "what's up?"]
    for i, delta in stream_reply(model, tok, fmt, history, "Ana", cfg): print(delta, end="")

One module on purpose: batched, streamed and cached (TurnCache) generation share the stopping rule and
the burst splitting, and keeping them side by side keeps the three paths giving the same replies.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from convsim.inference import fastgen
from convsim.data.examples import PromptFormat, end_of_turn_id, render, tag_ids
from convsim.data.schema import Message
from convsim.modeling.layers import causal_lm
from convsim.modeling.speakers import speaker_token


@dataclass
class SampleConfig:
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 96
    min_new_tokens: int = 2  # no stop (another speaker, end of text, an empty message) before this many tokens
    max_context_tokens: int = 1024  # history beyond this budget is dropped, oldest first
    seed: int | None = None


class StopOnSequences(StoppingCriteria):
    """True for a row once its generated tail ends with any stop sequence."""

    def __init__(self, stops: Sequence[Sequence[int]], prompt_len: int):
        self.stops = [list(s) for s in stops if len(s)]
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        gen = input_ids[:, self.prompt_len :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for s in self.stops:
            if gen.shape[1] >= len(s):
                done |= (gen[:, -len(s) :] == torch.tensor(s, device=gen.device)).all(dim=1)
        return done


class NoEarlyStop(LogitsProcessor):
    """Forbids the first token of every stop sequence (and of the speaker's own tag, which would open an
    empty message) until `k` tokens have been generated: a burst that stops at once is an empty reply."""

    def __init__(self, banned: Sequence[int], prompt_len: int, k: int):
        self.banned = sorted({int(b) for b in banned if b is not None and b >= 0})
        self.prompt_len, self.k = prompt_len, k

    def __call__(self, input_ids, scores):
        if self.banned and input_ids.shape[1] - self.prompt_len < self.k:
            scores = scores.clone()
            scores[:, [b for b in self.banned if b < scores.shape[1]]] = float("-inf")
        return scores


class StopOnText(StoppingCriteria):
    """For plain-text speaker tags: True once the decoded tail contains any of `texts`."""

    def __init__(self, tok, texts: Sequence[str], prompt_len: int):
        self.tok, self.texts, self.prompt_len = tok, list(texts), prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        tails = self.tok.batch_decode(input_ids[:, self.prompt_len :][:, -12:])
        return torch.tensor([any(t in tail for t in self.texts) for tail in tails], device=input_ids.device)


def stop_sequences(tok, fmt: PromptFormat, speaker: str) -> list[list[int]]:
    stops = [tag_ids(tok, fmt, s) for s in fmt.speakers if s != speaker]
    stops += [[tok.eos_token_id], [end_of_turn_id(tok)]]
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        stops.append([tok.pad_token_id])
    return stops


def _cut(ids: list[int], stops: list[list[int]]) -> tuple[list[int], bool]:
    """ids up to the first stop sequence (exclusive), and whether one was found."""
    for i in range(len(ids)):
        for s in stops:
            if ids[i : i + len(s)] == s:
                return ids[:i], True
    return ids, False


def split_messages(tok, fmt: PromptFormat, speaker: str, ids: list[int]) -> list[str]:
    """Generated ids (stop already cut) → messages, split on the speaker's own tag."""
    tag = tag_ids(tok, fmt, speaker)
    parts, cur, i = [], [], 0
    while i < len(ids):
        if ids[i : i + len(tag)] == tag:
            parts.append(cur)
            cur = []
            i += len(tag)
        else:
            cur.append(ids[i])
            i += 1
    parts.append(cur)
    texts = [tok.decode(p, skip_special_tokens=True).strip() for p in parts]
    return [t for t in texts if t]


def prompt_ids(tok, fmt: PromptFormat, history: Sequence[Message], speaker: str, budget: int) -> list[int]:
    return render(tok, fmt, history, speaker, max_len=budget).input_ids


def _gen_kwargs(tok, cfg: SampleConfig, stops, prompt_len, stop_texts=(), own_tag=()):
    criteria = [StopOnSequences(stops, prompt_len)] + ([StopOnText(tok, stop_texts, prompt_len)] if stop_texts else [])
    banned = [s[0] for s in stops if s] + list(own_tag[:1])
    kw = dict(
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        stopping_criteria=StoppingCriteriaList(criteria),
        logits_processor=LogitsProcessorList(
            [NoEarlyStop(banned, prompt_len, min(cfg.min_new_tokens, cfg.max_new_tokens))]
        ),
    )
    if cfg.temperature and cfg.temperature > 0:
        kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


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
) -> list[list[str]]:
    """`n` sampled bursts for `speaker` after `history`; each burst is a list of messages. With a
    `TurnCache`, the conversation's previous turn is not computed again."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    ids = (cache.prompt if cache is not None else prompt_ids)(tok, fmt, history, speaker, cfg.max_context_tokens)
    stops = stop_sequences(tok, fmt, speaker)
    x = torch.tensor([ids], device=_device(model))
    with torch.inference_mode():
        out = _generate(
            model,
            x,
            cache,
            attention_mask=torch.ones_like(x),
            num_return_sequences=n,
            **_gen_kwargs(tok, cfg, stops, len(ids), own_tag=tag_ids(tok, fmt, speaker)),
        )
    bursts = []
    for row in out[:, len(ids) :].tolist():
        cut, _ = _cut(row, stops)
        bursts.append(without_repeats(split_messages(tok, fmt, speaker, cut)))
    return bursts


def reply_from_prompt(
    model, tok, fmt: PromptFormat, ids: list[int], speaker: str, cfg: SampleConfig = SampleConfig()
) -> list[str]:
    """One burst after explicit prompt ids (in-context baselines). With plain-text tags, also stops on the
    text of another speaker's tag and cuts there."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    stops = stop_sequences(tok, fmt, speaker)
    texts = [] if fmt.special_tokens else [speaker_token(s) for s in fmt.speakers if s != speaker]
    x = torch.tensor([ids], device=_device(model))
    with torch.inference_mode():
        out = fastgen.generate(
            model,
            x,
            attention_mask=torch.ones_like(x),
            **_gen_kwargs(tok, cfg, stops, len(ids), texts, tag_ids(tok, fmt, speaker)),
        )
    return _burst(tok, fmt, speaker, out[0, len(ids) :].tolist(), stops, texts)


def empty_note(speaker: str) -> str:
    """The line shown instead of an empty reply: why it is empty and what to try."""
    return (
        f"note: {speaker}'s reply came out empty (the model wrote only spaces or stopped at once); "
        "try another --seed or a higher --temperature; a model trained for few steps often does this"
    )


def without_repeats(messages: list[str]) -> list[str]:
    """A burst ends where a message repeats the one before it: a model that starts looping has nothing
    more to say, and a person rarely sends the same message twice in a row."""
    out: list[str] = []
    for m in messages:
        if out and m.strip().casefold() == out[-1].strip().casefold():
            break
        out.append(m)
    return out


def _burst(tok, fmt: PromptFormat, speaker: str, row: list[int], stops, texts) -> list[str]:
    """Generated ids → messages: cut at the first stop; with plain-text tags also at another speaker's tag
    text, and split on the speaker's own tag text; cut again where a message repeats the one before."""
    cut, _ = _cut(row, stops)
    if fmt.special_tokens:
        return without_repeats(split_messages(tok, fmt, speaker, cut))
    text = tok.decode(cut, skip_special_tokens=True)
    for t in texts:
        text = text.split(t)[0]
    text = without_partial_tag(text, [speaker_token(s) for s in fmt.speakers])
    return without_repeats([m.strip() for m in text.split(speaker_token(speaker)) if m.strip()])


def without_partial_tag(text: str, tags: Sequence[str]) -> str:
    """`text` without a speaker tag that generation cut short at its end (`... [5` of `[549cc1d1]`): with
    plain-text tags the length limit can fall inside the next tag, whose start is not the person's text."""
    for i in range(len(text) - 1, -1, -1):
        if text[i] != "[":
            continue
        tail = text[i:]
        at_line_start = i == 0 or text[i - 1] in " \n"
        if at_line_start and any(t.startswith(tail) and t != tail for t in tags):
            return text[:i].rstrip()
        break
    return text


def replies_from_prompts(
    model,
    tok,
    fmt: PromptFormat,
    prompts: Sequence[list[int]],
    speaker: str,
    cfg: SampleConfig = SampleConfig(),
    batch_size: int = 16,
) -> list[list[str]]:
    """`reply_from_prompt` for many prompts, generated in left-padded batches (evaluation). Rows stop
    independently; each row is cut at its first stop exactly as the single-prompt path cuts."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    stops = stop_sequences(tok, fmt, speaker)
    texts = [] if fmt.special_tokens else [speaker_token(s) for s in fmt.speakers if s != speaker]
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
            gen = model.generate(
                input_ids=x,
                attention_mask=mask,
                **_gen_kwargs(tok, cfg, stops, width, texts, tag_ids(tok, fmt, speaker)),
            )
        for row, i in zip(gen[:, width:].tolist(), idx):
            out[i] = _burst(tok, fmt, speaker, row, stops, texts)
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
) -> Iterator[tuple[int, str]]:
    """Yield (message index, text delta) while generating. The deltas of each index join to exactly the
    messages `reply` returns for the same settings and seed."""
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    ids = (cache.prompt if cache is not None else prompt_ids)(tok, fmt, history, speaker, cfg.max_context_tokens)
    stops = stop_sequences(tok, fmt, speaker)
    tag = tag_ids(tok, fmt, speaker)
    holdback = max(len(s) for s in stops + [tag]) - 1
    x = torch.tensor([ids], device=_device(model))
    streamer = _QueueStreamer()
    error: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode():
                _generate(
                    model,
                    x,
                    cache,
                    attention_mask=torch.ones_like(x),
                    streamer=streamer,
                    **_gen_kwargs(tok, cfg, stops, len(ids), own_tag=tag),
                )
        except BaseException as e:  # surfaced in the consumer
            error.append(e)
            streamer.end()

    th = threading.Thread(target=work, daemon=True)
    th.start()
    gen: list[int] = []
    msg_index, shown = 0, ""
    consumed = 0  # ids before the current message's start

    def current_text(upto: int) -> str:
        return tok.decode(gen[consumed:upto], skip_special_tokens=True)

    finished = False
    while not finished:
        item = streamer.q.get()
        if item is None:
            finished = True
        else:
            gen.extend(item)
        cut, stopped = _cut(gen, stops)
        safe = len(cut) if (stopped or finished) else max(consumed, len(cut) - holdback)
        # message breaks inside the safe region
        while True:
            pos = next((i for i in range(consumed, safe - len(tag) + 1) if gen[i : i + len(tag)] == tag), None)
            if pos is None:
                break
            text = current_text(pos).strip()
            if text[len(shown) :]:
                yield msg_index, text[len(shown) :]
            if text:
                msg_index += 1
            consumed, shown = pos + len(tag), ""
        text = current_text(safe).lstrip()
        if stopped or finished:
            text = text.rstrip()
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if not (stopped or finished):
            text = text.rstrip()  # trailing whitespace may be the message's end; show it with what follows
        if len(text) > len(shown) and text.startswith(shown):
            yield msg_index, text[len(shown) :]
            shown = text
        if stopped:
            break
    th.join()
    if error:
        raise error[0]


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

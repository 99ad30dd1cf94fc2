"""Training examples: conversation → (context, reply burst) → token ids with a loss mask on the reply.

A reply is a *burst*: the consecutive messages one person sends before someone else speaks. The context
is up to `context_size` earlier messages of the same session. Two renderings:

  base       <bos>[Ana] hi\n[Ben] yo\n[Ana] | what's up\n[Ana] busy?\n[Ben]
  instruct   chat template(system, user: "[Ana] hi\n[Ben] yo\n\nHow does the conversation continue?")
             + "[Ana]" | " what's up\n[Ana] busy?\n" <end_of_turn>

(`|` marks where the loss starts.) The reply ends with the next speaker's token (base) or the end of
turn (instruct), so the model learns when a burst ends and generation can stop there.
`render()` is the one pure function that turns a chat into tokens and masks; training, generation,
evaluation and attribution all call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from convsim.data.schema import Conversation, Message, instant, speaker_token

INSTRUCT_QUESTION = "How does the conversation continue?"
FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class Example:
    conv_id: str
    speaker: str
    context: list[Message]
    reply: list[Message]
    next_speaker: str | None = None


@dataclass(frozen=True)
class PromptFormat:
    """How chats become text for one run: the prompt style and the speakers' tags."""

    style: str = "base"  # "base" | "instruct"
    speakers: tuple[str, ...] = ()
    special_tokens: bool = True  # one added token per speaker, or plain-text tags
    chat_template: str | None = None  # used when style is instruct and the tokenizer has none

    def system_prompt(self) -> str:
        tags = [speaker_token(s) for s in self.speakers]
        who = " and ".join(tags) if len(tags) <= 2 else ", ".join(tags[:-1]) + " and " + tags[-1]
        return f"You are a chat model trained to simulate conversations between {who}."


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on every reply token the model must predict (text, tags, terminator)
    text_mask: list[int]  # 1 on the reply's text tokens only (what evaluation scores)
    prompt_len: int
    truncated: bool = False


# ----------------------------------------------------------------------------- examples


def bursts(messages: Sequence[Message]) -> list[tuple[int, int]]:
    """(start, end) index ranges of consecutive messages by the same speaker."""
    out, start = [], 0
    for i in range(1, len(messages) + 1):
        if i == len(messages) or messages[i].speaker != messages[start].speaker:
            out.append((start, i))
            start = i
    return out


def build_examples(
    convs: Sequence[Conversation],
    targets: Sequence[str] | None = None,
    context_size: int = 8,
    max_burst: int = 8,
    min_context: int = 1,
) -> list[Example]:
    """One example per burst of a target speaker that has at least `min_context` earlier messages."""
    want = set(targets) if targets else None
    out = []
    for c in convs:
        msgs = c.messages
        spans = bursts(msgs)
        for k, (s, e) in enumerate(spans):
            speaker = msgs[s].speaker
            if (want is not None and speaker not in want) or s < min_context:
                continue
            e2 = min(e, s + max_burst)
            nxt = msgs[e].speaker if e2 == e and e < len(msgs) else (speaker if e2 < e else None)
            out.append(Example(c.id, speaker, list(msgs[max(0, s - context_size) : s]), list(msgs[s:e2]), nxt))
    return out


def start_time(c: Conversation) -> float | None:
    """The instant (epoch seconds, `schema.instant`) of a conversation's first timed message; None when none
    has a time."""
    return next((t for t in (instant(m.time) for m in c.messages) if t is not None), None)


def replies(c: Conversation) -> int:
    """How many replies a conversation holds: bursts that follow an earlier message (its examples)."""
    return max(len(bursts(c.messages)) - 1, 0)


def split_conversations(
    convs: Sequence[Conversation], val: float = 0.1, test: float = 0.1
) -> dict[str, list[Conversation]]:
    """Split by time: the latest replies are test, the ones before them validation, the rest train.

    Each held-out split takes its fraction of all the replies (`replies`), latest first: whole sessions
    while they fit, then the later part of the next session, cut where a burst starts (the part's first
    burst is context only; the earlier part keeps the session's id and the later part gets "/test" or
    "/val" after it). Counting whole sessions instead leaves a chat of a few long sessions with nothing or
    nearly everything to evaluate. Sessions without times keep their order. No message is in two splits."""
    untimed = float("-inf")  # sessions without times come first, in their order
    order = [convs[i] for i in sorted(range(len(convs)), key=lambda i: (_or(start_time(convs[i]), untimed), i))]
    total = sum(replies(c) for c in order)
    held: dict[str, list[Conversation]] = {"test": [], "val": []}
    for name, fraction in (("test", test), ("val", val)):
        need = round(fraction * total) if total >= 3 else 0
        while need > 0 and sum(replies(c) for c in order) > need:
            last = order.pop()
            if replies(last) <= need:
                held[name].insert(0, last)
                need -= replies(last)
                continue
            spans = bursts(last.messages)
            cut = spans[len(spans) - need - 1][0]  # the later part: need + 1 bursts, so need replies
            order.append(Conversation(last.id, last.messages[:cut], last.source))
            held[name].insert(0, Conversation(f"{last.id}/{name}", last.messages[cut:], last.source))
            need = 0
    return {"train": order, "val": held["val"], "test": held["test"]}


def _or(value, default):
    return default if value is None else value


# ----------------------------------------------------------------------------- rendering


def tag_ids(tokenizer, fmt: PromptFormat, speaker: str) -> list[int]:
    if fmt.special_tokens:
        i = tokenizer.convert_tokens_to_ids(speaker_token(speaker))
        assert i is not None and i != tokenizer.unk_token_id, f"no token for speaker {speaker!r}"
        return [i]
    # plain-text tags must stay text: the run's tokenizer would otherwise match "[Name]" to the speaker token
    return tokenizer(speaker_token(speaker), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def text_ids(tokenizer, text: str) -> list[int]:
    """A message's own text: never turned into special tokens (a message that says "[Ana]" or
    "<end_of_turn>" is text, not a speaker change or a control token)."""
    return tokenizer(" " + text.strip() + "\n", add_special_tokens=False, split_special_tokens=True)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    # kept on the tokenizer: get_vocab() builds a dict of the whole vocabulary, once per reply otherwise
    if "_convsim_eot" not in tokenizer.__dict__:
        eot = tokenizer.convert_tokens_to_ids("<end_of_turn>") if "<end_of_turn>" in tokenizer.get_vocab() else None
        tokenizer.__dict__["_convsim_eot"] = eot if eot is not None else tokenizer.eos_token_id
    return tokenizer.__dict__["_convsim_eot"]


def _prompt_ids(tokenizer, fmt: PromptFormat, context: Sequence[Message], speaker: str) -> list[int]:
    if fmt.style == "base":
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        for m in context:
            ids += tag_ids(tokenizer, fmt, m.speaker) + text_ids(tokenizer, m.text)
        return ids + tag_ids(tokenizer, fmt, speaker)
    assert fmt.style == "instruct", f"unknown prompt style {fmt.style!r}"
    history = "\n".join(f"{speaker_token(m.speaker)} {m.text.strip()}" for m in context)
    chat = [
        {"role": "system", "content": fmt.system_prompt()},
        {"role": "user", "content": f"{history}\n\n{INSTRUCT_QUESTION}"},
    ]
    template = None if tokenizer.chat_template else (fmt.chat_template or FALLBACK_TEMPLATE)
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, chat_template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + tag_ids(tokenizer, fmt, speaker)


def render(
    tokenizer,
    fmt: PromptFormat,
    context: Sequence[Message],
    speaker: str,
    reply: Sequence[Message] = (),
    next_speaker: str | None = None,
    max_len: int | None = None,
    terminate: bool = True,
) -> Rendered:
    """Tokens and masks for `context` followed by `speaker`'s `reply` burst (empty: a generation prompt).

    With `max_len`, the earliest context messages are dropped until it fits, then the reply is cut."""
    context = list(context)
    truncated = False
    while True:
        prompt = _prompt_ids(tokenizer, fmt, context, speaker)
        ids, loss, text = list(prompt), [0] * len(prompt), [0] * len(prompt)
        for j, m in enumerate(reply):
            if j:
                t = tag_ids(tokenizer, fmt, speaker)
                ids += t
                loss += [1] * len(t)
                text += [0] * len(t)
            t = text_ids(tokenizer, m.text)
            ids += t
            loss += [1] * len(t)
            text += [1] * len(t)
        if reply and terminate:
            if fmt.style == "instruct":
                t = [end_of_turn_id(tokenizer)]
            elif next_speaker is not None:
                t = tag_ids(tokenizer, fmt, next_speaker)
            else:
                t = [tokenizer.eos_token_id]
            ids += t
            loss += [1] * len(t)
            text += [0] * len(t)
        if max_len is None or len(ids) <= max_len or not context:
            break
        context = context[1:]
        truncated = True
    if max_len is not None and len(ids) > max_len:
        ids, loss, text, truncated = ids[:max_len], loss[:max_len], text[:max_len], True
    assert len(ids) == len(loss) == len(text)
    assert not any(loss[: len(prompt)]), "loss must not cover the prompt"
    return Rendered(ids, loss, text, min(len(prompt), len(ids)), truncated)


def render_example(tokenizer, fmt: PromptFormat, ex: Example, max_len: int | None = None) -> Rendered:
    return render(tokenizer, fmt, ex.context, ex.speaker, ex.reply, ex.next_speaker, max_len)


def render_whole(tokenizer, fmt: PromptFormat, ex: Example, max_len: int | None = None) -> Rendered:
    """The seed's loss: every token of the text (context included) is predicted, not only the reply."""
    r = render_example(tokenizer, fmt, ex, max_len)
    start = 1 if r.input_ids and r.input_ids[0] == tokenizer.bos_token_id else 0
    loss = [0] * start + [1] * (len(r.input_ids) - start)
    return Rendered(r.input_ids, loss, r.text_mask, r.prompt_len, r.truncated)

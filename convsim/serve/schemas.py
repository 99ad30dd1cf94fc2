"""The server's wire format: OpenAI's chat-completion and model schemas as pydantic models, convsim's few
additions (`steer`, `/v1/attribution`), OpenAI-shaped errors, and OpenAI messages → a convsim history.

A request body is parsed as JSON by the app (so malformed JSON gets its own error) and then validated
here; any validation problem becomes one 400 `invalid_value` error naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MODEL_PREFIX = "convsim/"


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 256
    max_context_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    queue_size: int = 32
    max_batch: int = 32
    max_n: int = 4
    max_steer: float = 64.0
    max_messages: int = 10_000


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- requests


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields (OpenAI options convsim has no use for) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: Any = None  # checked by parse_history, which knows the run's people
    stream: bool = Field(default=False, strict=True)
    n: int | None = Field(default=None, strict=True, ge=1)
    temperature: float | None = Field(default=None, strict=True, allow_inf_nan=False, ge=0, le=2)
    top_p: float | None = Field(default=None, strict=True, allow_inf_nan=False, ge=0, le=1)
    max_tokens: int | None = Field(default=None, strict=True, ge=1)
    max_completion_tokens: int | None = Field(default=None, strict=True, ge=1)
    seed: int | None = Field(default=None, strict=True, ge=-(1 << 63), le=(1 << 63) - 1)
    stream_options: dict | None = None
    steer: dict[str, float] | None = Field(default=None, strict=True)  # vector name → strength (convsim)
    steer_strength: float | None = Field(default=None, strict=True, allow_inf_nan=False)  # the one vector


class AttributionRequest(BaseModel):
    """POST /v1/attribution: which training messages a reply (one message or a burst) resembles most."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    reply: str | list[str]
    k: int = Field(default=5, strict=True, ge=1, le=50)
    speaker: str | None = None  # only that person's training messages


def validate(cls, body):
    """`cls(**body)` with pydantic's complaint turned into one OpenAI-shaped 400."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_type")
    if cls is ChatRequest and body.get("model") is None:
        raise ApiError(400, "model is required (GET /v1/models lists them)", "invalid_value", param="model")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], "invalid_value", param=param) from None


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    convsim: dict  # {"run", "speaker", "messages": the bursts as message lists, "note" when one is empty}


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    convsim: dict | None = None  # {"note"}: the reply came out empty (a chunk with no choices)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "convsim"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- messages → history


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text can go into a chat history
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(
                    400,
                    f"messages[{i}]: only text content parts are supported",
                    "invalid_value",
                    param=f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "\n".join(parts)
    raise ApiError(
        400,
        f"messages[{i}].content must be a string or a list of text parts",
        "invalid_type",
        param=f"messages[{i}].content",
    )


def parse_history(messages, speaker: str, speakers: list[str], other: str, max_messages: int = 10_000) -> list:
    """OpenAI messages → convsim Messages. `name` picks the person; without it, assistant = `speaker`
    and user = `other`. System and developer messages are ignored (a chat history has no place for them).
    Assistant content is split on newlines into the burst it came from."""
    from convsim.data.schema import Message

    if not isinstance(messages, list):
        raise ApiError(400, "messages must be a list", "invalid_type", param="messages")
    if len(messages) > max_messages:
        raise ApiError(
            400, f"too many messages ({len(messages)}; at most {max_messages})", "invalid_value", param="messages"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_type", param=f"messages[{i}]")
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise ApiError(
                400,
                f"messages[{i}]: role {role!r} is not supported (use user or assistant)",
                "invalid_value",
                param=f"messages[{i}].role",
            )
        name = m.get("name")
        if name is not None and name not in speakers:
            raise ApiError(
                400,
                f"messages[{i}]: unknown name {name!r}; this run knows {', '.join(speakers)}",
                "invalid_value",
                param=f"messages[{i}].name",
            )
        who = name or (speaker if role == "assistant" else other)
        text = _content(m, i)
        lines = text.split("\n") if role == "assistant" else [text]
        out += [Message(who, t.strip()) for t in lines if t.strip()]
    return out

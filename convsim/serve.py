"""`convsim serve`: an OpenAI-compatible HTTP API for a run, and a small chat page at `/`.

    convsim serve runs/me                                   # http://127.0.0.1:8000/  (API at /v1)
    CONVSIM_API_KEY=secret convsim serve runs/me --host 0.0.0.0 --steer happy.safetensors:4

Endpoints: POST /v1/chat/completions (streaming or not), GET /v1/models, GET /v1/models/{id},
GET /v1/info (speakers, steering, limits; for the page), GET /health, GET / (the chat page).

Who speaks is the `model`: `convsim/<Name>`, one model per speaker. History messages map to people by
their `name`; without one, `assistant` is the model's speaker and `user` the other person. A reply
burst (a person sending several messages in a row) comes back as one choice whose content is the
messages joined with "\\n"; an assistant message sent back is split on "\\n" into those messages again.

One worker thread owns the model (it is not thread-safe) and takes requests from a bounded queue in
order; a request that finds the queue full is answered 429 with Retry-After, never dropped silently.
Standard library only (http.server).
"""
from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from convsim.errors import UserError

HELP = "Serve a run over an OpenAI-compatible HTTP API (model = convsim/<speaker>) with a chat page at /."
EXAMPLES = """
  convsim serve runs/me                                  # chat page: http://127.0.0.1:8000/
  convsim serve runs/me --port 9000 --steer happy.safetensors:4
  CONVSIM_API_KEY=secret convsim serve runs/me --host 0.0.0.0
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "convsim/Ana", "messages": [{"role": "user", "content": "hi!"}]}'
"""
PAGE = Path(__file__).parent / "assets" / "chat.html"
MODEL_PREFIX = "convsim/"


def add_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("CONVSIM_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $CONVSIM_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--steer", metavar="VECTOR[:STRENGTH]",
                   help="load a steering vector; requests may set `steer_strength` (the page shows a slider)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on a reply's tokens (default 256)")
    p.add_argument("--max-context-tokens", type=int, default=1024,
                   help="cap on the history's tokens; older messages drop first (default 1024)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="cap on a request body (default 1024 KiB)")
    p.add_argument("--queue-size", type=int, default=32, help="requests waiting beyond this get 429 (default 32)")
    p.add_argument("--quiet", action="store_true", help="no access log")


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 256
    max_context_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    queue_size: int = 32
    max_n: int = 4
    max_steer: float = 64.0


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- requests → jobs

@dataclass
class Job:
    speaker: str
    history: list            # list[Message]
    cfg: object              # SampleConfig
    n: int = 1
    stream: bool = False
    strength: float | None = None
    include_usage: bool = False     # streaming: a last chunk with usage (stream_options.include_usage)
    cancelled: bool = False

    def __post_init__(self):
        self.events: queue.Queue = queue.Queue()


def _number(body, key, lo, hi, default, integer=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
        raise ApiError(400, f"{key} must be a {'whole ' if integer else ''}number from {lo} to {hi}",
                       "invalid_value", param=key)
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):   # content parts: only text can go into a chat history
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", "invalid_value",
                               param=f"messages[{i}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "invalid_type",
                   param=f"messages[{i}].content")


def parse_history(messages, speaker: str, speakers: list[str], other: str) -> list:
    """OpenAI messages → convsim Messages. `name` picks the person; without it, assistant = `speaker`
    and user = `other`. System and developer messages are ignored (a chat history has no place for them).
    Assistant content is split on newlines into the burst it came from."""
    from convsim.data.schema import Message
    if not isinstance(messages, list):
        raise ApiError(400, "messages must be a list", "invalid_type", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_type", param=f"messages[{i}]")
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role {role!r} is not supported (use user or assistant)",
                           "invalid_value", param=f"messages[{i}].role")
        name = m.get("name")
        if name is not None and name not in speakers:
            raise ApiError(400, f"messages[{i}]: unknown name {name!r}; this run knows {', '.join(speakers)}",
                           "invalid_value", param=f"messages[{i}].name")
        who = name or (speaker if role == "assistant" else other)
        text = _content(m, i)
        lines = text.split("\n") if role == "assistant" else [text]
        out += [Message(who, t.strip()) for t in lines if t.strip()]
    return out


def fit_history(tok, fmt, history, speaker: str, budget: int) -> list:
    """The most recent messages whose tokens fit `budget` with the prompt around them; a single message
    too long by itself keeps its end. Each message is tokenized at most once (bodies can be large)."""
    from convsim.data.examples import render, tag_ids, text_ids
    from convsim.data.schema import Message
    used = len(render(tok, fmt, [], speaker).input_ids)
    kept = []
    for m in reversed(history):
        text = m.text[-16 * budget:]          # no token is longer than 16 characters in practice
        ids = text_ids(tok, text)
        cost = len(tag_ids(tok, fmt, m.speaker)) + len(ids)
        if used + cost > budget:
            room = budget - used - len(tag_ids(tok, fmt, m.speaker)) - 8   # decode → encode may grow a little
            if not kept and room > 0:
                kept.append(Message(m.speaker, tok.decode(ids[-room:], skip_special_tokens=True).strip()))
            break
        kept.append(Message(m.speaker, text))
        used += cost
    return kept[::-1]


# ----------------------------------------------------------------------------- the model's one worker

class Service:
    """A loaded run, its one generation worker and its bounded queue."""

    def __init__(self, run, model, tok, api_key: str | None = None, limits: Limits = Limits(),
                 steering: tuple | None = None):
        self.run, self.model, self.tok, self.fmt = run, model, tok, run.fmt
        self.speakers = run.people  # the models served: the people the run simulates
        self.names = run.speakers  # every name a history may hold
        self.api_key = api_key or None
        self.limits = limits
        self.vector, self.strength, self._steer, self.steer_name = steering or (None, None, None, None)
        self.queue: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.model_lock = threading.Lock()   # held while generating; tests hold it to fill the queue
        self.seconds_per_job = 1.0           # moving average (a guess until the first job), for Retry-After
        self.started = time.time()
        self.served = 0
        self.busy = False                    # a job is being generated
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="convsim-generate", daemon=True)
        self._worker.start()

    @classmethod
    def from_run(cls, run_dir, steer_arg: str | None = None, **kw) -> "Service":
        from convsim.runs import open_run
        run = open_run(run_dir)
        steering = load_steering(steer_arg) if steer_arg else None
        model, tok = run.load()
        if steering is not None and hasattr(steering[0], "check_fits"):
            steering[0].check_fits(model)     # refuse a vector of another model now, not per request
        return cls(run, model, tok, steering=steering, **kw)

    def alive(self) -> bool:
        return self._worker.is_alive() and not self._stopping.is_set()

    def submit(self, job: Job) -> None:
        if not self.alive():
            raise ApiError(503, "the server is shutting down", "unavailable", "server_error")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            wait = max(1, math.ceil(self.seconds_per_job * (self.queue.qsize() + 1)))
            raise ApiError(429, f"the server is busy ({self.limits.queue_size} requests waiting); retry in {wait} s",
                           "rate_limit_exceeded", type_="rate_limit_error", headers={"Retry-After": str(wait)}) from None

    def close(self) -> None:
        """Stop the worker after the job in hand; jobs still queued are answered 503."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)    # wake the worker now
        self._worker.join(timeout=30)

    def _work(self):
        while not self._stopping.is_set():
            try:
                job = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if job is None or job.cancelled:
                continue
            t0 = time.time()
            self.busy = True
            try:
                with self.model_lock:
                    self._generate(job)
            except Exception as e:  # answered to the client and logged; the worker keeps going
                if not isinstance(e, UserError):
                    traceback.print_exc()
                detail = str(e) if isinstance(e, UserError) else type(e).__name__
                job.events.put(("error", f"generation failed: {detail}"))
            finally:
                self.busy = False
            took = time.time() - t0
            self.seconds_per_job = took if not self.served else 0.7 * self.seconds_per_job + 0.3 * took
            self.served += 1
        while True:   # shutting down: nobody is left waiting forever
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.events.put(("error", "the server is shutting down"))

    def _steering(self, strength):
        if self.vector is None or not strength:
            return contextlib.nullcontext()
        return self._steer(self.model, self.vector, strength)

    def _generate(self, job: Job):
        from convsim.data.examples import tag_ids, text_ids
        from convsim.inference.generate import prompt_ids, reply, stream_reply
        tok, fmt, cfg = self.tok, self.fmt, job.cfg
        history = fit_history(tok, fmt, job.history, job.speaker, cfg.max_context_tokens)
        prompt_tokens = len(prompt_ids(tok, fmt, history, job.speaker, cfg.max_context_tokens))

        def completion_tokens(msgs):
            return sum(len(text_ids(tok, m)) for m in msgs) + max(0, len(msgs) - 1) * len(tag_ids(tok, fmt, job.speaker))

        with self._steering(job.strength):
            if job.stream:
                msgs: list[str] = []
                for i, delta in stream_reply(self.model, tok, fmt, history, job.speaker, cfg):
                    sep = "\n" if i >= len(msgs) and msgs else ""   # a new message of the burst
                    while len(msgs) <= i:
                        msgs.append("")
                    msgs[i] += delta
                    if not job.cancelled:   # a gone client: finish quietly before the model is used again
                        job.events.put(("delta", sep + delta))
                bursts = [msgs]
            else:
                bursts = reply(self.model, tok, fmt, history, job.speaker, cfg, n=job.n)
        done = [completion_tokens(b) for b in bursts]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(done),
                 "total_tokens": prompt_tokens + sum(done)}
        finish = ["length" if d >= cfg.max_new_tokens else "stop" for d in done]
        job.events.put(("done", bursts, finish, usage))

    # -------------------------------------------------------------------- request → job

    def model_id(self, speaker: str) -> str:
        return MODEL_PREFIX + speaker

    def speaker_of(self, model) -> str:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required: one of " + ", ".join(map(self.model_id, self.speakers)),
                           "invalid_value", param="model")
        name = model[len(MODEL_PREFIX):] if model.startswith(MODEL_PREFIX) else model
        if name not in self.speakers:
            raise ApiError(404, f"the model {model!r} does not exist; this run serves "
                           + ", ".join(map(self.model_id, self.speakers)), "model_not_found")
        return name

    def job_for(self, body) -> Job:
        from convsim.inference.generate import SampleConfig
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_type")
        speaker = self.speaker_of(body.get("model"))
        history = parse_history(body.get("messages"), speaker, self.names, self.run.other_speaker(speaker))
        lim = self.limits
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "invalid_type", param="stream")
        n = _number(body, "n", 1, 1 if stream else lim.max_n, 1, integer=True)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number({key: max_tokens}, key, 1, 1 << 30, lim.max_new_tokens, integer=True)
        strength = None
        if self.vector is not None:
            strength = float(_number(body, "steer_strength", -lim.max_steer, lim.max_steer, self.strength))
        elif body.get("steer_strength") not in (None, 0):
            raise ApiError(400, "steer_strength needs a server started with --steer VECTOR", "steering_unavailable",
                           param="steer_strength")
        cfg = SampleConfig(temperature=float(_number(body, "temperature", 0, 2, 0.7)),
                           top_p=float(_number(body, "top_p", 0, 1, 0.95)) or 1.0,
                           max_new_tokens=min(max_tokens, lim.max_new_tokens),
                           max_context_tokens=lim.max_context_tokens,
                           seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True))
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        return Job(speaker, history, cfg, n=n, stream=stream, strength=strength, include_usage=include_usage)

    def info(self) -> dict:
        steer = None
        if self.vector is not None:
            top = max(abs(self.strength) * 2, 1.0)
            steer = {"vector": self.steer_name, "strength": self.strength, "min": -top, "max": top}
        return {"run": self.run.path.name, "base_model": self.run.model_name, "adapter_hash": self.run.adapter_hash,
                "speakers": self.speakers, "models": [self.model_id(s) for s in self.speakers], "steer": steer,
                "limits": {"max_new_tokens": self.limits.max_new_tokens,
                           "max_context_tokens": self.limits.max_context_tokens,
                           "max_body_bytes": self.limits.max_body_bytes, "queue_size": self.limits.queue_size}}


def load_steering(arg: str):
    """(vector, default strength, steer context manager, name) for `--steer VECTOR[:STRENGTH]`."""
    try:
        from convsim.steering.apply import parse_steer_arg, steer
    except ImportError as e:
        raise UserError(f"--steer needs convsim's steering module, which this installation lacks ({e})") from None
    vector, strength = parse_steer_arg(arg)
    name = getattr(vector, "name", None) or Path(arg.rsplit(":", 1)[0]).stem
    return vector, float(strength), steer, str(name)


# ----------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "convsim"
    timeout = 60                 # an idle or slow client loses its connection, not a thread forever
    service: Service             # set on the subclass made by make_server
    quiet = True
    loopback = True

    # ---- plumbing

    def log_message(self, format, *args):
        if not self.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _send_json(self, status: int, obj, headers: dict | None = None):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: ApiError):
        self._send_json(e.status, e.body(), e.headers)

    def send_error(self, code, message=None, explain=None):
        """Malformed HTTP (from http.server itself) also gets an OpenAI-style JSON error."""
        self.close_connection = True
        try:
            self._send_error(ApiError(code, message or self.responses.get(code, ("error",))[0], "bad_request"))
        except OSError:
            pass

    def _handle(self, fn):
        try:
            fn()
        except ApiError as e:
            self.close_connection = self.close_connection or e.status in (411, 413)
            try:
                self._send_error(e)
            except OSError:
                self.close_connection = True
                return
            if e.status in (411, 413):
                self._linger()
        except OSError:     # the client went away
            self.close_connection = True
        except Exception as e:   # a bug: answer 500 rather than hang up without a word
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_error(ApiError(500, f"internal error: {type(e).__name__}", "internal_error", "server_error"))

    def _linger(self):
        """Close after an unread body without a reset: stop writing, then read and drop what the client
        still sends (briefly), so it sees our answer instead of `connection reset`."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2.0)
            left = 64 << 20
            while left > 0:
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                left -= len(chunk)

    def _check_origin(self):
        """No cross-site use from a browser, and on loopback no DNS-rebinding: the page is same-origin only."""
        host = self.headers.get("Host", "")
        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != host:
            raise ApiError(403, "cross-origin requests are not allowed", "forbidden_origin")
        if self.loopback and not self.service.api_key:
            name = urlsplit("//" + host).hostname or ""
            if name not in ("localhost", "127.0.0.1", "::1") and not name.startswith("127."):
                raise ApiError(403, f"host {name!r} is not this machine's loopback address", "forbidden_host")

    def _check_key(self):
        key = self.service.api_key
        if not key:
            return
        got = self.headers.get("Authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key (send `Authorization: Bearer KEY`)" if token or got
                           else "missing API key (send `Authorization: Bearer KEY`)", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length", "length_required")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "send the body with a Content-Length", "length_required") from None
        if length < 0 or length > self.service.limits.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {self.service.limits.max_body_bytes} bytes",
                           "request_too_large")
        return self.rfile.read(length)

    @staticmethod
    def _parse_json(raw: bytes):
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", "invalid_json") from None

    # ---- routes

    def do_GET(self):
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _method_not_allowed(self):
        self.close_connection = True
        self._send_error(ApiError(405, f"{self.command} is not supported here", "method_not_allowed"))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    def _get(self):
        path = urlsplit(self.path).path
        svc = self.service
        if path == "/health":
            ok = svc.alive()
            return self._send_json(200 if ok else 503, {"status": "ok" if ok else "worker stopped",
                                                        "queued": svc.queue.qsize(), "busy": svc.busy,
                                                        "served": svc.served,
                                                        "uptime_s": round(time.time() - svc.started, 1)})
        self._check_origin()
        if path in ("/", "/index.html"):
            data = PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                        "style-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(data)
            return
        if not path.startswith("/v1/"):
            raise ApiError(404, f"no such path {path}", "not_found")
        self._check_key()
        created = int(svc.started)
        models = [{"id": svc.model_id(s), "object": "model", "created": created, "owned_by": "convsim"}
                  for s in svc.speakers]
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": models})
        if path.startswith("/v1/models/"):
            want = path[len("/v1/models/"):]
            from urllib.parse import unquote
            hit = [m for m in models if m["id"] == unquote(want)]
            if not hit:
                raise ApiError(404, f"the model {unquote(want)!r} does not exist", "model_not_found")
            return self._send_json(200, hit[0])
        if path == "/v1/info":
            return self._send_json(200, svc.info())
        raise ApiError(404, f"no such path {path}", "not_found")

    def _post(self):
        path = urlsplit(self.path).path
        raw = self._read_body()     # read before any answer, so the connection stays usable
        if path != "/v1/chat/completions":
            raise ApiError(404, f"no such path {path}", "not_found")
        self._check_origin()
        self._check_key()
        job = self.service.job_for(self._parse_json(raw))
        self.service.submit(job)
        if job.stream:
            self._stream(job)
        else:
            self._complete(job)

    def _wait(self, job: Job):
        while True:
            try:
                return job.events.get(timeout=1.0)
            except queue.Empty:
                if not self.service._worker.is_alive():   # only a crash; a shutdown answers every job
                    return ("error", "the generation worker stopped")

    def _complete(self, job: Job):
        event = self._wait(job)
        if event[0] == "error":
            raise ApiError(503 if "shutting down" in event[1] else 500, event[1], "generation_failed", "server_error")
        _, bursts, finish, usage = event
        choices = [{"index": i, "message": {"role": "assistant", "content": "\n".join(b)},
                    "logprobs": None, "finish_reason": f} for i, (b, f) in enumerate(zip(bursts, finish, strict=True))]
        self._send_json(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": self.service.model_id(job.speaker), "choices": choices, "usage": usage,
            "convsim": {"speaker": job.speaker, "messages": bursts}})

    def _stream(self, job: Job):
        self.close_connection = True     # the body ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        base = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.service.model_id(job.speaker)}

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(delta, finish=None):
            send({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        try:
            chunk({"role": "assistant", "content": ""})
            while True:
                event = self._wait(job)
                if event[0] == "delta":
                    chunk({"content": event[1]})
                elif event[0] == "error":
                    send({"error": {"message": event[1], "type": "server_error", "param": None,
                                    "code": "generation_failed"}})
                    break
                else:
                    _, _, finish, usage = event
                    chunk({}, finish[0])
                    if job.include_usage:
                        send({**base, "choices": [], "usage": usage})
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled = True   # the worker finishes the generation quietly


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256      # a burst of connections waits in the backlog instead of being refused
    block_on_close = False


def make_server(service: Service, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> Server:
    """An HTTP server bound to host:port for `service` (port 0: a free one; see server.server_address)."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0] if host else socket.AF_INET
    handler = type("BoundHandler", (Handler,), {"service": service, "quiet": quiet,
                                                 "loopback": is_loopback(host)})
    cls = type("BoundServer", (Server,), {"address_family": family})
    return cls((host, port), handler)


def is_loopback(host: str) -> bool:
    if host in ("", "0.0.0.0", "::"):
        return False
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise UserError(f"cannot resolve --host {host!r}") from None
    return all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


# ----------------------------------------------------------------------------- the command

def run(args):
    import signal
    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        raise UserError(f"--host {args.host} is reachable from other machines: set an API key (--api-key or "
                        "CONVSIM_API_KEY) or pass --insecure")
    for flag in ("max_new_tokens", "max_context_tokens", "max_body_kb", "queue_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be from 0 to 65535")
    limits = Limits(max_new_tokens=args.max_new_tokens, max_context_tokens=args.max_context_tokens,
                    max_body_bytes=args.max_body_kb * 1024, queue_size=args.queue_size)
    service = Service.from_run(args.run_dir, api_key=args.api_key, limits=limits, steer_arg=args.steer)
    try:
        server = make_server(service, args.host, args.port, quiet=args.quiet)
    except OSError as e:
        service.close()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {', '.join(service.model_id(s) for s in service.speakers)} on http://{shown}:{port}/ "
          f"(OpenAI base URL http://{shown}:{port}/v1{', API key required' if service.api_key else ''})", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        service.close()
    return 0

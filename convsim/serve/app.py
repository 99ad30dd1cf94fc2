"""The HTTP side of `convsim serve`: a FastAPI app over a `Service`, and uvicorn to run it.

    app = create_app(service, loopback=True)
    with running(app) as url: ...                      # uvicorn on 127.0.0.1:<free port> in a thread

Routes: POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models,
GET /v1/models/{id}, GET /v1/info (runs, people, vectors, memory, limits), POST /v1/attribution,
GET /health, GET / (the chat page). Every error is OpenAI-shaped JSON; the rules about who may call
live in `guards`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from convsim.serve.guards import Guards, read_body
from convsim.serve.schemas import (
    ApiError,
    ChatChunk,
    ChatCompletion,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    Usage,
)

PAGE = Path(__file__).resolve().parent.parent / "assets" / "chat.html"
CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", "invalid_json") from None


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(service, loopback: bool = True) -> FastAPI:
    """The app for `service`; `loopback`: it listens on a loopback address only (then, without an API key,
    requests must name a loopback Host)."""
    from convsim.inference.bursts import empty_note  # torch comes with it: imported once a service exists

    app = FastAPI(title="convsim", docs_url=None, redoc_url=None, openapi_url=None)
    svc = service

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 405:
            return error_response(ApiError(405, f"{request.method} is not supported here", "method_not_allowed"))
        if e.status_code == 404:
            return error_response(ApiError(404, f"no such path {request.url.path}", "not_found"))
        return error_response(ApiError(e.status_code, str(e.detail), "bad_request"))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # a bug: answer 500 rather than hang up without a word
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", "internal_error", "server_error"))

    @app.get("/health")
    async def health():
        ok = svc.alive()
        return JSONResponse(
            {
                "status": "ok" if ok else "worker stopped",
                "queued": svc.queue.qsize(),
                "busy": svc.busy,
                "served": svc.served,
                "batches": svc.batches,
                "uptime_s": round(time.time() - svc.started, 1),
            },
            status_code=200 if ok else 503,
        )

    @app.get("/")
    @app.get("/index.html")
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": CSP})

    def cards() -> list[ModelCard]:
        return [ModelCard(id=m, created=int(svc.started)) for m in svc.model_ids()]

    @app.get("/v1/models")
    async def models():
        return ModelList(data=cards()).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        mid, _, _ = svc.resolve(model_id)
        return ModelCard(id=mid, created=int(svc.started)).model_dump()

    @app.get("/v1/info")
    async def info():
        return svc.info()

    async def submitted(request: Request, make_job):
        """The request's JSON body made into a job (`make_job`) and queued for the worker."""
        job = make_job(parse_json(await read_body(request, svc.limits.max_body_bytes)))
        job.bind(asyncio.get_running_loop())
        svc.submit(job)
        return job

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        job = await submitted(request, svc.job_for)
        if job.stream:
            return StreamingResponse(
                _stream(job),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        event = await job.next_event(svc.alive)
        _raise_for(event)
        _, bursts, finish, usage = event
        choices = [
            Choice(index=i, message=ChatMessage(content="\n".join(b)), finish_reason=f)
            for i, (b, f) in enumerate(zip(bursts, finish, strict=True))
        ]
        extra = {"run": job.entry.name, "speaker": job.speaker, "messages": bursts, "batch_rows": job.batch[1]}
        if any(not b for b in bursts):  # an empty reply is never shown without a word
            extra["note"] = empty_note(job.speaker)
        return ChatCompletion(
            id="chatcmpl-" + uuid.uuid4().hex,
            created=int(time.time()),
            model=job.model_id,
            choices=choices,
            usage=Usage(**usage),
            convsim=extra,
        ).model_dump()

    async def _stream(job):
        base = dict(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()), model=job.model_id)

        def sse(obj) -> bytes:
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        def chunk(delta: Delta, finish=None) -> bytes:
            obj = ChatChunk(**base, choices=[ChunkChoice(delta=delta, finish_reason=finish)]).model_dump(
                exclude={"usage", "convsim"}
            )
            obj["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # only what this chunk adds
            return sse(obj)

        try:
            yield chunk(Delta(role="assistant", content=""))
            while True:
                event = await job.next_event(svc.alive)
                if event[0] == "delta":
                    yield chunk(Delta(content=event[1]))
                    continue
                if event[0] in ("error", "api_error"):
                    e = (
                        event[1]
                        if event[0] == "api_error"
                        else ApiError(500, event[1], "generation_failed", "server_error")
                    )
                    yield sse(e.body())
                else:
                    _, bursts, finish, usage = event
                    if not bursts[0]:  # an empty reply is never shown without a word
                        note = {"note": empty_note(job.speaker)}
                        yield sse(ChatChunk(**base, choices=[], convsim=note).model_dump(exclude={"usage"}))
                    yield chunk(Delta(), finish[0])
                    if job.include_usage:
                        yield sse(ChatChunk(**base, choices=[], usage=Usage(**usage)).model_dump(exclude={"convsim"}))
                break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a gone client's row stops at the next step; a finished one is unaffected

    @app.post("/v1/attribution")
    async def attribution(request: Request):
        job = await submitted(request, svc.attribution_job)
        event = await job.next_event(svc.alive)
        _raise_for(event)
        return event[1]

    return Guards(app, svc.api_key, loopback)


def _raise_for(event):
    if event[0] == "api_error":
        raise event[1]
    if event[0] == "error":
        raise ApiError(503 if "shutting down" in event[1] else 500, event[1], "generation_failed", "server_error")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), so the address is known before serving."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(app, quiet: bool = True):
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning" if quiet else "info",
        access_log=not quiet,
        timeout_keep_alive=60,
        timeout_graceful_shutdown=5,
        backlog=2048,
        lifespan="off",
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0):
    """uvicorn serving `app` in a thread (tests, benchmarks); yields the base URL and stops it after."""
    sock = bind(host, port)
    server = uvicorn_server(app)
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not server.started and th.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    try:
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(timeout=30)
        sock.close()

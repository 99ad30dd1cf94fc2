"""The server's rules about who may ask what, in one place: same-origin only from a browser, loopback
Host names only when no API key is set (no DNS rebinding), a constant-time bearer-key check, and a cap on
the request body that holds whether or not the client says how long it is.

`Guards` is a plain ASGI middleware (it wraps streaming responses without buffering them); `read_body`
is what a POST route calls to get its capped body.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from urllib.parse import urlsplit

from convsim.errors import UserError
from convsim.serve.schemas import ApiError

OPEN_PATHS = ("/health",)  # no key, no origin check, nothing private


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


def check_origin(headers: dict, loopback_only: bool) -> None:
    """No cross-site use from a browser, and on loopback without a key no DNS rebinding."""
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != host:
        raise ApiError(403, "cross-origin requests are not allowed", "forbidden_origin")
    if loopback_only:
        name = urlsplit("//" + host).hostname or ""
        if name not in ("localhost", "127.0.0.1", "::1") and not name.startswith("127."):
            raise ApiError(403, f"host {name!r} is not this machine's loopback address", "forbidden_host")


def check_key(headers: dict, key: str | None) -> None:
    if not key:
        return
    got = headers.get("authorization", "")
    token = got[7:].strip() if got[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(
            401,
            "missing or incorrect API key (send `Authorization: Bearer KEY`)"
            if token or got
            else "missing API key (send `Authorization: Bearer KEY`)",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def send_error(send, e: ApiError) -> None:
    data = json.dumps(e.body(), ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Guards:
    """ASGI middleware: origin/host and key checks before any route runs; /health is open."""

    def __init__(self, app, api_key: str | None, loopback: bool):
        self.app, self.api_key, self.loopback = app, api_key or None, loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if scope["method"] not in ("GET", "POST", "HEAD"):
                raise ApiError(405, f"{scope['method']} is not supported here", "method_not_allowed")
            check_origin(headers, self.loopback and not self.api_key)
            if scope["path"].startswith("/v1/") or scope["method"] == "POST":
                check_key(headers, self.api_key)
        except ApiError as e:
            return await send_error(send, e)
        return await self.app(scope, receive, send)


async def read_body(request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes (from
    Content-Length before reading, or while reading a body sent in chunks)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", "bad_request") from None
        if n > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)

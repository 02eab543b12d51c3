"""One HTTP request through an ASGI application inside this process, its response
streamed back as it is sent: how a replica runs ZSE's own FastAPI app (routes,
errors, keys, rate limits, streaming) for a request the ingress forwarded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from ..server.middleware import ASGIApp

Message = MutableMapping[str, Any]

#: Seconds the app gets, once its client has gone, to notice and cancel its work.
_WIND_DOWN_S = 5.0


@dataclass(frozen=True)
class HttpRequest:
    """What the ingress forwards of a request (picklable, so Ray can send it)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    """A response's first part: its status and headers (the body follows as bytes)."""

    status: int
    headers: list[tuple[bytes, bytes]]


class ClientGone(OSError):
    """Raised into the app's ``send`` once the caller stopped reading (ASGI 2.4)."""


async def call(app: ASGIApp, request: HttpRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Runs ``request`` through ``app``: yields the `ResponseStart`, then the body's
    pieces as the app sends them. Leaving the iteration early (the caller went away,
    or was cancelled) tells the app its client disconnected, as a server would, so
    that it cancels the request's work."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": list(request.headers),
        "client": request.client,
        "server": None,
    }
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():
            raise ClientGone
        sent.put_nowait(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while True:
            message = await sent.get()
            if message is None:  # the app returned (or raised) without finishing
                task.result()
                raise RuntimeError("the app ended without a complete response")
            if message["type"] == "http.response.start":
                yield ResponseStart(int(message["status"]), list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        await task
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), _WIND_DOWN_S)
            task.cancel()

"""ASGI middleware that runs before routing: API-key checks, the request-body limit,
and counting responses by status for `/metrics`. Written as plain ASGI (not
Starlette's ``BaseHTTPMiddleware``) so that streaming responses pass straight through."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from .errors import APIError
from .metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Routes that never need a key (load balancers and orchestrators probe them).
OPEN_PATHS = frozenset({"/health"})


async def _send_error(send: Send, err: APIError) -> None:
    resp = err.response()
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class ApiKeyAuth:
    """With keys configured, every route but `OPEN_PATHS` needs
    ``Authorization: Bearer KEY``. Keys are compared in constant time, and every key
    is compared, so the time taken says nothing about which one nearly matched."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        matched = False
        for key in self.keys:
            matched |= token is not None and hmac.compare_digest(token, key)
        if matched:
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send 'Authorization: Bearer YOUR_KEY'"
            if token is None
            else "invalid API key"
        )
        await _send_error(
            send,
            APIError(
                401,
                message,
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            ),
        )


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class _BodyTooLarge(Exception):
    """Raised into the app's body read when the body passes the limit."""


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413: at once when
    Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await _send_error(send, self._error())
                    return
        received = 0
        too_large = False
        answered = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return msg

        async def replacing_send(msg: Message) -> None:
            # Whatever the app answers to the aborted read (FastAPI makes it a 400),
            # the client gets the 413.
            nonlocal answered
            if not too_large:
                await send(msg)
            elif not answered:
                answered = True
                await _send_error(send, self._error())

        try:
            await self.app(scope, limited_receive, replacing_send)
        except _BodyTooLarge:
            if not answered:
                await _send_error(send, self._error())


class StatusCounter:
    """Counts responses by route and status code for `/metrics`."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Unknown paths share one label, so a scan cannot blow up the label set.
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500

        async def counting_send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()

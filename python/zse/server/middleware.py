"""ASGI middleware that runs before routing: API keys and rate limits, the
request-body limit, and counting responses by status for `/metrics`. Written as plain ASGI (not
Starlette's ``BaseHTTPMiddleware``) so that streaming responses pass straight through."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..keys import KeyStore
from .errors import APIError, unauthorized
from .metrics import Metrics
from .ratelimit import Limiter, Limits, retry_after_header

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Routes that never need a key (load balancers and orchestrators probe them).
OPEN_PATHS = frozenset({"/health"})

#: Routes that generate, and so count against rate limits.
LIMITED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


async def _send_error(send: Send, err: APIError) -> None:
    resp = err.response()
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


@dataclass(frozen=True)
class Account:
    """Who a request runs for: a managed key (its id and limits), or None for a
    ``--api-key`` key or a server without keys."""

    key_id: str | None = None
    limits: Limits = field(default_factory=Limits)


class Auth:
    """Keys and rate limits, before routing.

    With keys configured (``--api-key`` values and/or a key store), every route but
    `OPEN_PATHS` needs ``Authorization: Bearer KEY``. Static keys are compared in
    constant time, every one of them, so the time taken says nothing about which one
    nearly matched; managed keys are looked up in the store on every request, so a
    revoked or expired key is refused at once. The generation routes then pass the
    rate limiter (per key, and for the server); the request's `Account` goes to the
    routes in ``scope["zse.account"]`` so that its tokens are counted when it ends.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str],
        store: KeyStore | None,
        limiter: Limiter,
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.store = store
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        account = Account()
        if self.keys or self.store is not None:
            found = await self._authenticate(scope)
            if isinstance(found, APIError):
                await _send_error(send, found)
                return
            account = found
        scope["zse.account"] = account
        if scope["path"] not in LIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        decision = await self.limiter.check(account.key_id, account.limits)
        if not decision.allowed:
            headers = {
                **decision.headers,
                "Retry-After": retry_after_header(decision.retry_after_s),
            }
            await _send_error(
                send,
                APIError(
                    429,
                    f"rate limit reached: {decision.reason}; retry after "
                    f"{decision.retry_after_s:.1f} s",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers=headers,
                ),
            )
            return
        extra = [(k.encode(), v.encode()) for k, v in decision.headers.items()]

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start" and extra:
                msg = {**msg, "headers": [*msg.get("headers", []), *extra]}
            await send(msg)

        await self.app(scope, receive, send_with_headers)

    async def _authenticate(self, scope: Scope) -> Account | APIError:
        token = _bearer_token(scope)
        if token is None:
            return unauthorized("missing API key: send 'Authorization: Bearer YOUR_KEY'")
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        if matched:
            return Account()
        if self.store is not None:
            text = token.decode(errors="replace")
            record, state = await asyncio.to_thread(self.store.verify, text)
            if record is not None and state == "active":
                return Account(record.id, Limits(record.rpm, record.tpm))
            if record is not None:
                return unauthorized(f"this API key has been {state}")
        return unauthorized("invalid API key")


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

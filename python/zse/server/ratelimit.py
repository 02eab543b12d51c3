"""Requests and tokens per minute, per key and for the whole server, over a sliding
60-second window. A request is admitted when neither its key nor the server has used
its requests or tokens of the last minute; its tokens (prompt and completion) count
once it finishes. The limits and what is left go back in OpenAI's ``x-ratelimit-*``
headers; a refused request gets 429 with ``Retry-After``."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

WINDOW_S = 60.0


@dataclass
class _Window:
    """Amounts used, with when, over the last minute."""

    events: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def used(self, now: float) -> int:
        while self.events and self.events[0][0] <= now - WINDOW_S:
            self.total -= self.events.popleft()[1]
        return self.total

    def add(self, now: float, amount: int) -> None:
        if amount > 0:
            self.events.append((now, amount))
            self.total += amount

    def frees_in(self, now: float) -> float:
        """Seconds until the oldest amount leaves the window."""
        return max(0.0, self.events[0][0] + WINDOW_S - now) if self.events else 0.0


@dataclass(frozen=True)
class Limits:
    """Per-minute limits (None: unlimited)."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass
class _Usage:
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    retry_after_s: float = 0.0
    #: What ran out, for the error message ("requests" or "tokens", and whose).
    reason: str = ""


def _reset(seconds: float) -> str:
    return f"{max(seconds, 0.0):.3f}s"


class Limiter(Protocol):
    """What the server counts requests and tokens with: `RateLimiter` in this
    process, or one shared by every replica (`zse.ray`)."""

    async def check(self, key_id: str | None, limits: Limits) -> Decision: ...

    def record_tokens(self, key_id: str | None, tokens: int) -> None: ...


class RateLimiter:
    def __init__(self, server: Limits) -> None:
        self.server = server
        self._server_usage = _Usage()
        self._keys: dict[str, _Usage] = {}

    def admit(self, key_id: str | None, limits: Limits, now: float | None = None) -> Decision:
        """Counts a request against the key (when it has limits) and the server, or
        refuses it."""
        now = time.monotonic() if now is None else now
        scopes: list[tuple[str, Limits, _Usage]] = [("server", self.server, self._server_usage)]
        if key_id is not None and (limits.rpm is not None or limits.tpm is not None):
            scopes.append(("key", limits, self._keys.setdefault(key_id, _Usage())))
        headers: dict[str, str] = {}
        refusals: list[tuple[float, str]] = []
        # The headers describe the tightest scope: the key's when it has one.
        for who, lim, use in scopes:
            for kind, limit, window in (
                ("requests", lim.rpm, use.requests),
                ("tokens", lim.tpm, use.tokens),
            ):
                if limit is None:
                    continue
                used = window.used(now)
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(limit - used, 0))
                headers[f"x-ratelimit-reset-{kind}"] = _reset(window.frees_in(now))
                if used >= limit:
                    refusals.append((window.frees_in(now), f"{who} {kind} per minute ({limit})"))
        if refusals:
            wait, reason = max(refusals)
            return Decision(False, headers, retry_after_s=wait, reason=reason)
        for _, _, use in scopes:
            use.requests.add(now, 1)
        if "x-ratelimit-remaining-requests" in headers:
            left = int(headers["x-ratelimit-remaining-requests"]) - 1
            headers["x-ratelimit-remaining-requests"] = str(max(left, 0))
        return Decision(True, headers)

    async def check(self, key_id: str | None, limits: Limits) -> Decision:
        """`admit`, as the server's middleware awaits it (`Limiter`)."""
        return self.admit(key_id, limits)

    def record_tokens(self, key_id: str | None, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._server_usage.tokens.add(now, tokens)
        if key_id is not None and key_id in self._keys:
            self._keys[key_id].tokens.add(now, tokens)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))

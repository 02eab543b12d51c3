"""From a validated request to engine streams and back: starting the ``n`` choices,
merging their deltas, timing them for `/metrics`, and cancelling them when the client
goes away or the server stops. The routes only shape what this returns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..engine import AsyncDeltaStream, Delta, Engine, TokenLogprob, Usage
from .context import InFlight, ServerContext
from .errors import APIError, from_engine, internal, shutting_down
from .metrics import Metrics

log = logging.getLogger("zse.server")


@dataclass
class Generation:
    """One request's choices, running. Use as an async context manager: leaving it
    cancels whatever is still generating (a client that went away, an error)."""

    engine: Engine
    metrics: Metrics
    inflight: InFlight
    streams: list[AsyncDeltaStream]
    prompt_tokens: int
    started: float
    _last_token: dict[int, float] = field(default_factory=dict)
    completion_tokens: int = 0
    #: Called once at the end with the request's tokens (prompt and completion).
    on_finish: Callable[[int], None] | None = None

    @classmethod
    def start(
        cls,
        ctx: ServerContext,
        prompt_ids: Sequence[Sequence[int]],
        sampling: dict[str, Any],
        n: int,
        prompt_param: str,
        request: Request | None = None,
    ) -> Generation:
        """Submits ``n`` choices per prompt (choice index = prompt index * n + i),
        which share the prompt's cache. With a seed, choice i uses seed + i, so the
        choices differ but the request is reproducible."""
        engine: Engine = ctx.engine
        if ctx.inflight.draining:
            raise shutting_down()
        max_tokens = sampling.get("max_tokens")
        longest = max((len(ids) for ids in prompt_ids), default=0)
        # (A prompt that alone fills the context is the engine's error, about the prompt.)
        room = engine.context_length - longest
        if max_tokens is not None and 0 < room < max_tokens:
            raise APIError(
                400,
                f"max_tokens is too large: {max_tokens}. The context holds "
                f"{engine.context_length} tokens and the prompt takes {longest}, so at "
                f"most {room} can be generated",
                param="max_tokens",
                code="context_length_exceeded",
            )
        streams: list[AsyncDeltaStream] = []
        try:
            for ids in prompt_ids:
                streams += engine.astream_choices(ids, n, **sampling)
        except Exception as e:
            for s in streams:
                s.cancel()
            raise from_engine(e, prompt_param) from None
        ctx.inflight.add(streams)
        account = request.scope.get("zse.account") if request is not None else None
        key_id = getattr(account, "key_id", None)
        return cls(
            engine=engine,
            metrics=ctx.metrics,
            inflight=ctx.inflight,
            streams=streams,
            prompt_tokens=sum(len(ids) for ids in prompt_ids),
            started=time.perf_counter(),
            on_finish=lambda tokens: ctx.record_usage(key_id, tokens),
        )

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.streams:
            s.cancel()
        self.inflight.discard(self.streams)
        if self.on_finish is not None:
            self.on_finish(self.prompt_tokens + self.completion_tokens)
            self.on_finish = None

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    def _observe(self, index: int, delta: Delta) -> None:
        if not delta.token_ids:
            return
        now = time.perf_counter()
        last = self._last_token.get(index)
        if last is None:
            self.metrics.time_to_first_token.observe(now - self.started)
        else:
            self.metrics.inter_token_latency.observe(now - last)
        self._last_token[index] = now
        self.completion_tokens += len(delta.token_ids)
        self.metrics.generated_tokens.inc(len(delta.token_ids))

    def check(self, delta: Delta) -> None:
        """Raises the API error for a choice that ended without an answer."""
        if delta.finish_reason == "error":
            log.error("the engine failed on a request: %s", delta.error)
            raise internal()
        if delta.finish_reason == "cancelled":
            raise shutting_down()

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """``(choice index, delta)`` in the order the engine produced them."""
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        async for index, delta in _merge(self.streams):
            self._observe(index, delta)
            yield index, delta

    async def collect(self, request: Request) -> list[Choice]:
        """Every choice to its end; cancels them all if the client disconnects."""
        choices = [Choice() for _ in self.streams]

        async def run() -> None:
            async for i, d in self.deltas():
                self.check(d)
                choices[i].add(d)

        work = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            raise ClientDisconnected
        work.result()
        return choices


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass
class Choice:
    """A choice's whole answer, accumulated from its deltas."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merge(streams: Sequence[AsyncDeltaStream]) -> AsyncIterator[tuple[int, Delta]]:
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncDeltaStream) -> None:
        try:
            async for d in s:
                queue.put_nowait((i, d))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def error_for(e: BaseException) -> APIError:
    """The error to report for an exception raised while a response is produced."""
    if isinstance(e, APIError):
        return e
    log.error("unexpected error while generating", exc_info=e)
    return internal()

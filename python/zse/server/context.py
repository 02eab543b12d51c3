"""What the routes share: the server's configuration and its running state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from ..engine import AsyncDeltaStream, Engine
from ..keys import KeyStore
from .errors import APIError
from .metrics import Metrics
from .options import ServeOptions
from .ratelimit import Limiter, Limits

#: Request bodies beyond this get 413 (a long chat is a few hundred KiB).
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


#: At most this many messages in a chat request (OpenAI accepts 2048).
DEFAULT_MAX_MESSAGES = 2048


@dataclass(frozen=True)
class ServerConfig:
    #: The id clients use for the model; "default" is accepted too.
    model_name: str
    api_keys: tuple[str, ...] = ()
    #: A SQLite file of managed keys (`zse keys`); None: no managed keys.
    keys_db: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_messages: int = DEFAULT_MAX_MESSAGES
    #: Server-wide requests and tokens per minute (None: unlimited).
    rate_limit: Limits = field(default_factory=Limits)
    #: Origins allowed to call the API from a browser; none by default (CORS off).
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, opts: ServeOptions, engine: Engine) -> ServerConfig:
        """What `zse serve` options ask of the API for ``engine``'s model."""
        # The id clients send: the file's (or source's) name, e.g. SmolLM2-135M-Instruct.
        name = opts.model_name or Path(opts.model or engine.metadata["path"]).stem
        return cls(
            model_name=name,
            api_keys=opts.api_keys,
            keys_db=opts.keys_db,
            rate_limit=Limits(opts.rate_limit_rpm, opts.rate_limit_tpm),
            cors_origins=opts.cors_origins,
        )


class InFlight:
    """The engine streams the server is running for clients. At shutdown the server
    stops taking requests (``draining``), waits for these, then cancels them."""

    def __init__(self) -> None:
        self.draining = False
        self._streams: set[AsyncDeltaStream] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, streams: Sequence[AsyncDeltaStream]) -> None:
        self._streams.update(streams)
        self._idle.clear()

    def discard(self, streams: Sequence[AsyncDeltaStream]) -> None:
        self._streams.difference_update(streams)
        if not self._streams:
            self._idle.set()

    def __len__(self) -> int:
        return len(self._streams)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def cancel_all(self) -> None:
        for s in list(self._streams):
            s.cancel()


@dataclass
class ServerContext:
    engine: Engine
    config: ServerConfig
    metrics: Metrics
    limiter: Limiter
    keys: KeyStore | None = None
    inflight: InFlight = field(default_factory=InFlight)
    started_at: float = field(default_factory=time.time)

    def record_usage(self, key_id: str | None, tokens: int) -> None:
        """Counts a finished request's tokens against its key and the server."""
        self.limiter.record_tokens(key_id, tokens)
        if key_id is not None and self.keys is not None:
            store = self.keys
            # The file write runs off the event loop; a failure only loses a count.
            asyncio.get_running_loop().run_in_executor(None, store.record_use, key_id, tokens)

    def served_model(self, requested: str) -> str:
        """The model id to answer with; unknown ids are the caller's 404."""
        if requested in (self.config.model_name, "default"):
            return self.config.model_name
        raise APIError(
            404,
            f"the model '{requested}' does not exist; this server serves "
            f"'{self.config.model_name}' (or use 'default')",
            param="model",
            code="model_not_found",
        )


def context(request: Request) -> ServerContext:
    """The routes' dependency: the context `create_app` stored on the app."""
    ctx: ServerContext = request.app.state.ctx
    return ctx


#: A route parameter that receives the server's context.
Ctx = Annotated[ServerContext, Depends(context)]

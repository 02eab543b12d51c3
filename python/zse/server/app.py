"""`create_app`: the ASGI application for one engine."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..engine import Engine
from ..keys import KeyStore
from . import completions, errors, info
from .context import ServerConfig, ServerContext
from .metrics import Metrics
from .middleware import Auth, BodyLimit, StatusCounter
from .ratelimit import Limiter, RateLimiter


def create_app(engine: Engine, config: ServerConfig, limiter: Limiter | None = None) -> FastAPI:
    """The OpenAI-compatible API over ``engine``. The caller owns the engine (and
    closes it after the server stops). ``limiter`` counts the rate limits (default:
    this process's own; `zse.ray` shares one between replicas)."""
    app = FastAPI(
        title="ZSE",
        version=__version__,
        summary="OpenAI-compatible API of a ZSE inference server",
    )
    ctx = ServerContext(
        engine=engine,
        config=config,
        metrics=Metrics(engine),
        limiter=limiter or RateLimiter(config.rate_limit),
        keys=KeyStore(config.keys_db) if config.keys_db else None,
    )
    app.state.ctx = ctx
    app.include_router(completions.router)
    app.include_router(info.router)
    errors.install(app)
    # The metrics label requests by these paths (anything else is "other").
    routes = frozenset(
        [
            getattr(r, "path", "")
            for router in (completions.router, info.router)
            for r in router.routes
        ]
        + ["/docs", "/openapi.json"]
    )
    # Outermost first at run time: count every response, answer CORS preflights
    # (which carry no key), check the key and the rate limits before reading a
    # body, then bound the body.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(Auth, keys=config.api_keys, store=ctx.keys, limiter=ctx.limiter)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "x-ratelimit-*"],
        )
    app.add_middleware(StatusCounter, metrics=ctx.metrics, routes=routes)
    return app

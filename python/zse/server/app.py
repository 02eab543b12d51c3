"""`create_app`: the ASGI application for one engine."""

from __future__ import annotations

from fastapi import FastAPI

from .. import __version__
from ..engine import Engine
from . import completions, errors, info
from .context import ServerConfig, ServerContext
from .metrics import Metrics
from .middleware import ApiKeyAuth, BodyLimit, StatusCounter


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The OpenAI-compatible API over ``engine``. The caller owns the engine (and
    closes it after the server stops)."""
    app = FastAPI(
        title="ZSE",
        version=__version__,
        summary="OpenAI-compatible API of a ZSE inference server",
    )
    ctx = ServerContext(engine=engine, config=config, metrics=Metrics(engine))
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
    # Outermost first at run time: count every response, then check the key before
    # reading a body, then bound the body.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=config.api_keys)
    app.add_middleware(StatusCounter, metrics=ctx.metrics, routes=routes)
    return app

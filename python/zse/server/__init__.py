"""The OpenAI-compatible HTTP server: FastAPI routes served by granian.

- `app`: `create_app(engine, config)`, the ASGI application;
- `completions`: ``/v1/chat/completions`` and ``/v1/completions`` (JSON and SSE);
- `info`: ``/v1/models``, ``/health``, ``/metrics``;
- `generation`: running a request's choices on the engine, disconnects, timings;
- `schemas`: request and response bodies; `errors`: OpenAI-shaped errors;
- `middleware`: API keys, body limit, status counts; `metrics`: Prometheus;
- `context`: configuration and shared state; `run`: `serve`, the process around it;
- `options`: what `zse serve` is asked for, and opening its engine.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .context import ServerConfig
    from .options import ServeOptions
    from .run import serve

__all__ = ["ServeOptions", "ServerConfig", "create_app", "serve"]

# Imported on first use, so that `zse.server.options` can be imported without FastAPI
# (see `options`).
_WHERE = {
    "create_app": ".app",
    "ServerConfig": ".context",
    "ServeOptions": ".options",
    "serve": ".run",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

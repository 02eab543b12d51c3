"""The OpenAI-compatible HTTP server: FastAPI routes served by granian.

- `app`: `create_app(engine, config)`, the ASGI application;
- `completions`: ``/v1/chat/completions`` and ``/v1/completions`` (JSON and SSE);
- `info`: ``/v1/models``, ``/health``, ``/metrics``;
- `generation`: running a request's choices on the engine, disconnects, timings;
- `schemas`: request and response bodies; `errors`: OpenAI-shaped errors;
- `middleware`: API keys, body limit, status counts; `metrics`: Prometheus;
- `context`: configuration and shared state; `run`: `serve`, the process around it.
"""

from .app import create_app
from .context import ServerConfig
from .run import ServeOptions, serve

__all__ = ["ServeOptions", "ServerConfig", "create_app", "serve"]

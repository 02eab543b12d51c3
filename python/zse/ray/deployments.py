"""The Ray Serve deployments: `ZseReplica` (one engine and ZSE's own FastAPI app,
so every replica answers with the same routes, errors, keys and streaming) and
`ZseIngress` (reads each request, keys it by its prompt's prefix and streams the
answer of the replica `PrefixAffinityRouter` picks). Rate limits are counted by
one `RateLimiter` actor that every replica shares."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..server.app import create_app
from ..server.context import ServerConfig
from ..server.errors import APIError, overloaded
from ..server.options import ServeOptions, open_engine
from ..server.ratelimit import Decision, Limits, RateLimiter
from . import asgi
from .router import PrefixAffinityRouter, affinity_key

log = logging.getLogger("zse.ray")

#: The response header naming the replica that answered.
REPLICA_HEADER = b"x-zse-replica"
#: Response headers the ingress sets itself (the body's length and framing).
_HOP_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class SharedLimiter:
    """The server's `Limiter` on a Ray actor holding one `RateLimiter`: every
    replica's requests and tokens count against the same minute."""

    def __init__(self, name: str, limits: Limits) -> None:
        # Detached and named: whichever replica starts first creates it, the others
        # (and a replica Ray restarts) find it.
        actor = ray.remote(num_cpus=0, max_restarts=-1)(RateLimiter)
        self._actor = actor.options(
            name=name, namespace="zse", get_if_exists=True, lifetime="detached"
        ).remote(limits)

    async def check(self, key_id: str | None, limits: Limits) -> Decision:
        decision: Decision = await self._actor.admit.remote(key_id, limits)
        return decision

    def record_tokens(self, key_id: str | None, tokens: int) -> None:
        self._actor.record_tokens.remote(key_id, tokens)  # counted; nothing to wait for


@serve.deployment
class ZseReplica:
    """One engine and the API over it. The ingress calls `respond` with the request's
    affinity key first (what the router reads) and the request itself."""

    def __init__(self, opts: ServeOptions, limits_actor: str) -> None:
        self._engine = open_engine(opts)
        config = ServerConfig.from_options(opts, self._engine)
        self._app = create_app(self._engine, config, SharedLimiter(limits_actor, config.rate_limit))
        # Which replica answered, in a response header (for people and tests).
        replica = serve.get_replica_context().replica_id.unique_id
        self._header = (REPLICA_HEADER, replica.encode())

    async def respond(
        self, key: str | None, request: asgi.HttpRequest
    ) -> AsyncIterator[asgi.ResponseStart | bytes]:
        async for part in asgi.call(self._app, request):
            if isinstance(part, asgi.ResponseStart):
                part = asgi.ResponseStart(part.status, [*part.headers, self._header])
            yield part

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()


def _replica_gone() -> APIError:
    return APIError(
        503,
        "the replica serving this request stopped; retry (Ray is bringing it back)",
        type="server_error",
        code="replica_unavailable",
        headers={"Retry-After": "1"},
    )


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ZseIngress:
    """Every HTTP request: its body read (bounded), its affinity key taken, and the
    replica's answer streamed back. A replica that dies mid-request fails only its
    own requests: a 503 before the answer began, an error event in a stream."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int) -> None:
        self._replicas = replicas.options(stream=True)
        self._max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> Response:
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self._max_body_bytes:
                return APIError(
                    413,
                    f"the request body is larger than {self._max_body_bytes} bytes",
                    code="request_too_large",
                ).response()
        forwarded = asgi.HttpRequest(
            method=request.method,
            path=request.url.path,
            query_string=request.url.query.encode(),
            headers=list(request.headers.raw),
            body=bytes(body),
            client=(request.client.host, request.client.port) if request.client else None,
        )
        key = affinity_key(forwarded.body) if request.method == "POST" else None
        answer: DeploymentResponseGenerator = self._replicas.respond.remote(key, forwarded)
        streaming = False
        try:
            start = await answer.__anext__()
            assert isinstance(start, asgi.ResponseStart)
            media = dict(start.headers).get(b"content-type", b"")
            if media.startswith(b"text/event-stream"):
                streaming = True  # _rest owns the answer now
                response: Response = StreamingResponse(_rest(answer), status_code=start.status)
            else:
                whole = b"".join([piece async for piece in _pieces(answer)])
                response = Response(whole, status_code=start.status)
        except BackPressureError:
            return overloaded("every replica is busy and the queue is full; retry").response()
        except Exception as e:
            log.warning("a replica failed a request: %r", e)
            return _replica_gone().response()
        finally:
            if not streaming:  # done (a no-op), failed, or the client left: cancelled
                answer.cancel()
        headers = [(k, v) for k, v in start.headers if k.lower() not in _HOP_HEADERS]
        response.raw_headers = [
            *(h for h in response.raw_headers if h[0] == b"content-length"),
            *headers,
        ]
        return response


async def _pieces(answer: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    async for piece in answer:
        assert isinstance(piece, bytes)
        yield piece


async def _rest(answer: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """An SSE body's pieces; the client leaving early cancels the replica's work."""
    try:
        async for piece in _pieces(answer):
            yield piece
    except Exception as e:
        log.warning("a replica failed a stream: %r", e)
        yield _replica_gone().sse_event().encode() + b"data: [DONE]\n\n"
    finally:
        answer.cancel()


def deployment_args(
    replicas: int, cpus: float, gpus: float, opts: ServeOptions, prefix_affinity: bool
) -> dict[str, Any]:
    """`ZseReplica`'s Ray Serve options."""
    routing: dict[str, Any] = {}
    if prefix_affinity:
        router = RequestRouterConfig(request_router_class=PrefixAffinityRouter)
        routing["request_router_config"] = router
    return {
        "num_replicas": replicas,
        # A replica "has room" while it runs fewer requests than its engine's
        # sequences; past that the router sends a prefix's requests elsewhere.
        "max_ongoing_requests": opts.max_sequences,
        # Beyond the engines' queues together, a 503 (as one engine's full queue is).
        "max_queued_requests": replicas * opts.max_queue,
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        **routing,
    }

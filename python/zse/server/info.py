"""The routes that describe the server: ``/v1/models``, ``/health`` and ``/metrics``."""

from __future__ import annotations

import time
from typing import Any

import psutil
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..units import format_bytes
from .context import Ctx, ServerContext
from .errors import ERROR_RESPONSES
from .schemas import ModelCard, ModelList

router = APIRouter()


def _card(ctx: ServerContext) -> ModelCard:
    return ModelCard(id=ctx.config.model_name, created=int(ctx.started_at))


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=ERROR_RESPONSES,
    summary="List the served model",
)
async def list_models(ctx: Ctx) -> ModelList:
    return ModelList(data=[_card(ctx)])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses=ERROR_RESPONSES,
    summary="Describe a model",
)
async def get_model(model_id: str, ctx: Ctx) -> ModelCard:
    ctx.served_model(model_id)
    return _card(ctx)


def _duration(seconds: float) -> str:
    m, _ = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {int(seconds) % 60}s"


@router.get("/health", summary="Liveness, memory and engine state (never needs a key)")
async def health(ctx: Ctx) -> dict[str, Any]:
    uptime = time.time() - ctx.started_at
    stats = ctx.engine.stats()
    limits = ctx.engine.limits
    process = psutil.Process().memory_info().rss
    machine = psutil.virtual_memory()
    # On a GPU, its memory as the driver reports it (every process's); on the CPU
    # there is none, and the engine's memory is this process's.
    gpu = ctx.engine.gpu_memory()
    return {
        "status": "draining" if ctx.inflight.draining else "healthy",
        "model": ctx.config.model_name,
        "device": ctx.engine.device,
        "gpu_memory_used": None if gpu is None else format_bytes(gpu[0], binary=False),
        "gpu_memory_total": None if gpu is None else format_bytes(gpu[1], binary=False),
        "process_memory_used": format_bytes(process, binary=False),
        "system_memory_used": format_bytes(machine.total - machine.available, binary=False),
        "system_memory_total": format_bytes(machine.total, binary=False),
        "uptime": _duration(uptime),
        "uptime_seconds": round(uptime, 1),
        "engine": {
            "running_sequences": stats["running"],
            "waiting_requests": stats["waiting"],
            "finished_requests": stats["finished"],
            "max_sequences": limits["max_sequences"],
            "max_queue": limits["max_queue"],
            "kv_cache_used_tokens": stats["kv_used_tokens"],
            "kv_cache_blocks_used": stats["kv_blocks_used"],
            "kv_cache_blocks_total": limits["kv_blocks"],
            "kv_cache_capacity_tokens": limits["kv_cache_tokens"],
            "prefix_cache_hit_tokens": stats["prefix_hit_tokens"],
        },
    }


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses=ERROR_RESPONSES,
)
async def metrics(ctx: Ctx) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

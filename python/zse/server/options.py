"""`ServeOptions` and `open_engine`: what `zse serve` is asked for, and the model it
loads. Kept apart from the server's modules (and imported without them, see the
package's `__getattr__`) so that `zse serve` can start loading the model on a thread
while FastAPI and the routes import: the load releases the GIL, and the imports take
about as long as a small model's load."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._core import resolve_device
from ..convert import Quant
from ..engine import (
    DEFAULT_KV_CACHE_MB,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SEQUENCES,
    Engine,
)
from ..models import resolve_model


@dataclass(frozen=True)
class ServeOptions:
    model: str | None = None
    quant: Quant | None = None
    allow_requantize: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    model_name: str | None = None
    context_length: int | None = None
    #: None: DEFAULT_KV_CACHE_MB on the CPU; on a GPU, ``gpu_memory_fraction`` of its
    #: free memory less the weights.
    kv_cache_mb: float | None = None
    device: str = "auto"
    gpu_memory_fraction: float = 0.9
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    max_queue: int = DEFAULT_MAX_QUEUE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    threads: int | None = None
    log_level: str = "info"
    grace_s: float = 30.0
    #: Managed keys (`zse keys`); None: only ``api_keys``.
    keys_db: str | None = None
    #: Server-wide requests and tokens per minute.
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    cors_origins: tuple[str, ...] = ()
    #: Jinja chat template text replacing the model's (or where it has none).
    chat_template: str | None = None


def open_engine(opts: ServeOptions) -> Engine:
    """The engine `opts` ask for: the model resolved (fetched or converted into the
    cache where needed), on its device, with the CPU's default KV budget."""
    if opts.threads is not None:
        # candle sizes its thread pool from this when the engine first computes.
        os.environ["RAYON_NUM_THREADS"] = str(opts.threads)
    path = resolve_model(opts.model, quant=opts.quant, allow_requantize=opts.allow_requantize)
    device = resolve_device(opts.device)
    kv_cache_mb = opts.kv_cache_mb
    if kv_cache_mb is None and device == "cpu":
        kv_cache_mb = DEFAULT_KV_CACHE_MB
    return Engine(
        path,
        context_length=opts.context_length,
        max_sequences=opts.max_sequences,
        max_queue=opts.max_queue,
        kv_cache_mb=kv_cache_mb,
        max_batch_tokens=opts.max_batch_tokens,
        device=device,
        gpu_memory_fraction=opts.gpu_memory_fraction,
        chat_template=opts.chat_template,
    )

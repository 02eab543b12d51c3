"""`serve`: load a model, print the banner, and run the API on granian until a signal.

Granian runs embedded in this process (its Rust runtime carries the sockets and HTTP;
the app runs on this process's asyncio loop), so the engine, the app and the signal
handling share one process and one event loop: one worker, as DESIGN.md asks, with no
second interpreter to start. On SIGINT/SIGTERM the server stops accepting, lets the
requests in flight finish for ``grace_s`` seconds, cancels what is left, and returns.
A second signal cancels at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from concurrent.futures import Future
from typing import Any

from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.embed import Server

from .. import __version__
from ..convert import missing_kernels_line
from ..engine import Engine
from ..units import format_bytes
from .app import create_app
from .context import ServerConfig, ServerContext
from .options import ServeOptions, open_engine

log = logging.getLogger("zse.server")


def serve(opts: ServeOptions, engine: Future[Engine] | None = None) -> int:
    """Runs the server until SIGINT/SIGTERM; returns the exit status (0). `engine`:
    the model already loading (`open_engine(opts)` on a thread of the caller's,
    started before this module's imports), else it is opened here."""
    _configure_logging(opts.log_level)
    loaded = engine.result() if engine is not None else open_engine(opts)
    try:
        config = ServerConfig.from_options(opts, loaded)
        app = create_app(loaded, config)
        _banner(opts, loaded, config)
        # What start-up built (modules, the app, schemas) lives as long as the
        # process: out of the collector's sight, full collections while serving
        # need not walk it.
        gc.freeze()
        asyncio.run(_run(app, app.state.ctx, opts))
    finally:
        loaded.close()
    log.info("stopped")
    return 0


async def _run(app: object, ctx: ServerContext, opts: ServeOptions) -> None:
    server = Server(
        app,
        address=opts.host,
        port=opts.port,
        interface=Interfaces.ASGI,
        websockets=False,
        log_level=LogLevels.debug if opts.log_level == "debug" else LogLevels.warning,
        log_access=opts.log_level == "debug",
    )
    # Embedding granian is the point (see the module docstring); its notice that
    # embedding is experimental would only alarm users at every start.
    logging.getLogger("_granian").addFilter(lambda r: "experimental" not in r.getMessage())
    loop = asyncio.get_running_loop()
    drain: asyncio.Task[None] | None = None

    async def drain_then_cancel() -> None:
        try:
            await asyncio.wait_for(ctx.inflight.wait_idle(), opts.grace_s)
        except TimeoutError:
            log.warning("grace period over: cancelling %d requests", len(ctx.inflight))
            ctx.inflight.cancel_all()

    def on_signal(name: str) -> None:
        nonlocal drain
        if drain is None:
            log.info(
                "%s: not accepting new requests; %d in flight get %.0f s to finish",
                name,
                len(ctx.inflight),
                opts.grace_s,
            )
            ctx.inflight.draining = True
            drain = loop.create_task(drain_then_cancel())
            server.stop()
        else:
            log.warning("%s again: cancelling %d requests now", name, len(ctx.inflight))
            ctx.inflight.cancel_all()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await server.serve()
    if drain is not None:
        drain.cancel()


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    zse_log = logging.getLogger("zse")
    zse_log.handlers[:] = [handler]
    zse_log.setLevel(level.upper())
    zse_log.propagate = False


def _kv_rows(limits: dict[str, Any], budget: str) -> list[tuple[str, str]]:
    """The banner's KV cache lines: its size and blocks, and where some layers attend
    within a window, the blocks of their pool and of the others'."""
    size = f"{limits['kv_bytes'] / 2**20:.0f} MiB"
    blocks = f"blocks of {limits['kv_block_size']} positions"
    w = limits.get("kv_window")
    if not w:
        per = f"{limits['kv_bytes_per_token']} B each"
        line = f"{size} = {limits['kv_blocks']} {blocks} ({per}){budget}, prefix reuse on"
        return [("KV cache", line)]
    return [
        ("KV cache", f"{size}{budget}, prefix reuse on"),
        ("", f"layers with a {w['window']}-position window: {w['blocks']} {blocks}"),
        ("", f"the others: {limits['kv_blocks']} {blocks}"),
    ]


def _banner(opts: ServeOptions, engine: Engine, config: ServerConfig) -> None:
    limits = engine.limits
    threads = os.environ.get("RAYON_NUM_THREADS") or str(os.cpu_count())
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    budget = engine.metadata["kv_budget"]
    kv_from = f", {opts.gpu_memory_fraction:g} of free GPU memory" if budget == "gpu memory" else ""
    device = engine.device
    gpu = engine.gpu_memory()
    if gpu is not None:
        used, total = (format_bytes(n, binary=True) for n in gpu)
        device += f" ({used} of {total} used)"
    slow = missing_kernels_line(engine.metadata["matrices_without_kernel"])
    rows = [
        ("model", f"{config.model_name} ({engine.metadata['path']})"),
        ("architecture", engine.metadata["config"]["architecture"]),
        ("device", f"{device}, {engine.metadata['cpu_kernels']} kernels"),
        *([("WARNING", slow)] if slow else []),
        ("quantization", engine.metadata["quantization"]),
        ("context", f"{engine.context_length} tokens"),
        *_kv_rows(limits, kv_from),
        ("sequences", f"{limits['max_sequences']} at once, {limits['max_queue']} may wait"),
        ("batch", f"{limits['max_batch_tokens']} tokens per step (prompts in chunks)"),
        ("threads", threads),
        ("API key", "required" if config.api_keys or config.keys_db else "not required"),
        ("URL", f"http://{host}:{opts.port}/v1"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"ZSE {__version__} serving"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    print("\n".join(lines), file=sys.stderr, flush=True)

"""Serving benchmark: `zse serve` against llama-cpp-python's server on the same model,
in the same run, through the same HTTP client.

    python benches/serve_bench.py [--runs 3] [--max-tokens 128] [--streams 1 8]

For each server: cold start (process start to the first streamed token), then for
each concurrency level, time to first token (p50), inter-token latency (p50) and
aggregate output tokens/s; medians over ``--runs`` rounds, the two servers taking
turns within each round. Every request asks for exactly ``--max-tokens`` tokens
(EOS is banned through ``logit_bias``), so both servers do the same work.

llama-cpp-python is never a dependency of zse: install it with its server extra in
its own virtual environment (see DESIGN.md) and point ZSE_BENCH_LLAMA_PYTHON at that
interpreter; without it, only ZSE is measured. Its server answers one request at a
time, by design.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import zse
from zse.models import default_gguf_path

EOS = 2  # SmolLM2's end of turn
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who bakes bread."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    cold_start_s: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@dataclass
class StreamTiming:
    started: float
    ttft: float
    gaps: list[float]
    tokens: int


async def one_stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> StreamTiming:
    body = {
        "model": "default",
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(EOS): -100},
        "stream": True,
    }
    t0 = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError(f"{url} streamed no content")
    return StreamTiming(
        started=t0,
        ttft=times[0] - t0,
        gaps=[b - a for a, b in itertools.pairwise(times)],
        tokens=max_tokens,
    )


async def cold_start(server: Server, max_tokens: int) -> float:
    """Seconds from starting the process to the first streamed token."""
    t0 = time.perf_counter()
    server.start()
    async with httpx.AsyncClient(timeout=120) as client:
        while True:
            assert server.proc is not None
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}")
            try:
                timing = await one_stream(client, server.url, max_tokens)
                return timing.started + timing.ttft - t0
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                await asyncio.sleep(0.02)


async def load(url: str, streams: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(client, url, max_tokens) for _ in range(streams))
        )
        wall = time.perf_counter() - t0
    gaps = [g for r in results for g in r.gaps]
    return {
        "ttft_p50_s": statistics.median(r.ttft for r in results),
        "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        "tokens_per_s": sum(r.tokens for r in results) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    model = zse.pull(progress=False)
    servers = [
        Server(
            "zse",
            [sys.executable, "-m", "zse", "serve", str(model), "--threads", str(args.threads)],
            free_port(),
        )
    ]
    servers[0].cmd += ["--port", str(servers[0].port)]
    llama_python = os.environ.get("ZSE_BENCH_LLAMA_PYTHON")
    if llama_python and Path(llama_python).exists():
        port = free_port()
        servers.append(
            Server(
                "llama-cpp-python",
                [
                    llama_python,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(default_gguf_path()),
                    "--n_threads",
                    str(args.threads),
                    "--n_ctx",
                    "4096",
                    # Queue concurrent requests instead of cutting the running one off.
                    "--interrupt_requests",
                    "False",
                    "--port",
                    str(port),
                ],
                port,
            )
        )
    else:
        print("ZSE_BENCH_LLAMA_PYTHON not set: measuring zse alone", file=sys.stderr)

    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for run in range(args.runs):
        for server in servers:
            try:
                server.cold_start_s.append(asyncio.run(cold_start(server, args.max_tokens)))
                for n in args.streams:
                    r = asyncio.run(load(server.url, n, args.max_tokens))
                    results.setdefault((server.name, n), []).append(r)
                    print(f"run {run + 1} {server.name:>16} x{n}: {r}", file=sys.stderr)
            finally:
                server.stop()

    def med(name: str, n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, n)])

    print(f"\nmedians over {args.runs} runs, {args.max_tokens} tokens per request")
    header = f"{'server':>16} {'streams':>7} {'TTFT p50 s':>10} {'ITL p50 ms':>10} {'tok/s':>8}"
    print(header)
    for server in servers:
        for n in args.streams:
            ttft, itl = med(server.name, n, "ttft_p50_s"), med(server.name, n, "itl_p50_ms")
            tps = med(server.name, n, "tokens_per_s")
            print(f"{server.name:>16} {n:>7} {ttft:>10.3f} {itl:>10.1f} {tps:>8.1f}")
    for server in servers:
        cold = statistics.median(server.cold_start_s)
        print(f"{server.name:>16} cold start to first token: {cold:.2f} s")
    if len(servers) == 2:
        print("\nzse / llama-cpp-python:")
        for n in args.streams:
            tps = med("zse", n, "tokens_per_s") / med("llama-cpp-python", n, "tokens_per_s")
            ttft = med("zse", n, "ttft_p50_s") / med("llama-cpp-python", n, "ttft_p50_s")
            print(f"  {n} streams: tokens/s x{tps:.2f}, TTFT p50 x{ttft:.2f}")


if __name__ == "__main__":
    main()

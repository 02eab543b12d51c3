"""Serving benchmark: `zse serve` against llama.cpp's own server (`llama-server
--parallel N`, continuous batching) and, where installed, llama-cpp-python's server, on
the same GGUF file, in the same run, through the same HTTP client, with the same threads.

    python benches/serve_bench.py [--model FILE.gguf] [--runs 3] [--max-tokens 128]
                                  [--streams 1 8] [--threads 2] [--mixed 48]

For each server: cold start (process start to the first streamed token); for each
concurrency level, N streams with distinct prompts, each asking for exactly
``--max-tokens`` tokens (EOS banned through ``logit_bias``): TTFT p50, the decode rate
per stream (its tokens after the first over the time they took; median over streams)
and aggregate output tokens/s; then a mixed phase: ``--mixed`` requests with distinct
prompts of 80-750 tokens and outputs of 32-256 tokens, 8 at a time: output tokens/s,
TTFT p50/p95 and end-to-end p50. Tokens are counted from each response's ``usage``,
never assumed. Medians over ``--runs`` rounds, the servers taking turns in each round.

The peers are never dependencies of zse. llama-server: built by
``../shared/tools/llama-cpp-peer.sh`` (``--llama-server PATH`` or $ZSE_BENCH_LLAMA_SERVER;
default ~/.cache/zse-peer/bin/llama-server if it exists). llama-cpp-python: its own
virtual environment with the server extra, named by $ZSE_BENCH_LLAMA_PYTHON; it serves
one request at a time, by design.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import zse
from peers import free_port, llama_server_binary
from zse.models import default_gguf_path

CONCURRENCY_MIXED = 8
WORDS = (
    "river dragon baker lantern orchard violin harbor meadow thunder copper garden "
    "whisper castle pepper glacier ribbon compass saddle marble falcon candle velvet "
    "island forest market engine ladder mirror canyon feather silver winter"
).split()


def prompt_text(i: int, words: int) -> str:
    """A distinct prompt per index: its own opening and its own order of words."""
    body = " ".join(WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(words))
    return f"Request {i}: continue this list of words, then tell a story with them. {body}"


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

    def start(self, logs: Path | None) -> None:
        """Starts the process; its output goes to LOGS/NAME.log (appended), or nowhere."""
        if logs is None:
            out = subprocess.DEVNULL
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=out, env=os.environ)
            return
        with open(logs / f"{self.name}.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, env=os.environ)

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
    e2e: float
    gaps: list[float]
    tokens: int  # completion tokens, from the response's usage

    @property
    def decode_tok_s(self) -> float:
        """This stream's rate after its first token."""
        decode_time = self.e2e - self.ttft
        return (self.tokens - 1) / decode_time if decode_time > 0 else float("nan")


def new_client() -> httpx.AsyncClient:
    """A client that opens a connection per request, for every server alike: llama-server
    can close a kept-alive connection just as the next request goes out on it (seen as
    "Server disconnected without sending a response" in its mixed phase)."""
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


async def one_stream(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, eos: int
) -> StreamTiming:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(eos): -100},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = None
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    if not times or tokens is None:
        raise RuntimeError(f"{url} streamed no content or no usage")
    return StreamTiming(
        started=t0,
        ttft=times[0] - t0,
        e2e=times[-1] - t0,
        gaps=[b - a for a, b in itertools.pairwise(times)],
        tokens=tokens,
    )


async def cold_start(server: Server, eos: int, logs: Path | None) -> float:
    """Seconds from starting the process to the first streamed token."""
    t0 = time.perf_counter()
    server.start(logs)
    async with new_client() as client:
        while True:
            assert server.proc is not None
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}")
            try:
                timing = await one_stream(client, server.url, "Hello", 4, eos)
                return timing.started + timing.ttft - t0
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                await asyncio.sleep(0.02)
            except httpx.HTTPStatusError as e:
                # llama-server answers 503 while it loads the model; anything else
                # (a model without a chat template: 400) would be retried forever.
                if e.response.status_code != 503:
                    raise RuntimeError(
                        f"{server.name} answered {e.response.status_code} to a chat request"
                    ) from e
                await asyncio.sleep(0.02)


async def load(url: str, streams: int, max_tokens: int, eos: int, salt: int) -> dict[str, float]:
    """`streams` requests at once, each with a prompt of its own."""
    async with new_client() as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_stream(client, url, prompt_text(salt + i, 40), max_tokens, eos)
                for i in range(streams)
            )
        )
        wall = time.perf_counter() - t0
    gaps = [g for r in results for g in r.gaps]
    return {
        "ttft_p50_s": statistics.median(r.ttft for r in results),
        "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        "decode_tok_s": statistics.median(r.decode_tok_s for r in results),
        "tokens_per_s": sum(r.tokens for r in results) / wall,
    }


def mixed_work(count: int, seed: int) -> list[tuple[str, int]]:
    """`count` (prompt, max_tokens): distinct prompts of roughly 80-750 tokens (about
    1.3 tokens a word here), outputs of 32-256 tokens; the same for every server."""
    rng = random.Random(seed)
    return [
        (prompt_text(10_000 + seed * 1000 + i, rng.randint(55, 560)), rng.randint(32, 256))
        for i in range(count)
    ]


async def mixed(url: str, work: list[tuple[str, int]], eos: int) -> dict[str, float]:
    """The work through CONCURRENCY_MIXED clients, each taking the next request."""
    queue = list(reversed(work))
    results: list[StreamTiming] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            prompt, max_tokens = queue.pop()
            results.append(await one_stream(client, url, prompt, max_tokens, eos))

    async with new_client() as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(CONCURRENCY_MIXED)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r.ttft for r in results)
    return {
        "tokens_per_s": sum(r.tokens for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "e2e_p50_s": statistics.median(r.e2e for r in results),
    }


def servers_for(args: argparse.Namespace, gguf: Path) -> list[Server]:
    """zse, and the peers that are installed, each on a free port with `args.threads`."""
    t = str(args.threads)
    port = free_port()
    servers = [
        Server(
            "zse",
            [sys.executable, "-m", "zse", "serve", str(gguf), "--threads", t, "--port", str(port)],
            port,
        )
    ]
    llama_server = llama_server_binary(args.llama_server)
    parallel = max([*args.streams, CONCURRENCY_MIXED])
    if llama_server:
        port = free_port()
        # One slot per concurrent stream, each with room for the longest mixed request.
        ctx = parallel * 2048
        servers.append(
            Server(
                "llama-server",
                [
                    *(llama_server, "-m", str(gguf), "-t", t, "-tb", t),
                    *("--parallel", str(parallel), "-c", str(ctx), "--port", str(port)),
                ],
                port,
            )
        )
    llama_python = os.environ.get("ZSE_BENCH_LLAMA_PYTHON")
    if llama_python and Path(llama_python).exists():
        port = free_port()
        servers.append(
            Server(
                "llama-cpp-python",
                [
                    *(llama_python, "-m", "llama_cpp.server", "--model", str(gguf)),
                    *("--n_threads", t, "--n_threads_batch", t, "--n_ctx", "4096"),
                    # Queue concurrent requests instead of cutting the running one off.
                    *("--interrupt_requests", "False", "--port", str(port)),
                ],
                port,
            )
        )
    return servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: the default model's)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--mixed", type=int, default=48, help="requests in the mixed phase (0: none)")
    ap.add_argument("--llama-server", help="llama-server binary")
    ap.add_argument("--servers", nargs="+", help="only these (zse, llama-server, llama-cpp-python)")
    ap.add_argument("--logs", type=Path, help="write each server's output to LOGS/NAME.log")
    args = ap.parse_args()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    if args.model is None:
        zse.pull(progress=False)
    gguf = args.model or default_gguf_path()
    with zse.Engine(zse.models.resolve_model(gguf, progress=False)) as e:
        eos = e.metadata["eos_token_ids"][0]
        name = e.model_name
    servers = [s for s in servers_for(args, gguf) if not args.servers or s.name in args.servers]

    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in range(args.runs):
        work = mixed_work(args.mixed, seed=run)
        for server in servers:
            try:
                server.cold_start_s.append(asyncio.run(cold_start(server, eos, args.logs)))
                measured = [
                    (f"x{n}", asyncio.run(load(server.url, n, args.max_tokens, eos, 100 * run)))
                    for n in args.streams
                ]
                if args.mixed:
                    measured.append(("mixed", asyncio.run(mixed(server.url, work, eos))))
                for phase, r in measured:
                    results.setdefault((server.name, phase), []).append(r)
                    print(f"run {run + 1} {server.name:>16} {phase}: {r}", file=sys.stderr)
            finally:
                server.stop()

    def med(name: str, phase: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, phase)])

    print(
        f"\n{name} ({gguf.name}), {args.threads} threads, medians over {args.runs} runs; "
        f"streams: {args.max_tokens} tokens each, distinct prompts; mixed: {args.mixed} "
        f"requests, prompts 80-750 tokens, outputs 32-256, {CONCURRENCY_MIXED} at a time"
    )
    cols = ["phase", "server", "out tok/s", "decode/stream", "TTFT p50", "TTFT p95", "E2E p50"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    phases = [f"x{n}" for n in args.streams] + (["mixed"] if args.mixed else [])
    base = servers[0].name
    for phase in phases:
        for server in servers:
            r = results[(server.name, phase)]
            row = [
                phase,
                server.name,
                f"{med(server.name, phase, 'tokens_per_s'):.1f}",
                f"{med(server.name, phase, 'decode_tok_s'):.1f}" if "decode_tok_s" in r[0] else "",
                f"{med(server.name, phase, 'ttft_p50_s'):.2f} s",
                f"{med(server.name, phase, 'ttft_p95_s'):.2f} s" if "ttft_p95_s" in r[0] else "",
                f"{med(server.name, phase, 'e2e_p50_s'):.2f} s" if "e2e_p50_s" in r[0] else "",
            ]
            print("| " + " | ".join(row) + " |")
        for server in servers[1:]:
            ratio = med(base, phase, "tokens_per_s") / med(server.name, phase, "tokens_per_s")
            print(f"| {phase} | {base} / {server.name} | x{ratio:.2f} | | | | |")
    for server in servers:
        cold = statistics.median(server.cold_start_s)
        print(f"{server.name}: cold start to first token {cold:.2f} s")


if __name__ == "__main__":
    main()

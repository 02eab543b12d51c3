"""Load test: many streaming clients against a real `zse serve` on loopback, a quarter of
them hanging up mid-stream, while `/health` is polled; then SIGTERM.

    python benches/load_test.py [--clients 64] [--seconds 60]

Every request is greedy over one of a few prompts, so each completed answer must equal
that prompt's answer computed alone before the load (ZSE's results do not depend on
the batch). Prints requests tried, completed, hung up, refused (429/503), failed and
lost (streams that ended without their end); `/health` probes and their worst
latency; the server's RSS idle, at peak and after; and the exit status after
SIGTERM. Exits 1 if anything failed or was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import ServerProcess

PROMPTS = [
    "Name three colours.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Count from one to five.",
]
MAX_TOKENS = 48


@dataclass
class Tally:
    tried: int = 0
    completed: int = 0
    hung_up: int = 0
    refused: int = 0
    lost: int = 0
    idle_kv: int = 0
    failed: list[str] = field(default_factory=list)
    health_ok: int = 0
    health_failed: int = 0
    health_worst_s: float = 0.0
    rss_peak: int = 0


def body(i: int, stream: bool) -> dict[str, object]:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": PROMPTS[i]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


async def client(
    http: httpx.AsyncClient, n: int, expected: list[str], deadline: float, t: Tally
) -> None:
    rng = random.Random(n)
    hangs_up = n % 4 == 0  # a quarter of the clients
    while time.monotonic() < deadline:
        i = rng.randrange(len(PROMPTS))
        t.tried += 1
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body(i, True)) as r:
                if r.status_code in (429, 503):
                    t.refused += 1
                    await r.aread()
                    await asyncio.sleep(0.2)
                    continue
                if r.status_code != 200:
                    t.failed.append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                text, done, finish, chunks = "", False, None, 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        t.failed.append(f"stream error: {event['error']}")
                        break
                    for c in event["choices"]:
                        text += c["delta"].get("content") or ""
                        finish = c.get("finish_reason") or finish
                    chunks += 1
                    if hangs_up and chunks == 3 + n % 5:
                        break
                if hangs_up and not done:
                    t.hung_up += 1
                elif not done or finish is None:
                    t.lost += 1  # the stream ended without its end: work lost
                    t.failed.append(f"incomplete stream (finish {finish})")
                elif text != expected[i]:
                    t.failed.append(f"prompt {i}: {text!r} != {expected[i]!r}")
                else:
                    t.completed += 1
        except (httpx.HTTPError, ValueError, KeyError) as e:
            t.failed.append(f"{type(e).__name__}: {e}")


async def watch(http: httpx.AsyncClient, proc: psutil.Process, deadline: float, t: Tally) -> None:
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            ok = (await http.get("/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            ok = False
        t.health_worst_s = max(t.health_worst_s, time.monotonic() - t0)
        if ok:
            t.health_ok += 1
        else:
            t.health_failed += 1
        t.rss_peak = max(t.rss_peak, proc.memory_info().rss)
        await asyncio.sleep(0.5)


async def run(server: ServerProcess, clients: int, seconds: float) -> tuple[Tally, int]:
    proc = psutil.Process(server.proc.pid)
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=server.base, timeout=120, limits=limits) as http:
        expected = []
        for i in range(len(PROMPTS)):
            r = await http.post("/v1/chat/completions", json=body(i, False))
            expected.append(r.json()["choices"][0]["message"]["content"])
        server.wait_idle()
        t = Tally()
        idle = proc.memory_info().rss
        t.idle_kv = server.health()["engine"]["kv_cache_used_tokens"]  # type: ignore[index]
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            watch(http, proc, deadline, t),
            *(client(http, n, expected, deadline, t) for n in range(clients)),
        )
    return t, idle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    args = p.parse_args()
    with ServerProcess(None, "--max-seqs", "16", "--max-queue", "32") as server:
        t, idle = asyncio.run(run(server, args.clients, args.seconds))
        server.wait_idle(timeout=30)
        time.sleep(1)
        after = psutil.Process(server.proc.pid).memory_info().rss
        engine = server.health()["engine"]
        assert isinstance(engine, dict)
        code = server.stop(signal.SIGTERM)
    mib = 2**20
    print(f"{args.clients} clients for {args.seconds:.0f} s, a quarter hanging up mid-stream")
    print(
        f"requests: tried {t.tried}, completed {t.completed} (each equal to its solo answer), "
        f"hung up {t.hung_up}, refused 429/503 {t.refused}, failed {len(t.failed)}, "
        f"lost (ended without their end) {t.lost}"
    )
    print(
        f"/health: {t.health_ok} answered, {t.health_failed} not, slowest {t.health_worst_s:.3f} s"
    )
    print(
        f"server RSS: idle {idle / mib:.0f} MiB, peak {t.rss_peak / mib:.0f} MiB, "
        f"after {after / mib:.0f} MiB (the KV pages once touched stay: the pool is the "
        f"configured budget); after the load the engine holds "
        f"{engine['kv_cache_used_tokens']} KV positions (idle before: {t.idle_kv}) for "
        f"{engine['running_sequences']} sequences; exit status after SIGTERM {code}"
    )
    for f in t.failed[:10]:
        print("  failure:", f)
    if t.failed or t.health_failed or code != 0 or engine["kv_cache_used_tokens"] != t.idle_kv:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""ZSE on Ray Serve against `zse serve` alone, on one machine (issue 19). Two replicas
on two cores are not faster than one engine on both, so this measures what Ray costs
and what prefix affinity buys:

    python benches/ray_bench.py [--model FILE] [--requests 40] [--runs 3]

- routing overhead: TTFT p50 of one streaming request at a time (one token, distinct
  prompts), through Ray (proxy, ingress, replica) and straight to `zse serve`;
- prefix-cache hit rate, through 2 replicas with `PrefixAffinityRouter` and with Ray's
  default router (power of two choices): prompt positions found in the replicas'
  prefix caches over those looked up (their ``zse_prefix_cache_*`` counters, read from
  ``/metrics``), on two workloads, 4 requests at a time: 4 long system prompts x 12
  questions, and 16 chats of 4 turns (each turn sends the chat so far).

Each replica and the direct server use one thread. Medians over ``--runs`` rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray
import zse.ray
from peers import free_port
from ray import serve
from zse.server.options import ServeOptions

SYSTEMS = [
    f"You are assistant number {i}. " + "Answer in one short sentence, plainly and kindly. " * 12
    for i in range(4)
]


def ttft(url: str, prompt: str) -> float:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line and '"content":""' not in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def ttft_p50(url: str, requests: int, salt: str) -> float:
    return statistics.median(ttft(url, f"{salt} request {i}: say hi.") for i in range(requests))


def prefix_counters(base: str) -> dict[str, tuple[float, float]]:
    """Each replica's (query, hit) prefix-cache tokens, from /metrics (asked until
    every replica has answered; the router spreads requests without a prompt)."""
    seen: dict[str, tuple[float, float]] = {}
    for _ in range(60):
        r = httpx.get(f"{base}/metrics", timeout=30)
        values = {}
        for line in r.text.splitlines():
            for name in ("zse_prefix_cache_query_tokens", "zse_prefix_cache_hit_tokens"):
                if line.startswith(name + " ") or line.startswith(name + "_total "):
                    values[name] = float(line.split()[-1])
        seen[r.headers.get("x-zse-replica", "direct")] = (
            values["zse_prefix_cache_query_tokens"],
            values["zse_prefix_cache_hit_tokens"],
        )
        if len(seen) >= 2:
            break
    return seen


def ask(base: str, messages: list[dict[str, str]]) -> str:
    body = {"model": "default", "messages": messages, "max_tokens": 16, "temperature": 0}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    content: str = r.json()["choices"][0]["message"]["content"]
    return content


def shared_systems(base: str, seed: int) -> None:
    """4 long system prompts x 12 questions, shuffled, 4 at a time."""
    work = [(system, q) for system in SYSTEMS for q in range(12)]
    random.Random(seed).shuffle(work)

    def one(item: tuple[str, int]) -> None:
        system, q = item
        question = f"Question {q} (run {seed}): what is {q} + {q}?"
        ask(base, [{"role": "system", "content": system}, {"role": "user", "content": question}])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, work))


def conversations(base: str, seed: int) -> None:
    """16 chats of 4 turns, 4 at a time: each turn sends the whole chat so far."""
    chats = [
        [{"role": "system", "content": f"Chat {c} of run {seed}. Be brief and friendly."}]
        for c in range(16)
    ]

    def turn(chat: list[dict[str, str]], t: int) -> None:
        chat.append({"role": "user", "content": f"Turn {t}: name a colour and a fruit."})
        chat.append({"role": "assistant", "content": ask(base, chat)})

    with ThreadPoolExecutor(4) as pool:
        for t in range(4):
            list(pool.map(lambda chat, t=t: turn(chat, t), chats))


def hit_rate(base: str, workload: Callable[[str, int], None], seed: int) -> float:
    """The share of the prompt positions looked up in the replicas' prefix caches
    that were found, over one run of ``workload``."""
    before = prefix_counters(base)
    workload(base, seed)
    after = prefix_counters(base)
    query = sum(after[k][0] - before.get(k, (0, 0))[0] for k in after)
    hit = sum(after[k][1] - before.get(k, (0, 0))[1] for k in after)
    return hit / query if query else float("nan")


def ray_app(model: str, affinity: bool, port: int) -> str:
    opts = ServeOptions(model=model, threads=1, kv_cache_mb=256)
    app = zse.ray.build_app(opts, replicas=2, prefix_affinity=affinity)
    serve.run(app, name="zse", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model file (default: the default model)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    model = str(args.model or zse.pull(progress=False))

    port = free_port()
    direct = subprocess.Popen(
        [sys.executable, "-m", "zse", "serve", model, "--port", str(port), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    direct_base = f"http://127.0.0.1:{port}"
    ray_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[float]] = defaultdict(list)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
        while True:
            try:
                httpx.get(f"{direct_base}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        for affinity in (True, False):
            base = ray_app(model, affinity, ray_port)
            for run in range(args.runs):
                if affinity:  # routing overhead: the servers take turns
                    chat = "/v1/chat/completions"
                    results["direct"].append(ttft_p50(direct_base + chat, args.requests, "d"))
                    results["ray"].append(ttft_p50(base + chat, args.requests, "r"))
                router = "affinity" if affinity else "pow2"
                results[f"{router} systems"].append(hit_rate(base, shared_systems, run))
                results[f"{router} chats"].append(hit_rate(base, conversations, run))
            serve.delete("zse")
    finally:
        direct.terminate()
        direct.wait(30)
        serve.shutdown()
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"TTFT p50, one request at a time ({args.requests} requests, median of {args.runs}):")
    print(f"  zse serve          {med['direct'] * 1000:7.1f} ms")
    extra = (med["ray"] - med["direct"]) * 1000
    print(f"  through Ray Serve  {med['ray'] * 1000:7.1f} ms  (+{extra:.1f} ms)")
    print("prefix-cache hit rate, 2 replicas    PrefixAffinityRouter  Ray's default router")
    for name, label in (
        ("systems", "4 system prompts x 12 questions"),
        ("chats", "16 chats x 4 turns"),
    ):
        print(f"  {label:<33} {med['affinity ' + name]:>8.1%} {med['pow2 ' + name]:>21.1%}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()

"""Runs the engine benchmark's workload on llama.cpp's own server (`llama-server
--parallel STREAMS`, continuous batching), started by this process; prints one JSON
line.

Called by engine_bench.py: LLAMA_SERVER MODEL_GGUF PROMPT_IDS_JSON DECODE_TOKENS RUNS
STREAMS START_EPOCH, with ZSE_BENCH_THREADS threads (-t and -tb). The same steps as
zse_runner.py, one for one, through llama-server's native /completion endpoint with
token ids as the prompt. Prefill and decode rates are the server's own `timings`, so
HTTP costs nothing to the peer; the 8 streams are timed from here, as zse's are from
its Python API. The KV cache is one unified buffer of 2048 positions, as zse_runner.py
sizes zse's; its peak memory is the server process's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from peers import free_port
from procstat import peak_rss_mib

N_CTX = 2048  # positions, shared by the slots (zse_runner.py gives zse the same)


def complete(base: str, ids: list[int], n_predict: int) -> dict[str, Any]:
    """One greedy completion of exactly `n_predict` tokens, no prompt cache."""
    body = {
        "prompt": ids,
        "n_predict": n_predict,
        "ignore_eos": True,
        "cache_prompt": False,
        "top_k": 1,
        "temperature": 0,
    }
    request = urllib.request.Request(
        base + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as r:
        result: dict[str, Any] = json.loads(r.read())
    if result["timings"]["predicted_n"] != n_predict:
        raise RuntimeError(f"asked for {n_predict} tokens, got {result['timings']['predicted_n']}")
    return result


def wait_ready(base: str, server: subprocess.Popen[bytes]) -> None:
    while True:
        if server.poll() is not None:
            sys.exit(f"llama-server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet, or 503 while it loads the model
        time.sleep(0.02)


def main() -> None:
    binary, model, prompt_json, decode_s, runs_s, streams_s, start_s = sys.argv[1:8]
    prompt: list[int] = json.loads(prompt_json)
    decode, runs, streams = int(decode_s), int(runs_s), int(streams_s)
    threads = os.environ.get("ZSE_BENCH_THREADS", "2")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            *(binary, "-m", model, "-t", threads, "-tb", threads, "-b", "512"),
            *("--parallel", streams_s, "--kv-unified", "-c", str(N_CTX), "--port", str(port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(base, server)
        complete(base, prompt[:8], 1)
        cold_start = time.time() - float(start_s)

        prefill, decode_rates = [], []
        for run in range(runs + 1):  # the first run warms up
            ids = prompt[run:] + prompt[:run]
            timings = complete(base, ids, decode)["timings"]
            prefill.append(timings["prompt_per_second"])
            decode_rates.append(timings["predicted_per_second"])

        chunks = [prompt[32 * i : 32 * (i + 1)] for i in range(streams)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            done = list(pool.map(lambda ids: complete(base, ids, decode), chunks))
        total = sum(r["timings"]["predicted_n"] for r in done)
        aggregate = total / (time.perf_counter() - t0)
        peak = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    print(
        json.dumps(
            {
                "prefill_tok_s": statistics.median(prefill[1:]),
                "decode_tok_s": statistics.median(decode_rates[1:]),
                "aggregate_tok_s": aggregate,
                "cold_start_s": cold_start,
                "peak_rss_mib": peak,
            }
        )
    )


if __name__ == "__main__":
    main()

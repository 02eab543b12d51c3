"""Engine benchmark: zse against llama.cpp (llama-cpp-python) on the default model,
with the same threads for both (--threads: zse's RAYON_NUM_THREADS, llama.cpp's
n_threads and n_threads_batch), in one run: prefill tokens/s on a 512-token prompt, single-stream
decode tokens/s over 128 tokens, aggregate tokens/s over 8 streams, cold start, peak
memory, and decode's share of the memory-bandwidth limit.

    python benches/engine_bench.py [--runs 5] [--prompt-tokens 512] [--decode-tokens 128]

Each engine runs in a process of its own (`zse_runner.py`, `llama_cpp_runner.py`),
so that cold start (process start to first token) and peak memory (the process's
maximum RSS) are its own. llama-cpp-python is never a dependency of zse: install it
in its own virtual environment (see DESIGN.md) and point ZSE_BENCH_LLAMA_PYTHON at
that interpreter; llama-cpp-python serves one request at a time, so its 8 streams run
one after another, as its server would run them.

Bandwidth: a decode step reads every weight once, so decode tokens/s times the bytes
of weights is the rate weights stream from memory; it is shown against the machine's
copy bandwidth (bytes read plus bytes written per second by memcpy over 512 MiB,
measured here, in this run). Machines here are shared and noisy: the figures are
medians over runs, and the comparison that matters is the ratio within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zse
from zse.models import default_gguf_path

HERE = Path(__file__).parent


def copy_bandwidth(size: int = 512 << 20, tries: int = 5) -> float:
    """Bytes moved per second (read + write) by the best of `tries` memcpys."""
    src = bytearray(os.urandom(1 << 20)) * (size >> 20)
    dst = bytearray(size)
    view = memoryview(dst)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        view[:] = src
        best = min(best, time.perf_counter() - t0)
    return 2 * size / best


def run(
    python: str, runner: str, model: str, args: list[str], threads: int
) -> dict[str, Any] | None:
    cmd = [python, str(HERE / runner), model, *args, repr(time.time())]
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "ZSE_BENCH_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(f"{runner} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()

    model = zse.pull(progress=False)
    tokenizer = zse.Engine(model)
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_tokens // 5 + 1)
    prompt = tokenizer.tokenize(text)[: args.prompt_tokens]
    name = tokenizer.model_name
    tokenizer.close()
    work = [json.dumps(prompt), str(args.decode_tokens), str(args.runs), str(args.streams)]

    bandwidth = copy_bandwidth()
    rows: list[tuple[str, dict[str, Any]]] = []
    ours = run(sys.executable, "zse_runner.py", str(model), work, args.threads)
    if ours is None:
        sys.exit(1)
    rows.append(("zse", ours))
    llama_py = os.environ.get("ZSE_BENCH_LLAMA_PYTHON")
    if llama_py:
        theirs = run(llama_py, "llama_cpp_runner.py", str(default_gguf_path()), work, args.threads)
        if theirs:
            rows.append(("llama.cpp", theirs))
    else:
        print("(set ZSE_BENCH_LLAMA_PYTHON to a python with llama-cpp-python for the comparison)")

    weights = ours["weight_bytes"]
    print(
        f"model: {name}, prompt {len(prompt)} tokens, decode {args.decode_tokens} tokens, "
        f"{args.streams} streams, median of {args.runs} runs; zse kernels: {ours['kernels']}"
    )
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per decoded token "
        f"{weights / 2**20:.1f} MiB (the same GGML blocks in both engines)"
    )
    cols = [
        ("prefill tok/s", "prefill_tok_s", "{:.1f}"),
        ("decode tok/s", "decode_tok_s", "{:.1f}"),
        (f"{args.streams} streams tok/s", "aggregate_tok_s", "{:.1f}"),
        ("cold start s", "cold_start_s", "{:.2f}"),
        ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ]
    print(f"{'engine':<10}" + "".join(f"{c[0]:>18}" for c in cols) + f"{'of bandwidth':>14}")
    for label, r in rows:
        share = weights * r["decode_tok_s"] / bandwidth
        cells = "".join(f"{fmt.format(r[key]):>18}" for _, key, fmt in cols)
        print(f"{label:<10}{cells}{share:>13.0%}")
    if len(rows) == 2:
        a, b = rows[0][1], rows[1][1]
        cells = "".join(f"{a[key] / b[key]:>18.2f}" for _, key, _ in cols)
        print(f"{'ratio':<10}{cells}")


if __name__ == "__main__":
    main()

"""Engine benchmark: zse against llama.cpp's own server (`llama-server --parallel 8`)
and, where installed, llama-cpp-python, on the same GGUF file, with the same threads
(--threads: zse's RAYON_NUM_THREADS, llama.cpp's -t/-tb or n_threads/n_threads_batch),
in one run: prefill tokens/s on a 512-token prompt, single-stream decode tokens/s over
128 tokens, aggregate tokens/s over 8 streams, cold start, peak memory, and decode's
share of the memory-bandwidth limit.

    python benches/engine_bench.py [--model F.gguf] [--runs 5] [--prompt-tokens 512]
                                   [--decode-tokens 128] [--threads 2] [--llama-server PATH]

Each engine runs in a process of its own (`zse_runner.py`, `llama_server_runner.py`,
`llama_cpp_runner.py`), so that cold start (process start to first token) and peak
memory (the process's maximum RSS) are its own. The peers are never dependencies of
zse: llama-server is found as serve_bench.py finds it (peers.py); llama-cpp-python is
used when ZSE_BENCH_LLAMA_PYTHON names the interpreter of its own virtual environment
(see DESIGN.md); it serves one request at a time, so its 8 streams run one after
another, as its server would run them.

Bandwidth: a decode step reads every weight once, so decode tokens/s times the bytes
of weights is the rate weights stream from memory; it is shown against the machine's
copy bandwidth (bytes read plus bytes written per second by memcpy over 512 MiB,
measured here, in this run). Machines here are shared and noisy: the engines take
turns, a process each per round (--runs rounds, each a warm-up and one measured run),
so that drift over the run reaches them alike; each figure is the median over the
rounds, and each ratio the median of the rounds' own ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zse
from peers import llama_server_binary
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


def run(python: str, runner: str, args: list[str], threads: int) -> dict[str, Any] | None:
    """One runner in a process of its own; its JSON line, or None (and why) if it failed."""
    cmd = [python, str(HERE / runner), *args, repr(time.time())]
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
    p.add_argument("--model", type=Path, help="a GGUF file (default: the default model's)")
    p.add_argument("--llama-server", help="llama-server binary")
    args = p.parse_args()

    if args.model is None:
        zse.pull(progress=False)
    gguf = args.model or default_gguf_path()
    model = zse.models.resolve_model(gguf, progress=False)
    tokenizer = zse.Engine(model)
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_tokens // 5 + 1)
    prompt = tokenizer.tokenize(text)[: args.prompt_tokens]
    name = tokenizer.model_name
    tokenizer.close()
    # One measured run per process; the rounds alternate the engines.
    work = [json.dumps(prompt), str(args.decode_tokens), "1", str(args.streams)]

    bandwidth = copy_bandwidth()
    engines: list[tuple[str, str, str, list[str]]] = [
        ("zse", sys.executable, "zse_runner.py", [str(model)])
    ]
    llama_server = llama_server_binary(args.llama_server)
    if llama_server:
        engines.append(
            ("llama-server", sys.executable, "llama_server_runner.py", [llama_server, str(gguf)])
        )
    llama_py = os.environ.get("ZSE_BENCH_LLAMA_PYTHON")
    if llama_py:
        engines.append(("llama-cpp-python", llama_py, "llama_cpp_runner.py", [str(gguf)]))
    rounds: list[dict[str, dict[str, Any]]] = []
    for _ in range(args.runs):
        got = {}
        for label, python, runner, pre in engines:
            r = run(python, runner, [*pre, *work], args.threads)
            if r is not None:
                got[label] = r
        if "zse" not in got:
            sys.exit(1)
        rounds.append(got)
    ours = median_result([r["zse"] for r in rounds])
    rows = [
        (label, median_result([r[label] for r in rounds if label in r]))
        for label, *_ in engines
        if any(label in r for r in rounds)
    ]

    weights = ours["weight_bytes"]
    print(
        f"model: {name} ({gguf.name}), prompt {len(prompt)} tokens, "
        f"decode {args.decode_tokens} tokens, {args.streams} streams, "
        f"median of {args.runs} rounds; zse kernels: {ours['kernels']}"
    )
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per decoded token "
        f"{weights / 2**20:.1f} MiB (the same GGML blocks in every engine)"
    )
    cols = [
        ("prefill tok/s", "prefill_tok_s", "{:.1f}"),
        ("decode tok/s", "decode_tok_s", "{:.1f}"),
        (f"{args.streams} streams tok/s", "aggregate_tok_s", "{:.1f}"),
        ("cold start s", "cold_start_s", "{:.2f}"),
        ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ]
    print("| engine | " + " | ".join(c[0] for c in cols) + " | of bandwidth |")
    print("|---" * (len(cols) + 2) + "|")
    for label, r in rows:
        share = weights * r["decode_tok_s"] / bandwidth
        cells = " | ".join(fmt.format(r[key]) for _, key, fmt in cols)
        print(f"| {label} | {cells} | {share:.0%} |")
    for label, _ in rows[1:]:
        pairs = [(r["zse"], r[label]) for r in rounds if label in r]
        cells = " | ".join(
            f"x{statistics.median(a[key] / b[key] for a, b in pairs):.2f}" for _, key, _ in cols
        )
        print(f"| zse / {label} | {cells} | |")


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The first result with each number replaced by its median over `results`."""
    merged = dict(results[0])
    for key, value in merged.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in results)
    return merged


if __name__ == "__main__":
    main()

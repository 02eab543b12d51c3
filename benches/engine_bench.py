"""Engine benchmark: prefill and decode tokens/s for the default model, and the same
figures for llama.cpp (llama-cpp-python) in the same run when it is available.

    python benches/engine_bench.py [--runs 5] [--prompt-tokens 512] [--decode-tokens 128]

llama-cpp-python is never a dependency of zse: install it in its own virtual
environment (see DESIGN.md) and point ZSE_BENCH_LLAMA_PYTHON at that interpreter.
Machines here are shared and noisy: the figures are medians over runs, and the
comparison that matters is the ratio within one run.
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

import zse
from zse.models import default_gguf_path

LLAMA_RUNNER = Path(__file__).with_name("llama_cpp_runner.py")


def make_prompt(engine: zse.Engine, n_tokens: int) -> list[int]:
    text = "The quick brown fox jumps over the lazy dog. " * (n_tokens // 5 + 1)
    return engine.tokenize(text)[:n_tokens]


def bench_zse(engine: zse.Engine, prompt: list[int], decode: int, runs: int) -> dict[str, float]:
    prefill, decode_rates = [], []
    for run in range(runs):
        # A different rotation each run: the prefix cache must not serve the prompt.
        text = engine.detokenize(prompt[run:] + prompt[:run], skip_special_tokens=False)
        t0 = time.perf_counter()
        stream = engine.stream(text, temperature=0, max_tokens=1 + decode, ignore_eos=True)
        next(stream)
        t1 = time.perf_counter()
        for _ in stream:
            pass
        t2 = time.perf_counter()
        assert stream.completion is not None
        n_prompt = stream.completion.usage.prompt_tokens
        prefill.append(n_prompt / (t1 - t0))
        decode_rates.append((stream.completion.usage.completion_tokens - 1) / (t2 - t1))
    return {
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode_rates),
    }


def bench_llama_cpp(
    python: str, prompt: list[int], decode: int, runs: int
) -> dict[str, float] | None:
    args = [
        python,
        str(LLAMA_RUNNER),
        str(default_gguf_path()),
        json.dumps(prompt),
        str(decode),
        str(runs),
    ]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama-cpp-python failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    args = p.parse_args()

    t0 = time.perf_counter()
    # Prompts in one step, as llama.cpp's n_batch=512 does.
    engine = zse.Engine(zse.pull(progress=False), max_batch_tokens=max(512, args.prompt_tokens))
    load_s = time.perf_counter() - t0
    prompt = make_prompt(engine, args.prompt_tokens)
    bench_zse(engine, prompt[-32:], 4, 1)  # warm-up: page in the weights
    ours = bench_zse(engine, prompt, args.decode_tokens, args.runs)
    rows = [("zse", ours)]
    llama_py = os.environ.get("ZSE_BENCH_LLAMA_PYTHON")
    if llama_py:
        theirs = bench_llama_cpp(llama_py, prompt, args.decode_tokens, args.runs)
        if theirs:
            rows.append(("llama.cpp", theirs))
    else:
        print("(set ZSE_BENCH_LLAMA_PYTHON to a python with llama-cpp-python for the comparison)")

    print(
        f"model: {engine.model_name}, prompt {len(prompt)} tokens, decode {args.decode_tokens} "
        f"tokens, median of {args.runs} runs, zse load {load_s:.2f} s"
    )
    print(f"{'engine':<10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, r in rows:
        print(f"{name:<10} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}")
    if len(rows) == 2:
        a, b = rows[0][1], rows[1][1]
        print(
            f"{'ratio':<10} {a['prefill_tok_s'] / b['prefill_tok_s']:>14.2f} "
            f"{a['decode_tok_s'] / b['decode_tok_s']:>13.2f}"
        )


if __name__ == "__main__":
    main()

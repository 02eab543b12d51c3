"""Runs the engine benchmark's workload on zse in a process of its own (so that its
cold start and peak memory are its own); prints one JSON line.

Called by engine_bench.py: MODEL PROMPT_IDS_JSON DECODE_TOKENS RUNS STREAMS START_EPOCH.
The same steps as llama_cpp_runner.py, one for one.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import zse
from procstat import peak_rss_mib

LLAMA_N_CTX = 2048  # as llama_cpp_runner.py


def main() -> None:
    model, prompt_json, decode_s, runs_s, streams_s, start_s = sys.argv[1:7]
    prompt: list[int] = json.loads(prompt_json)
    decode, runs, streams = int(decode_s), int(runs_s), int(streams_s)
    # The peer's memory: a KV cache of llama.cpp's n_ctx=2048 positions in f16
    # (without a bound the prefix cache keeps every finished sequence, up to the
    # default budget). Prompts in one step, as llama.cpp's n_batch=512 does.
    c = zse.inspect(model, tokenizer=False)["config"]
    kv_bytes = LLAMA_N_CTX * c["num_layers"] * 2 * c["num_kv_heads"] * c["head_dim"] * 2
    engine = zse.Engine(model, kv_cache_mb=kv_bytes / 2**20, max_batch_tokens=max(512, len(prompt)))
    stream = engine.stream(
        engine.detokenize(prompt[:8], skip_special_tokens=False), temperature=0, max_tokens=1
    )
    next(stream)
    cold_start = time.time() - float(start_s)
    for _ in stream:
        pass

    prefill, decode_rates = [], []
    for run in range(runs + 1):  # the first run warms up
        # A different rotation each run: the prefix cache must not serve the prompt.
        ids = prompt[run:] + prompt[:run]
        text = engine.detokenize(ids, skip_special_tokens=False)
        t0 = time.perf_counter()
        stream = engine.stream(text, temperature=0, max_tokens=1 + decode, ignore_eos=True)
        next(stream)
        t1 = time.perf_counter()
        for _ in stream:
            pass
        t2 = time.perf_counter()
        assert stream.completion is not None
        usage = stream.completion.usage
        prefill.append(usage.prompt_tokens / (t1 - t0))
        decode_rates.append((usage.completion_tokens - 1) / (t2 - t1))

    async def one(ids: list[int]) -> int:
        n = 0
        async for delta in engine.astream_deltas(
            ids, temperature=0, max_tokens=decode, ignore_eos=True
        ):
            n += len(delta.token_ids)
        return n

    async def together() -> int:
        chunks = [prompt[32 * i : 32 * (i + 1)] for i in range(streams)]
        return sum(await asyncio.gather(*(one(c) for c in chunks)))

    t0 = time.perf_counter()
    total = asyncio.run(together())
    aggregate = total / (time.perf_counter() - t0)
    info = engine.metadata
    print(
        json.dumps(
            {
                "prefill_tok_s": statistics.median(prefill[1:]),
                "decode_tok_s": statistics.median(decode_rates[1:]),
                "aggregate_tok_s": aggregate,
                "cold_start_s": cold_start,
                "peak_rss_mib": peak_rss_mib(),
                "weight_bytes": info["weight_bytes"],
                "kernels": info["cpu_kernels"],
            }
        )
    )


if __name__ == "__main__":
    main()

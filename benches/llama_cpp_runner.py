"""Runs the engine benchmark's workload on llama-cpp-python in a process of its own;
prints one JSON line.

Called by engine_bench.py with the interpreter of llama-cpp-python's own virtual
environment: MODEL_GGUF PROMPT_IDS_JSON DECODE_TOKENS RUNS STREAMS START_EPOCH, with
ZSE_BENCH_THREADS threads (zse_runner.py gets the same as RAYON_NUM_THREADS).
The same steps as zse_runner.py, one for one. Its "streams" run one after another,
as llama-cpp-python's server serves them.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama
from procstat import peak_rss_mib


def last_logits(llm: Llama) -> np.ndarray:
    # Without logits_all, llama-cpp-python keeps no scores: read llama.cpp's buffer
    # for the batch's last token directly.
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def greedy(llm: Llama, prompt: list[int], decode: int) -> float:
    """Evaluates the prompt, then decodes; returns when the first token was ready."""
    llm.reset()
    llm.eval(prompt)
    first = time.perf_counter()
    token = int(last_logits(llm).argmax())
    for _ in range(decode):
        llm.eval([token])
        token = int(last_logits(llm).argmax())
    return first


def main() -> None:
    model, prompt_json, decode_s, runs_s, streams_s, start_s = sys.argv[1:7]
    prompt: list[int] = json.loads(prompt_json)
    decode, runs, streams = int(decode_s), int(runs_s), int(streams_s)
    threads = int(os.environ.get("ZSE_BENCH_THREADS", "2"))
    llm = Llama(
        model_path=model,
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    llm.eval(prompt[:8])
    last_logits(llm).argmax()
    cold_start = time.time() - float(start_s)

    prefill, decode_rates = [], []
    for run in range(runs + 1):  # the first run warms up
        ids = prompt[run:] + prompt[:run]
        t0 = time.perf_counter()
        t1 = greedy(llm, ids, decode)
        t2 = time.perf_counter()
        prefill.append(len(ids) / (t1 - t0))
        decode_rates.append(decode / (t2 - t1))

    t0 = time.perf_counter()
    for i in range(streams):
        greedy(llm, prompt[32 * i : 32 * (i + 1)], decode - 1)
    aggregate = streams * decode / (time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "prefill_tok_s": statistics.median(prefill[1:]),
                "decode_tok_s": statistics.median(decode_rates[1:]),
                "aggregate_tok_s": aggregate,
                "cold_start_s": cold_start,
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Runs the engine benchmark's workload on llama-cpp-python; prints one JSON line.

Called by engine_bench.py with the interpreter of llama-cpp-python's own virtual
environment: MODEL_GGUF PROMPT_IDS_JSON DECODE_TOKENS RUNS.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama


def last_logits(llm: Llama) -> np.ndarray:
    # Without logits_all, llama-cpp-python keeps no scores: read llama.cpp's buffer
    # for the batch's last token directly.
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def main() -> None:
    model, prompt_json, decode_s, runs_s = sys.argv[1:5]
    prompt: list[int] = json.loads(prompt_json)
    decode, runs = int(decode_s), int(runs_s)
    llm = Llama(model_path=model, n_ctx=2048, n_threads=2, n_batch=512, verbose=False)
    prefill, decode_rates = [], []
    for _ in range(runs + 1):  # the first run warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        token = int(llm._scores[-1].argmax())
        for _ in range(decode):
            llm.eval([token])
            token = int(llm._scores[-1].argmax())
        t2 = time.perf_counter()
        prefill.append(len(prompt) / (t1 - t0))
        decode_rates.append(decode / (t2 - t1))
    print(
        json.dumps(
            {
                "prefill_tok_s": statistics.median(prefill[1:]),
                "decode_tok_s": statistics.median(decode_rates[1:]),
            }
        )
    )


if __name__ == "__main__":
    main()

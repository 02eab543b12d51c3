"""Teacher-forced log-probabilities from llama.cpp (llama-cpp-python on the peer's
libraries), in a process of its own; prints one JSON line.

Called by quality.py with the interpreter of llama-cpp-python's own virtual
environment: MODEL_GGUF, with a JSON list of `{"ids": [...], "want": [[token, ...] per
position]}` on standard input (it can outgrow a command line); prints, per sequence and
position, the log-probabilities of the tokens wanted there (llama.cpp's default F16
KV cache, as the reference files were made).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    model = sys.argv[1]
    sequences = json.load(sys.stdin)
    llm = Llama(model_path=model, n_ctx=2048, logits_all=True, verbose=False)
    out = []
    for seq in sequences:
        llm.reset()
        llm.eval(seq["ids"])
        logits = np.asarray(llm.scores[: len(seq["ids"])], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        out.append([[float(logprobs[p, t]) for t in want] for p, want in enumerate(seq["want"])])
    print(json.dumps(out))


if __name__ == "__main__":
    main()

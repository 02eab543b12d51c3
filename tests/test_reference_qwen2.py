"""The Qwen2 architecture (q/k/v biases, NeoX RoPE, tied embeddings) in F32 against
llama.cpp's teacher-forced log-probabilities on the tiny random model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zse
from conftest import load_reference

REF = load_reference("qwen2-tiny-random-reference.json")
SMOL = load_reference("smollm2-q4_1-greedy.json")
TOLERANCE = 2e-3  # F32 throughout: only summation order differs from llama.cpp


@pytest.fixture(scope="module", params=["kernels", "candle"])
def tiny(request: pytest.FixtureRequest, qwen_tiny: Path) -> Iterator[zse.Engine]:
    """The model on ZSE's CPU kernels, and on candle's operations (the code path a
    GPU runs: candle's matmul, attention over keys and values gathered from the pool)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "candle":
            mp.setenv("ZSE_CPU_KERNELS", "candle")
        engine = zse.Engine(qwen_tiny, kv_cache_dtype="f32")
    assert (engine.metadata["cpu_kernels"] == "candle") == (request.param == "candle")
    yield engine
    engine.close()


@pytest.mark.parametrize("i", range(len(REF["cases"])))
def test_teacher_forced_top10_logprobs(tiny: zse.Engine, i: int) -> None:
    case = REF["cases"][i]
    ours = tiny.score(case["token_ids"], top=10)
    ref = case["top10_logprobs_per_position"]
    assert len(ours) == len(ref)
    for pos, (mine, theirs) in enumerate(zip(ours, ref, strict=True)):
        mine_by_id = dict(mine)
        for token, logprob in theirs:
            assert token in mine_by_id, f"position {pos}: token {token} not in our top 10"
            assert mine_by_id[token] == pytest.approx(logprob, abs=TOLERANCE), (pos, token)


def test_greedy_continuation(tiny: zse.Engine) -> None:
    prompt = SMOL["cases"][0]["prompt_ids"]
    assert REF["cases"][0]["token_ids"][: len(prompt)] == prompt
    text = tiny.detokenize(prompt, skip_special_tokens=False)
    assert tiny.tokenize(text) == prompt
    expected = REF["greedy_from_case0"]
    out = tiny.generate(text, temperature=0, max_tokens=len(expected), ignore_eos=True)
    assert out.token_ids == expected

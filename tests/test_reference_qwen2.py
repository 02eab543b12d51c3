"""The Qwen2 architecture (q/k/v biases, NeoX RoPE, tied embeddings) in F32 against
llama.cpp's teacher-forced log-probabilities on the tiny random model."""

from __future__ import annotations

import pytest
import zse
from conftest import load_reference

REF = load_reference("qwen2-tiny-random-reference.json")
SMOL = load_reference("smollm2-q4_1-greedy.json")
TOLERANCE = 2e-3  # F32 throughout: only summation order differs from llama.cpp


@pytest.mark.parametrize("i", range(len(REF["cases"])))
def test_teacher_forced_top10_logprobs(tiny_engine: zse.Engine, i: int) -> None:
    case = REF["cases"][i]
    ours = tiny_engine.score(case["token_ids"], top=10)
    ref = case["top10_logprobs_per_position"]
    assert len(ours) == len(ref)
    for pos, (mine, theirs) in enumerate(zip(ours, ref, strict=True)):
        mine_by_id = dict(mine)
        for token, logprob in theirs:
            assert token in mine_by_id, f"position {pos}: token {token} not in our top 10"
            assert mine_by_id[token] == pytest.approx(logprob, abs=TOLERANCE), (pos, token)


def test_greedy_continuation(tiny_engine: zse.Engine) -> None:
    prompt = SMOL["cases"][0]["prompt_ids"]
    assert REF["cases"][0]["token_ids"][: len(prompt)] == prompt
    text = tiny_engine.detokenize(prompt, skip_special_tokens=False)
    assert tiny_engine.tokenize(text) == prompt
    expected = REF["greedy_from_case0"]
    out = tiny_engine.generate(text, temperature=0, max_tokens=len(expected), ignore_eos=True)
    assert out.token_ids == expected

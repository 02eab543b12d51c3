"""Layers that attend within a sliding window keep only their window's KV blocks (in a
pool of their own), on the tiny Gemma 3 (a 4-position window on one of its two layers;
16-position blocks; 16-token steps, so a prompt is read in chunks): generation gives
those blocks back as it goes, and its log-probabilities are the teacher-forced ones
of a cache that keeps everything; a repeated prompt reuses its prefix, windowed blocks
included, with the same result; forks (n > 1) share them and copy the partial one.
(Gemma 3 270M at 8k tokens: tests in sched/mod.rs.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import tiny_models
import zse
from conftest import REFERENCE_DIR

PROMPT = [(i * 37) % 4000 + 100 for i in range(90)]
STEPS = 24


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zse.Engine]:
    tmp = tmp_path_factory.mktemp("window")
    gguf = tmp / "gemma3.gguf"
    tiny_models.write("gemma3", gguf, REFERENCE_DIR / "qwen2-tiny-random-f32.gguf")
    model = tmp / "gemma3.zse"
    zse.convert(gguf, model, quant="keep", progress=False)
    with zse.Engine(model, kv_cache_dtype="f32", max_batch_tokens=16) as e:
        yield e


def generate(engine: zse.Engine, ids: list[int], n: int) -> list[tuple[list[int], list[float]]]:
    """Greedy choices for `ids`, with each chosen token's log-probability."""

    async def run() -> list[tuple[list[int], list[float]]]:
        streams = engine.astream_choices(
            ids, n, temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=True
        )
        out = []
        for s in streams:
            tokens, logprobs = [], []
            async for d in s:
                tokens += d.token_ids
                logprobs += [lp.logprob for lp in d.logprobs or []]
            out.append((tokens, logprobs))
        return out

    return asyncio.run(run())


def same(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> bool:
    """The same tokens, with log-probabilities within the last bits of arithmetic done
    in other batch shapes (a prefix from the cache, a batch of forks)."""
    return a[0] == b[0] and all(abs(x - y) < 1e-4 for x, y in zip(a[1], b[1], strict=True))


def wait_idle(engine: zse.Engine) -> dict[str, int]:
    for _ in range(200):
        stats = engine.stats()
        if stats["running"] == 0:
            return stats
        asyncio.run(asyncio.sleep(0.01))
    raise AssertionError("the engine did not go idle")


def test_the_windowed_layers_have_a_pool_of_their_own(engine: zse.Engine) -> None:
    window = engine.limits["kv_window"]
    assert window is not None and (window["window"], window["layers"]) == (4, 1)
    assert 0 < window["blocks"] < engine.limits["kv_blocks"]


def test_generation_equals_a_cache_that_keeps_everything(engine: zse.Engine) -> None:
    [(tokens, logprobs)] = generate(engine, PROMPT, 1)
    assert len(tokens) == STEPS
    # Scoring runs in a cache of its own that frees nothing.
    scored = engine.score(PROMPT + tokens, top=1)
    for step, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
        [(best, best_logprob)] = scored[len(PROMPT) - 1 + step]
        assert best == token, f"step {step}"
        assert abs(best_logprob - logprob) < 1e-4, f"step {step}"
    stats = wait_idle(engine)
    assert stats["kv_blocks_used"] == stats["kv_window_blocks_used"] == 0


def test_a_repeated_prompt_reuses_its_prefix_with_the_same_result(engine: zse.Engine) -> None:
    first = generate(engine, [*PROMPT, 7], 1)
    hits = engine.stats()["prefix_hit_tokens"]
    again = generate(engine, [*PROMPT, 7], 1)
    assert engine.stats()["prefix_hit_tokens"] - hits >= 80  # five full blocks
    assert same(again[0], first[0])


def test_forks_share_the_prompt_and_agree(engine: zse.Engine) -> None:
    alone = generate(engine, PROMPT[:50], 1)
    forks = generate(engine, PROMPT[:50], 3)
    assert len(forks) == 3 and all(same(f, alone[0]) for f in forks)
    stats = wait_idle(engine)
    assert stats["kv_window_blocks_used"] == 0

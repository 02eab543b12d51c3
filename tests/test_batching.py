"""Continuous batching over the block KV cache: results that do not depend on the
batch, preemption, chunked prefill, prefix reuse, shared blocks for n > 1, and
blocks coming back when requests end or are cancelled."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import zse

WORDS = "the dragon baked bread in a small stone oven while the village slept and dreamed".split()


def prompt(i: int) -> str:
    """Prompts of very different lengths (2 to ~150 tokens)."""
    return " ".join(WORDS[j % len(WORDS)] for j in range(2 + (i * 37) % 150))


def run_together(engine: zse.Engine, jobs: list[dict]) -> list[list[int]]:
    """Runs the jobs at once and checks that they did run together: the engine was
    seen generating several sequences in one step."""
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.stats()["running"])
            time.sleep(0.001)

    async def main() -> list[list[int]]:
        async def one(job: dict) -> list[int]:
            out = await engine.agenerate(**job)
            return out.token_ids

        return await asyncio.gather(*(one(j) for j in jobs))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        done.set()
        watcher.join()
    assert peak > 1, "the requests never ran in one batch"
    return results


def jobs(seeded: bool) -> list[dict]:
    out = []
    for i in range(16):
        job = {"prompt": prompt(i), "max_tokens": 8 + (i * 5) % 40, "ignore_eos": True}
        job.update({"temperature": 0.9, "seed": 1000 + i} if seeded else {"temperature": 0})
        out.append(job)
    return out


def wait_idle(engine: zse.Engine, timeout: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == s["waiting"] == 0:
            return s
        time.sleep(0.01)
    return engine.stats()


@pytest.fixture(scope="module")
def batched(default_model: Path) -> zse.Engine:
    # A small step budget, so that long prompts are chunked between decode steps.
    e = zse.Engine(default_model, max_batch_tokens=64)
    yield e
    e.close()


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_sixteen_concurrent_requests_match_one_by_one(batched: zse.Engine, seeded: bool) -> None:
    work = jobs(seeded)
    alone = [batched.generate(**j).token_ids for j in work]
    together = run_together(batched, work)
    assert together == alone
    assert wait_idle(batched)["kv_blocks_used"] == 0


def test_too_small_a_budget_preempts_and_gives_the_same_tokens(default_model: Path) -> None:
    work = jobs(seeded=True)
    with zse.Engine(default_model) as roomy:
        alone = [roomy.generate(**j).token_ids for j in work]
    # Room for two or three of these sequences at a time, not sixteen.
    with zse.Engine(default_model, kv_cache_mb=10, max_batch_tokens=64) as tight:
        assert tight.limits["kv_cache_tokens"] < 500
        assert run_together(tight, work) == alone
        stats = wait_idle(tight)
        assert stats["preemptions"] > 0
        assert stats["kv_blocks_used"] == 0


def test_cancelling_half_mid_stream_frees_their_blocks(batched: zse.Engine) -> None:
    idle = wait_idle(batched)["kv_blocks_used"]
    streams = [
        batched.stream(prompt(i), max_tokens=400, ignore_eos=True, temperature=0) for i in range(8)
    ]
    for s in streams:
        next(s)
    assert batched.stats()["kv_blocks_used"] > idle
    for s in streams[::2]:
        s.close()
    for s in streams[1::2]:
        for _ in range(3):
            next(s)
    busy = batched.stats()["running"]
    assert busy == 4
    for s in streams[1::2]:
        s.close()
    assert wait_idle(batched)["kv_blocks_used"] == idle


def test_a_repeated_system_prompt_is_reused_with_the_same_tokens(default_model: Path) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    first = [system, {"role": "user", "content": "Name a fruit."}]
    second = [system, {"role": "user", "content": "Name a color."}]
    kw = {"temperature": 0, "max_tokens": 12}
    with zse.Engine(default_model) as fresh:
        expected = fresh.chat(second, **kw).token_ids
        assert fresh.stats()["prefix_hit_tokens"] == 0
    with zse.Engine(default_model) as e:
        e.chat(first, **kw)
        before = e.stats()["prefix_hit_tokens"]
        assert e.chat(second, **kw).token_ids == expected
        shared = len(e.prompt_ids([system]))
        # Every full 16-token block of the shared system prompt came from the cache.
        assert e.stats()["prefix_hit_tokens"] - before >= (shared // 16 - 1) * 16


def test_requests_arriving_together_compute_their_system_prompt_once(
    default_model: Path,
) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    # Pairs of identical prompts, too: the second of a pair copies the first's rows of
    # the last, partial block and computes only its last token.
    chats = [[system, {"role": "user", "content": f"Name fruit number {i % 3}."}] for i in range(6)]
    kw = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    with zse.Engine(default_model) as e:
        alone = [e.chat(c, **kw).token_ids for c in chats]
    # A step budget that would take all six prompts at once: the five behind the
    # first wait for its blocks of the system prompt instead of computing them too.
    with zse.Engine(default_model, max_batch_tokens=2048) as e:

        async def main() -> list[list[int]]:
            done = await asyncio.gather(*(e.achat(c, **kw) for c in chats))
            return [c.token_ids for c in done]

        together = asyncio.run(main())
        shared_blocks = len(e.prompt_ids([system])) // 16 - 1
        assert e.stats()["prefix_hit_tokens"] >= 5 * shared_blocks * 16
    assert together == alone


def test_n_choices_share_the_prompt_blocks(batched: zse.Engine) -> None:
    text = prompt(3)  # ~110 tokens: several full blocks
    ids = batched.prompt_ids(text)
    kw = {"temperature": 1.0, "seed": 5, "max_tokens": 20, "ignore_eos": True}
    separate = [batched.generate(text, **{**kw, "seed": 5 + i}).token_ids for i in range(4)]

    async def main() -> tuple[list[list[int]], int]:
        streams = batched.astream_choices(ids, 4, **kw)
        outs: list[list[int]] = [[] for _ in streams]
        peak = 0

        async def drain(i: int) -> None:
            nonlocal peak
            async for d in streams[i]:
                outs[i] += d.token_ids
                peak = max(peak, batched.stats()["kv_blocks_used"])

        await asyncio.gather(*(drain(i) for i in range(4)))
        return outs, peak

    outs, peak = asyncio.run(main())
    assert outs == separate
    prompt_blocks = len(ids) // 16
    # Four private copies would take 4 x the prompt's blocks; shared, the full
    # prompt blocks are held once and each choice adds only its own tail.
    assert peak <= prompt_blocks + 4 * 3
    assert wait_idle(batched)["kv_blocks_used"] == 0


def test_float_weights_are_batch_invariant_too(qwen_tiny: Path) -> None:
    """F32 weights go through candle's float matmul rather than the quantized one."""
    with zse.Engine(qwen_tiny, max_batch_tokens=64) as e:
        for seeded in (False, True):
            work = jobs(seeded)
            alone = [e.generate(**j).token_ids for j in work]
            assert run_together(e, work) == alone


def test_a_request_that_makes_the_engine_fail_fails_alone(
    default_model: Path, batched: zse.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward pass that fails (here a panic injected on one token) fails only the
    request it comes from: the others in its batch go on with the same tokens."""
    work = jobs(False)[:8]
    alone = [batched.generate(**j).token_ids for j in work]
    fault = batched.tokenize(" giraffe")[-1]
    for j, tokens in zip(work, alone, strict=True):
        assert fault not in batched.tokenize(j["prompt"]) + tokens
    monkeypatch.setenv("ZSE_FAULT_TOKEN", str(fault))
    with zse.Engine(default_model, max_batch_tokens=64) as e:
        poisoned = {"prompt": prompt(5) + " giraffe", "max_tokens": 8, "temperature": 0}

        async def main() -> list[list[int] | BaseException]:
            async def one(job: dict) -> list[int]:
                return (await e.agenerate(**job)).token_ids

            # The poisoned request joins while the others are being computed.
            tasks = [asyncio.ensure_future(one(j)) for j in work]
            await asyncio.sleep(0.2)
            assert e.stats()["running"] > 1
            bad = asyncio.ensure_future(one(poisoned))
            return await asyncio.gather(*tasks, bad, return_exceptions=True)

        *rest, failure = asyncio.run(main())
        assert rest == alone
        assert isinstance(failure, zse.ZseError) and "fault injected" in str(failure)
        # The engine goes on serving, and the failed request's blocks came back.
        assert e.generate(**work[0]).token_ids == alone[0]
        assert wait_idle(e)["kv_blocks_used"] == 0

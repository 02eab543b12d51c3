"""zse.Engine's Python API: results, streaming, async, stops, seeds, logprobs,
cancellation, concurrency and argument errors. Most tests use the tiny Qwen2 model
(fast); those about text quality use the default model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zse

CHAT = [{"role": "user", "content": "Tell me a story about a dragon."}]


def test_metadata(tiny_engine: zse.Engine) -> None:
    md = tiny_engine.metadata
    assert md["config"]["architecture"] == "qwen2"
    assert md["config"]["qkv_bias"] is True
    assert md["context_length"] == 2048
    assert md["eos_token_ids"] == [2]
    assert md["source"]["source_sha256"]


def test_metadata_of_the_default_model(engine: zse.Engine) -> None:
    md = engine.metadata
    assert md["cpu_kernels"] in ("generic", "avx2", "avx512")
    # The weights as loaded: the file's blocks, repacked without growing by more
    # than the padding of the scale rows; the tied embedding is not held twice.
    assert 0.9 * md["file_size"] < md["weight_bytes"] < 1.05 * md["file_size"]


def test_generate_result_shape(tiny_engine: zse.Engine) -> None:
    out = tiny_engine.chat(CHAT, temperature=0, max_tokens=5, ignore_eos=True)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 5
    assert out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == len(
        tiny_engine.tokenize(tiny_engine.apply_chat_template(CHAT))
    )
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert out.text == tiny_engine.detokenize(out.token_ids)
    assert out.logprobs is None


def test_stream_concatenates_to_the_whole_text(tiny_engine: zse.Engine) -> None:
    whole = tiny_engine.chat(CHAT, temperature=0, max_tokens=24, ignore_eos=True)
    stream = tiny_engine.stream(CHAT, temperature=0, max_tokens=24, ignore_eos=True)
    deltas = list(stream)
    assert "".join(deltas) == whole.text
    assert stream.completion == whole


def test_seed_reproduces_sampling(tiny_engine: zse.Engine) -> None:
    kw = {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True}
    a = tiny_engine.chat(CHAT, seed=123, **kw)
    b = tiny_engine.chat(CHAT, seed=123, **kw)
    c = tiny_engine.chat(CHAT, seed=124, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_cuts_text_and_never_streams(tiny_engine: zse.Engine) -> None:
    full = tiny_engine.chat(CHAT, temperature=0, max_tokens=24, ignore_eos=True).text
    assert len(full) > 12
    stop = full[6:10]
    assert stop.strip(), "picked an all-space stop string"
    expected = full[: full.index(stop)]
    out = tiny_engine.chat(CHAT, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    assert out.text == expected
    assert out.finish_reason == "stop"
    streamed = list(
        tiny_engine.stream(CHAT, temperature=0, max_tokens=24, ignore_eos=True, stop=stop)
    )
    assert "".join(streamed) == expected
    assert all(stop not in d for d in streamed)


def test_logprobs(tiny_engine: zse.Engine) -> None:
    out = tiny_engine.chat(CHAT, temperature=0, max_tokens=6, ignore_eos=True, top_logprobs=3)
    assert out.logprobs is not None and len(out.logprobs) == 6
    for tok_id, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok_id
        assert lp.logprob <= 0
        assert len(lp.top_logprobs) == 3
        values = [t.logprob for t in lp.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert lp.top_logprobs[0].token_id == tok_id  # greedy picks the most likely
        assert lp.token == tiny_engine.detokenize([tok_id], skip_special_tokens=False)
    only_chosen = tiny_engine.chat(CHAT, temperature=0, max_tokens=2, logprobs=True)
    assert only_chosen.logprobs is not None
    assert all(lp.top_logprobs == [] for lp in only_chosen.logprobs)


def test_async_twins_match_sync(tiny_engine: zse.Engine) -> None:
    sync = tiny_engine.chat(CHAT, temperature=0, max_tokens=12, ignore_eos=True)

    async def main() -> tuple[zse.Completion, list[str]]:
        done = await tiny_engine.achat(CHAT, temperature=0, max_tokens=12, ignore_eos=True)
        deltas = [
            d
            async for d in tiny_engine.astream(CHAT, temperature=0, max_tokens=12, ignore_eos=True)
        ]
        return done, deltas

    done, deltas = asyncio.run(main())
    assert done == sync
    assert "".join(deltas) == sync.text


def test_many_async_streams_share_one_loop(tiny_engine: zse.Engine) -> None:
    prompts = [f"Count to {n}." for n in range(8)]
    solo = [tiny_engine.generate(p, temperature=0, max_tokens=10, ignore_eos=True) for p in prompts]

    async def main() -> list[zse.Completion]:
        return list(
            await asyncio.gather(
                *(
                    tiny_engine.agenerate(p, temperature=0, max_tokens=10, ignore_eos=True)
                    for p in prompts
                )
            )
        )

    threads_before = threading.active_count()
    together = asyncio.run(main())
    assert threading.active_count() == threads_before
    assert [c.token_ids for c in together] == [c.token_ids for c in solo]


def test_a_stuck_wake_up_hook_never_stalls_the_engine(tiny_engine: zse.Engine) -> None:
    # Async streams are woken through this hook. It runs on the bindings' own thread,
    # not the engine's: even a hook that never returns leaves other requests running.
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait()

    ids = tiny_engine.prompt_ids("Hello")
    (stuck_stream,) = tiny_engine._native.submit(
        ids, temperature=0, max_tokens=5, ignore_eos=True, notify=stuck
    )
    others: list[zse.Completion] = []
    other = threading.Thread(
        target=lambda: others.append(
            tiny_engine.generate("Count to three.", temperature=0, max_tokens=8, ignore_eos=True)
        )
    )
    try:
        assert entered.wait(60)
        other.start()
        other.join(timeout=60)
        assert [c.usage.completion_tokens for c in others] == [8]
    finally:
        release.set()
    assert sum(len(c.token_ids) for c in stuck_stream) == 5


EXIT_WHILE_STREAMING = """
import asyncio, sys, zse
engine = zse.Engine(sys.argv[1])
async def main():
    streams = [
        engine.astream(f"Count to {i}.", max_tokens=2000, ignore_eos=True, temperature=0)
        for i in range(8)
    ]
    for s in streams:
        await s.__anext__()
asyncio.run(main())
"""


def test_the_interpreter_exits_cleanly_while_streams_still_run(default_model: Path) -> None:
    # Wake-up hooks keep coming while Python finalizes; none may take the GIL then
    # (CPython would end that thread from inside Rust, aborting the process).
    for _ in range(4):
        r = subprocess.run(
            [sys.executable, "-c", EXIT_WHILE_STREAMING, str(default_model)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]


def test_concurrent_requests_batch_and_match_solo_runs(tiny_engine: zse.Engine) -> None:
    prompts = [f"Question {n}: " + "why? " * n for n in range(6)]
    solo = [tiny_engine.generate(p, temperature=0, max_tokens=12, ignore_eos=True) for p in prompts]
    results: list[zse.Completion | None] = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = tiny_engine.generate(prompts[i], temperature=0, max_tokens=12, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.token_ids if r else None for r in results] == [s.token_ids for s in solo]


def test_cancel_stops_generation(tiny_engine: zse.Engine) -> None:
    stream = tiny_engine.stream(CHAT, temperature=0, max_tokens=500, ignore_eos=True)
    next(stream)
    stream.close()
    rest = list(stream)
    assert stream.completion is not None
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.usage.completion_tokens < 500
    assert len(rest) < 500
    deadline = time.monotonic() + 10
    while tiny_engine.stats()["running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_engine.stats()["running"] == 0


def test_dropped_stream_frees_its_sequence(tiny_engine: zse.Engine) -> None:
    stream = tiny_engine.stream(CHAT, temperature=0, max_tokens=2000, ignore_eos=True)
    next(stream)
    del stream
    deadline = time.monotonic() + 10
    while tiny_engine.stats()["running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_engine.stats()["running"] == 0


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {10**9: 1}}, "logit_bias"),
        ({"stop": [1, 2]}, "stop"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_invalid_sampling_arguments_name_the_argument(
    tiny_engine: zse.Engine, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(ValueError, match=param):
        tiny_engine.chat(CHAT, **kwargs)


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        [{"content": "no role"}],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        ["not a dict"],
    ],
)
def test_invalid_messages(tiny_engine: zse.Engine, messages: object) -> None:
    with pytest.raises(ValueError, match="messages"):
        tiny_engine.chat(messages)  # type: ignore[arg-type]


def test_text_parts_are_joined(tiny_engine: zse.Engine) -> None:
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
        }
    ]
    assert tiny_engine.apply_chat_template(parts) == tiny_engine.apply_chat_template(
        [{"role": "user", "content": "Hello"}]
    )


def test_prompt_over_context_is_rejected(qwen_tiny: Path) -> None:
    with zse.Engine(qwen_tiny, context_length=16) as small:
        with pytest.raises(zse.ContextLengthExceededError, match="16"):
            small.generate("word " * 40)
        out = small.generate("Hi", temperature=0, ignore_eos=True)
        assert out.finish_reason == "length"
        assert out.usage.total_tokens == 16


def test_engine_arguments_and_missing_file(tmp_path: Path, qwen_tiny: Path) -> None:
    with pytest.raises(FileNotFoundError):
        zse.Engine(tmp_path / "nope.zse")
    with pytest.raises(ValueError, match="context_length"):
        zse.Engine(qwen_tiny, context_length=0)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        zse.Engine(qwen_tiny, kv_cache_dtype="f8")  # type: ignore[arg-type]


def test_tokenize_round_trip_keeps_unicode(engine: zse.Engine) -> None:
    text = "Café, naïve, jalapeño — 東京 🙂"
    assert engine.detokenize(engine.tokenize(text)) == text
    with pytest.raises(ValueError):
        engine.detokenize([10**7])


def test_streaming_never_splits_a_character(engine: zse.Engine) -> None:
    msgs = [{"role": "user", "content": "Write 東京 and 🙂 and ñ three times."}]
    whole = engine.chat(msgs, temperature=0, max_tokens=40)
    deltas = list(engine.stream(msgs, temperature=0, max_tokens=40))
    assert "".join(deltas) == whole.text
    assert all("\ufffd" not in d for d in deltas)


def test_closed_engine_refuses_work(qwen_tiny: Path) -> None:
    e = zse.Engine(qwen_tiny)
    e.close()
    with pytest.raises(zse.EngineStoppedError):
        e.generate("hi")


def test_kv_budget_caps_the_context_and_preempts_without_changing_results(
    qwen_tiny: Path, tiny_engine: zse.Engine
) -> None:
    per_token = tiny_engine.limits["kv_bytes_per_token"]
    budget_mb = 120 * per_token / 2**20
    with zse.Engine(
        qwen_tiny, kv_cache_mb=budget_mb, max_sequences=4, kv_cache_dtype="f32"
    ) as small:
        limits = small.limits
        block = limits["kv_block_size"]
        assert limits["kv_cache_tokens"] == 120 // block * block == small.context_length
        # Each alone fits; together they outgrow the budget, so one is preempted and
        # recomputed later, with the same tokens.
        kw = {"temperature": 0, "max_tokens": 70, "ignore_eos": True}
        prompts = ["Once upon a time", "The dragon said"]
        alone = [tiny_engine.generate(p, **kw).token_ids for p in prompts]
        streams = [small.stream(p, **kw) for p in prompts]
        for s in streams:
            "".join(s)
        assert [s.completion.token_ids for s in streams if s.completion] == alone
        stats = small.stats()
        assert stats["preemptions"] >= 1
        assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0


def test_full_queue_raises_overloaded(qwen_tiny: Path) -> None:
    with zse.Engine(qwen_tiny, max_sequences=1, max_queue=1) as e:
        kw = {"max_tokens": 2000, "ignore_eos": True}
        running = e.stream("a", **kw)
        next(running)
        waiting = e.stream("b", **kw)
        with pytest.raises(zse.EngineOverloadedError, match="overloaded"):
            e.stream("c", **kw)
        running.close()
        waiting.close()
        # Cancellations take effect at the engine's next step; then there is room again.
        deadline = time.monotonic() + 5
        while e.stats()["waiting"] + e.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert e.chat(CHAT, max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"max_sequences": 0}, "max_sequences"), ({"kv_cache_mb": 0}, "kv_cache_mb")],
)
def test_bad_limits(qwen_tiny: Path, kwargs: dict[str, float], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        zse.Engine(qwen_tiny, **kwargs)  # type: ignore[arg-type]


def test_a_budget_below_one_position_is_refused(qwen_tiny: Path) -> None:
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        zse.Engine(qwen_tiny, kv_cache_mb=1e-6)


def test_devices(qwen_tiny: Path) -> None:
    """`auto` is the CPU in this CPU-only build; CUDA is refused with a clear error
    naming what to do, and a spec that names no device is a ValueError."""
    with zse.Engine(qwen_tiny, device="auto") as e:
        assert e.device == e.metadata["device"] == "cpu"
        assert e.gpu_memory() is None
        # On the CPU without a budget, the KV cache holds max_sequences full contexts.
        assert e.metadata["kv_budget"] == "full contexts"
        assert e.limits["kv_cache_tokens"] >= e.limits["max_sequences"] * e.context_length
    with zse.Engine(qwen_tiny, device="CPU", kv_cache_mb=1) as e:
        assert e.device == "cpu" and e.metadata["kv_budget"] == "given"
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(zse.DeviceUnavailableError, match="no CUDA support"):
            zse.Engine(qwen_tiny, device=spec)
    for spec in ("tpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="'device'"):
            zse.Engine(qwen_tiny, device=spec)
    for fraction in (0, 1.5, "half"):
        with pytest.raises(ValueError, match="gpu_memory_fraction"):
            zse.Engine(qwen_tiny, gpu_memory_fraction=fraction)  # type: ignore[arg-type]

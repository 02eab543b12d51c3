"""`zse serve` driven by the official `openai` package, sync and async, streaming and
not, as users drive it. The answers are checked against the in-process engine on the
same model: the server must return exactly what the engine computes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import zse
from serving import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]
EOS = 2  # SmolLM2's <|im_end|>; a bias of -100 keeps the model talking


@pytest.fixture(scope="module")
def server(default_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess(default_model) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_base, api_key="unused", max_retries=0)


def test_chat_completion_shape_and_tokens_match_the_engine(
    client: openai.OpenAI, engine: zse.Engine
) -> None:
    # EOS banned: the answer runs to the limit whatever the kernels' rounding.
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=12, logit_bias={str(EOS): -100}
    )
    expected = engine.chat(QUESTION, temperature=0, max_tokens=12, logit_bias={EOS: -100})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.model == MODEL and r.created > 0
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens == expected.usage.prompt_tokens
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_default_model_id_and_text_parts(client: openai.OpenAI) -> None:
    parts = [
        {"type": "text", "text": "What is the capital "},
        {"type": "text", "text": "of France?"},
    ]
    a = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=8
    )
    b = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    assert a.model == MODEL
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_concatenates_to_the_whole_answer(client: openai.OpenAI) -> None:
    kw = {
        "model": MODEL,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 16,
        "logit_bias": {str(EOS): -100},  # to the limit, whatever the kernels' rounding
    }
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_streaming_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_stop_string_is_cut_and_never_streamed(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": STORY, "temperature": 0, "max_tokens": 40}
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert full is not None and len(full) > 40
    stop = full[20:26]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(**kw, stop=[stop, "zzzz-never"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kw, stop=stop, stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == cut
    assert not any(stop in d for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling_and_n_gives_distinct_choices(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": STORY, "temperature": 1.0, "max_tokens": 16}
    a = client.chat.completions.create(**kw, seed=7)
    b = client.chat.completions.create(**kw, seed=7)
    c = client.chat.completions.create(**kw, seed=8)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content
    two = client.chat.completions.create(**kw, seed=7, n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    # Choice i uses seed + i: the first choice is the single request's answer.
    assert two.choices[0].message.content == a.choices[0].message.content
    assert two.choices[1].message.content == c.choices[0].message.content
    assert two.usage is not None and two.usage.completion_tokens == 32


def test_streaming_n_choices_interleave_by_index(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": STORY, "temperature": 1.0, "max_tokens": 10, "seed": 3}
    whole = client.chat.completions.create(**kw, n=2)
    texts = ["", ""]
    for chunk in client.chat.completions.create(**kw, n=2, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [ch.message.content for ch in whole.choices]


def test_logprobs(client: openai.OpenAI, engine: zse.Engine) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    expected = engine.chat(QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    assert expected.logprobs is not None
    for got, want in zip(content, expected.logprobs, strict=True):
        assert got.token == want.token
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert got.bytes == list(want.token.encode())
        assert len(got.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert got.top_logprobs[0].token == got.token
    streamed = [
        lp
        for c in client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, stream=True
        )
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.content or []
    ]
    assert [lp.token for lp in streamed] == [lp.token for lp in content]


def tokens_of(client: openai.OpenAI, **kw: object) -> list[str]:
    """The completion's tokens (from its log-probabilities), EOS banned."""
    r = client.chat.completions.create(
        model=MODEL, messages=STORY, logprobs=True, logit_bias={str(EOS): -100}, **kw
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs is not None
    return [lp.token for lp in r.choices[0].logprobs.content or []]


def test_max_completion_tokens_counts_the_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=STORY, max_completion_tokens=7, logit_bias={str(EOS): -100}
    )
    assert r.usage is not None and r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"


def test_top_k_and_min_p_cut_the_distribution(client: openai.OpenAI) -> None:
    """Keeping only the most likely token (top_k 1, or min_p 1: nothing less likely
    than the top) turns sampling at temperature 1 into greedy decoding, whatever the
    seed; without them, the seeds give other tokens."""
    greedy = tokens_of(client, temperature=0, max_tokens=24)
    for seed in (1, 2):
        sampled = tokens_of(client, temperature=1, seed=seed, max_tokens=24)
        assert sampled != greedy
        assert (
            tokens_of(client, temperature=1, seed=seed, max_tokens=24, extra_body={"top_k": 1})
            == greedy
        )
        assert (
            tokens_of(client, temperature=1, seed=seed, max_tokens=24, extra_body={"min_p": 1.0})
            == greedy
        )


@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 1.8}},
    ],
    ids=["presence", "frequency", "repetition"],
)
def test_penalties_make_a_greedy_answer_repeat_itself_less(
    client: openai.OpenAI, penalty: dict[str, object]
) -> None:
    plain = tokens_of(client, temperature=0, max_tokens=64)
    penalized = tokens_of(client, temperature=0, max_tokens=64, **penalty)
    # Greedy SmolLM2 repeats itself within 64 tokens; a penalty spreads the answer over
    # more distinct tokens.
    assert len(set(plain)) < len(plain)
    assert len(set(penalized)) > len(set(plain))


def test_legacy_completions(client: openai.OpenAI, engine: zse.Engine) -> None:
    r = client.completions.create(
        model=MODEL, prompt=["The sky is", "Paris is"], max_tokens=6, temperature=0, logprobs=2
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1]
    for c, prompt in zip(r.choices, ["The sky is", "Paris is"], strict=True):
        assert c.text == engine.generate(prompt, temperature=0, max_tokens=6).text
        assert c.logprobs is not None and len(c.logprobs.tokens or []) == 6
        assert "".join(c.logprobs.tokens or []) == c.text
    echoed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith("The sky is")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The sky is", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "zse" and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_sdk_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=2.5)
    assert e.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 9000}]
        )
    assert e.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_async_client_runs_requests_concurrently(server: ServerProcess) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.api_base, api_key="unused", max_retries=0)
        prompts = ["Name a color.", "Name a fruit.", "Name an animal.", "Name a city."]

        async def ask(p: str) -> str:
            r = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": p}],
                temperature=0,
                max_tokens=8,
            )
            return r.choices[0].message.content or ""

        async def ask_streaming(p: str) -> str:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": p}],
                temperature=0,
                max_tokens=8,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        together = await asyncio.gather(*(ask(p) for p in prompts))
        streamed = await asyncio.gather(*(ask_streaming(p) for p in prompts))
        alone = [await ask(p) for p in prompts]
        await client.close()
        assert streamed == alone
        return [*together, *alone]

    answers = asyncio.run(main())
    # Greedy answers do not depend on what else the server was doing.
    assert answers[:4] == answers[4:]

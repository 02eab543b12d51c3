"""``zse.Engine``: load a ``.zse`` model and generate from Python.

The native engine runs on its own thread; these methods only queue requests and
wait for their events, with the GIL released while waiting, so other Python threads
(and asyncio tasks, for the ``a*`` methods) keep running.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from . import _core
from .chat import ChatPlan, ToolCall
from .models import pull

Message = Mapping[str, Any]
MAX_TOP_LOGPROBS = 20
# Scheduling defaults, shared by `Engine`, `zse serve` and its options.
DEFAULT_MAX_SEQUENCES = 16
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BATCH_TOKENS = 256
#: `zse serve`'s KV budget on the CPU: about 90k positions of SmolLM2 (F16 cache),
#: i.e. eleven full 8k contexts, or 16 streams of 5k.
DEFAULT_KV_CACHE_MB = 2048.0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives."""

    token: str
    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob]


@dataclass(frozen=True)
class Completion:
    text: str
    """Everything generated, markup and thought included."""
    finish_reason: str
    """``stop`` (EOS, stop token or stop string), ``length``, ``cancelled`` or, for
    a chat whose reply called tools, ``tool_calls``."""
    usage: Usage
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    content: str | None = None
    """A chat's answer: ``text`` without the thought and the tool calls."""
    reasoning_content: str | None = None
    """A chat's thought (``<think>...</think>``), for models that think."""
    tool_calls: list[ToolCall] = field(default_factory=list)


def _reply(completion: Completion, plan: ChatPlan | None) -> Completion:
    """A chat's completion with its text split into answer, thought and calls."""
    if plan is None:
        return replace(completion, content=completion.text)
    parser = plan.parser()
    parser.feed(completion.text)
    parser.finish()
    calls = parser.tool_calls
    finish = completion.finish_reason
    return replace(
        completion,
        content=parser.content if parser.content or not calls else None,
        reasoning_content=parser.reasoning if plan.thinking != "no" else None,
        tool_calls=calls,
        finish_reason="tool_calls" if calls and finish == "stop" else finish,
    )


@dataclass
class _Request:
    """The arguments of one generation, checked before they reach the engine."""

    kwargs: dict[str, Any]
    want_logprobs: bool


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"invalid value for '{name}': {value!r} must be an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"invalid value for '{name}': {value} must be {bound}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid value for '{name}': {value!r} must be a number")
    return float(value)


def _sampling(
    *,
    max_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int | str, float] | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    response_format: Mapping[str, Any] | type | None = None,
) -> _Request:
    """Checks argument types, and the integers that must be non-negative to cross into
    the engine; the engine itself checks the ranges of the sampling parameters."""
    kw: dict[str, Any] = {
        "temperature": _check_float("temperature", temperature),
        "top_p": _check_float("top_p", top_p),
        "top_k": _check_int("top_k", top_k, 0),
        "min_p": _check_float("min_p", min_p),
        "repetition_penalty": _check_float("repetition_penalty", repetition_penalty),
        "presence_penalty": _check_float("presence_penalty", presence_penalty),
        "frequency_penalty": _check_float("frequency_penalty", frequency_penalty),
        "ignore_eos": bool(ignore_eos),
    }
    if max_tokens is not None:
        kw["max_tokens"] = _check_int("max_tokens", max_tokens, 1)
    if seed is not None:
        # Any Python int is a valid seed; the engine takes 64 bits of it.
        kw["seed"] = _check_int("seed", seed, -(2**63)) & (2**64 - 1)
    if logit_bias:
        try:
            kw["logit_bias"] = [(int(k), float(v)) for k, v in logit_bias.items()]
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid value for 'logit_bias': {e}") from None
        if any(k < 0 for k, _ in kw["logit_bias"]):
            raise ValueError("invalid value for 'logit_bias': token ids must be >= 0")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stops):
            raise ValueError("invalid value for 'stop': must be a string or a list of strings")
        kw["stop"] = stops
    if stop_token_ids:
        kw["stop_token_ids"] = [_check_int("stop_token_ids", t, 0) for t in stop_token_ids]
    _check_int("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS)
    if logprobs or top_logprobs:
        kw["logprobs"] = top_logprobs
    if response_format is not None:
        try:
            kw["response_format"] = json.dumps(_response_format(response_format))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid value for 'response_format': {e}") from None
    return _Request(kw, bool(logprobs or top_logprobs))


def _response_format(response_format: Mapping[str, Any] | type) -> dict[str, Any]:
    """OpenAI's ``response_format`` object, for the engine to check and compile. A
    pydantic model class stands for its JSON schema (as the OpenAI SDK's ``parse``
    sends it). Besides OpenAI's types, ``{"type": "lark", "lark": ...}`` takes an
    llguidance Lark grammar."""
    schema_of = getattr(response_format, "model_json_schema", None)
    if isinstance(response_format, type) and callable(schema_of):
        name = response_format.__name__
        spec = {"name": name, "schema": schema_of(), "strict": True}
        return {"type": "json_schema", "json_schema": spec}
    if not isinstance(response_format, Mapping):
        raise ValueError(
            "invalid value for 'response_format': must be an object such as "
            "{'type': 'json_object'}, or a pydantic model class"
        )
    return dict(response_format)


@dataclass
class _Collector:
    """Accumulates chunks into a `Completion` (a chat's split by its plan)."""

    engine: Engine
    want_logprobs: bool
    plan: ChatPlan | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion: Completion | None = None

    def add(self, chunk: _core.Chunk) -> str:
        if chunk.error is not None:
            raise _core.ZseError(chunk.error)
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        if self.want_logprobs:
            self.logprobs.extend(self.engine._token_logprob(*lp) for lp in chunk.logprobs)
        if chunk.finish_reason is not None:
            whole = Completion(
                text="".join(self.text),
                finish_reason=chunk.finish_reason,
                usage=Usage(chunk.prompt_tokens, chunk.completion_tokens),
                token_ids=self.token_ids,
                logprobs=self.logprobs if self.want_logprobs else None,
            )
            self.completion = _reply(whole, self.plan)
        return chunk.text


class TextStream:
    """Iterator of text deltas. After the last one, ``completion`` holds the whole
    result (finish reason, usage). ``close()`` (or leaving a ``with`` block) cancels."""

    def __init__(self, stream: _core.RequestStream, collector: _Collector) -> None:
        self._stream = stream
        self._collector = collector

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            chunk = next(self._stream)
            text = self._collector.add(chunk)
            if text:
                return text
            if chunk.finish_reason is not None:
                raise StopIteration

    @property
    def completion(self) -> Completion | None:
        return self._collector.completion

    def close(self) -> None:
        self._stream.cancel()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Delta:
    """One step of a generation: new text and tokens; the last one has
    ``finish_reason`` and ``usage`` (and ``error`` when the engine failed)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


class _AsyncChunks:
    """The engine's chunks for one choice, awaited without a thread per request: the
    bindings' notifier thread wakes the event loop through ``call_soon_threadsafe``
    (see `_submit_async`)."""

    def __init__(
        self, engine: Engine, request: _Request, stream: _core.RequestStream, wake: asyncio.Event
    ) -> None:
        self._engine = engine
        self._want_logprobs = request.want_logprobs
        self._stream = stream
        self._wake = wake

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def _next_chunk(self) -> _core.Chunk:
        while True:
            chunk = self._stream.try_next()
            if chunk is not None:
                return chunk
            if self._stream.finished:
                raise StopAsyncIteration
            self._wake.clear()
            chunk = self._stream.try_next()
            if chunk is not None:
                return chunk
            await self._wake.wait()

    def cancel(self) -> None:
        """Stops the generation at the engine's next step."""
        self._stream.cancel()

    async def aclose(self) -> None:
        self.cancel()


class AsyncDeltaStream(_AsyncChunks):
    """Async iterator of `Delta` values, token by token, ending with the one that has
    ``finish_reason``. Engine failures arrive as a delta with ``error`` set."""

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        chunk = await self._next_chunk()
        logprobs = None
        if self._want_logprobs:
            logprobs = [self._engine._token_logprob(*lp) for lp in chunk.logprobs]
        usage = None
        if chunk.finish_reason is not None:
            usage = Usage(chunk.prompt_tokens, chunk.completion_tokens)
        return Delta(chunk.text, chunk.token_ids, logprobs, chunk.finish_reason, usage, chunk.error)

    async def __aenter__(self) -> AsyncDeltaStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_Chunks = TypeVar("_Chunks", bound=_AsyncChunks)


def _submit_async(
    cls: type[_Chunks], engine: Engine, request: _Request, prompt_ids: list[int], n: int
) -> list[_Chunks]:
    """Submits ``n`` choices from inside a running event loop. One wake-up hook for
    all of them, called on the bindings' notifier thread (never the engine's, which
    must not wait for the GIL), sets each choice's event on the loop."""
    loop = asyncio.get_running_loop()
    wakes = [asyncio.Event() for _ in range(n)]

    def wake_all() -> None:
        for w in wakes:
            w.set()

    def notify() -> None:
        try:
            loop.call_soon_threadsafe(wake_all)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    natives = engine._native.submit(prompt_ids, n=n, notify=notify, **request.kwargs)
    return [cls(engine, request, s, w) for s, w in zip(natives, wakes, strict=True)]


class AsyncTextStream(_AsyncChunks):
    """Async twin of `TextStream`."""

    def __init__(
        self, engine: Engine, request: _Request, stream: _core.RequestStream, wake: asyncio.Event
    ) -> None:
        super().__init__(engine, request, stream, wake)
        self._collector = _Collector(engine, request.want_logprobs)

    async def __anext__(self) -> str:
        while True:
            chunk = await self._next_chunk()
            text = self._collector.add(chunk)
            if text:
                return text
            if chunk.finish_reason is not None:
                raise StopAsyncIteration

    @property
    def completion(self) -> Completion | None:
        return self._collector.completion

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Engine:
    """A loaded model and its engine thread.

    ``Engine()`` with no path loads the default model, fetching it on first use.
    ``context_length`` caps the context (default: the model's); ``kv_cache_dtype`` is
    ``"f16"`` (half the memory, llama.cpp's default) or ``"f32"``. ``max_sequences``
    requests are generated at once, up to ``max_queue`` more wait (beyond that,
    submitting raises `EngineOverloadedError`); ``kv_cache_mb`` bounds the KV cache
    (default: room for ``max_sequences`` full contexts) and with it the context length;
    when it runs out, the newest sequences wait and are recomputed later, with the
    same result. Each step processes at most ``max_batch_tokens`` tokens: long prompts
    go in chunks between the decode steps of the others. Prompt prefixes seen before
    (a system prompt, earlier turns) are reused from the cache.
    ``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (the default: the
    first GPU where this build has CUDA and one is usable, else the CPU). On a GPU
    without ``kv_cache_mb``, weights and KV cache take ``gpu_memory_fraction`` of the
    GPU's free memory. CPU threads come from ``RAYON_NUM_THREADS`` (default: every
    core), read once per process when the first engine starts. ``cpu_kernels`` picks
    the CPU's code path: ``"generic"``, ``"avx2"``, ``"avx512"``, ``"candle"`` (candle's
    operations, the GPU's path) or ``"auto"``; default: ``$ZSE_CPU_KERNELS``, else auto.
    ``chat_template`` (Jinja text) replaces the file's chat template, or gives one to a
    model without (without one, chats raise `TemplateError`; `generate` still works).
    Sampling keywords (all methods that generate): ``max_tokens``, ``temperature``
    (0 = greedy), ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` ({token id: bias}),
    ``seed``, ``stop`` (string or list), ``stop_token_ids``, ``ignore_eos``,
    ``logprobs`` and ``top_logprobs`` (0-20).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        context_length: int | None = None,
        kv_cache_dtype: Literal["f16", "f32"] = "f16",
        max_sequences: int = DEFAULT_MAX_SEQUENCES,
        max_queue: int = DEFAULT_MAX_QUEUE,
        kv_cache_mb: float | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        device: str = "auto",
        gpu_memory_fraction: float = 0.9,
        cpu_kernels: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        if context_length is not None:
            _check_int("context_length", context_length, 1)
        _check_int("max_sequences", max_sequences, 1)
        _check_int("max_queue", max_queue, 0)
        _check_int("max_batch_tokens", max_batch_tokens, 1)
        kv_bytes = None
        if kv_cache_mb is not None:
            if _check_float("kv_cache_mb", kv_cache_mb) <= 0:
                raise ValueError(f"invalid value for 'kv_cache_mb': {kv_cache_mb} must be > 0")
            kv_bytes = int(kv_cache_mb * 2**20)
        fraction = _check_float("gpu_memory_fraction", gpu_memory_fraction)
        model = Path(path) if path is not None else pull()
        self._native = _core.Engine(
            str(model),
            context_length=context_length,
            kv_cache_dtype=kv_cache_dtype,
            max_sequences=max_sequences,
            max_queue=max_queue,
            kv_cache_bytes=kv_bytes,
            max_batch_tokens=max_batch_tokens,
            device=device,
            gpu_memory_fraction=fraction,
            cpu_kernels=cpu_kernels,
            chat_template=chat_template,
        )
        self.metadata: dict[str, Any] = json.loads(self._native.info_json())

    @property
    def device(self) -> str:
        """Where the model runs: ``"cpu"`` or ``"cuda:N"``."""
        name: str = self.metadata["device"]
        return name

    def gpu_memory(self) -> tuple[int, int] | None:
        """``(used, total)`` bytes of the engine's GPU, every process's use as its
        driver reports it; None on the CPU."""
        return self._native.gpu_memory()

    @property
    def model_name(self) -> str:
        name: str = self.metadata["name"]
        return name

    @property
    def context_length(self) -> int:
        """The longest prompt plus completion this engine serves."""
        n: int = self.metadata["context_length"]
        return n

    @property
    def limits(self) -> dict[str, Any]:
        """``max_sequences``, ``max_queue``, ``max_batch_tokens``, ``kv_cache_tokens``
        (= ``kv_blocks`` x ``kv_block_size``), ``kv_bytes_per_token``, ``kv_bytes`` (the
        whole cache) and ``kv_window``: where some layers attend within a sliding
        window, ``{"window", "blocks", "layers"}`` of their own pool (the ``kv_blocks``
        are then the other layers'), else None."""
        limits: dict[str, Any] = self.metadata["limits"]
        return limits

    def stats(self) -> dict[str, int]:
        """Now: ``running`` and ``waiting`` requests, ``finished`` so far,
        ``kv_blocks_used`` (held by sequences; ``kv_window_blocks_used`` in the windowed
        layers' pool) and ``kv_used_tokens`` (positions filled);
        since the start: ``prefix_query_tokens`` and ``prefix_hit_tokens`` (prompt
        positions looked up in the prefix cache, and found) and ``preemptions``."""
        return self._native.stats()

    # Text ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids for ``text``; special tokens written in it are recognised. With
        ``add_bos``, the BOS token the model asks for (``add_bos_token`` in its file)
        starts the ids unless the text already starts with it."""
        return self._native.tokenize(text, add_bos)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._native.detokenize(list(token_ids), skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for ``messages``; ``chat_template_kwargs`` are more variables
        for the template (e.g. ``{"enable_thinking": False}``), as transformers' keyword
        arguments are; they never replace ``messages``, ``bos_token`` and the like."""
        kwargs = None
        if chat_template_kwargs is not None:
            if not isinstance(chat_template_kwargs, Mapping):
                raise ValueError("invalid value for 'chat_template_kwargs': must be a mapping")
            try:
                kwargs = json.dumps(dict(chat_template_kwargs))
            except (TypeError, ValueError) as e:
                raise ValueError(f"invalid value for 'chat_template_kwargs': {e}") from None
        return self._native.apply_chat_template(
            _messages_json(messages), add_generation_prompt, kwargs
        )

    def prompt_ids(
        self,
        prompt: str | Sequence[Message],
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The token ids the engine is fed for ``prompt``: raw text is tokenized as it
        is, chat messages go through the model's chat template first; either starts
        with BOS where the model asks for it (never twice)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("invalid value for 'prompt': must not be empty")
            return self.tokenize(prompt, add_bos=True)
        text = self.apply_chat_template(prompt, chat_template_kwargs=chat_template_kwargs)
        return self.tokenize(text, add_bos=True)

    def _token_logprob(
        self, token_id: int, logprob: float, top: list[tuple[int, float]]
    ) -> TokenLogprob:
        text = self._native.detokenize
        return TokenLogprob(
            token=text([token_id], False),
            token_id=token_id,
            logprob=logprob,
            top_logprobs=[TopLogprob(text([t], False), t, lp) for t, lp in top],
        )

    # Generation -------------------------------------------------------------------

    def plan_chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        response_format: Mapping[str, Any] | type | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatPlan:
        """What a chat request runs as: its prompt, the grammar its reply is held to
        (tool calls that must happen, a response format after any thought) and,
        through ``plan.parser()``, how its reply's text splits into ``content``,
        ``reasoning_content`` and ``tool_calls`` (see `zse.chat`)."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError("invalid value for 'messages': must be a list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"invalid value for 'messages[{i}]': must be an object")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise ValueError("invalid value for 'chat_template_kwargs': must be a mapping")
        fmt = None if response_format is None else _response_format(response_format)
        return ChatPlan.make(
            self,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=bool(parallel_tool_calls),
            response_format=fmt,
            chat_template_kwargs=chat_template_kwargs,
        )

    def _prompt_and_request(
        self, prompt: str | Sequence[Message], sampling: dict[str, Any]
    ) -> tuple[list[int], _Request, ChatPlan | None]:
        """The prompt's ids, the checked generation arguments and, for a chat, its
        plan (tools, ``chat_template_kwargs`` and the response format go there)."""
        if isinstance(prompt, str):
            return self.prompt_ids(prompt), _sampling(**sampling), None
        chat = {
            k: sampling.pop(k)
            for k in (
                "tools",
                "tool_choice",
                "parallel_tool_calls",
                "response_format",
                "chat_template_kwargs",
            )
            if k in sampling
        }
        plan = self.plan_chat(prompt, **chat)
        request = _sampling(**sampling, response_format=plan.response_format)
        return plan.prompt_ids, request, plan

    def _submit(self, prompt: str | Sequence[Message], sampling: dict[str, Any]) -> TextStream:
        ids, request, plan = self._prompt_and_request(prompt, sampling)
        [native] = self._native.submit(ids, **request.kwargs)
        return TextStream(native, _Collector(self, request.want_logprobs, plan))

    def stream(self, prompt: str | Sequence[Message], **sampling: Any) -> TextStream:
        """Text deltas as they are generated; ``prompt`` is raw text or chat messages.
        The deltas are the raw text, tool-call markup and thought included
        (``engine.plan_chat(...).parser()`` splits them as they come); the stream's
        ``completion`` is split as `chat`'s is."""
        return self._submit(prompt, sampling)

    def generate(self, prompt: str, **sampling: Any) -> Completion:
        """Completes raw ``prompt`` text (no chat template)."""
        if not isinstance(prompt, str):
            raise ValueError("invalid value for 'prompt': must be a string")
        return _drain(self._submit(prompt, sampling))

    def chat(self, messages: Sequence[Message], **sampling: Any) -> Completion:
        """Answers a chat: messages are OpenAI's dicts (``role``, ``content``, and
        ``tool_calls`` / ``tool_call_id``). Besides the sampling keywords: ``tools``,
        ``tool_choice``, ``parallel_tool_calls`` (as OpenAI's), ``response_format``
        and ``chat_template_kwargs``. The reply's ``content``, ``tool_calls`` and
        ``reasoning_content`` are split out of its ``text``."""
        if isinstance(messages, str):
            raise ValueError("invalid value for 'messages': must be a list of messages")
        return _drain(self._submit(messages, sampling))

    def astream(self, prompt: str | Sequence[Message], **sampling: Any) -> AsyncTextStream:
        """Async iterator of text deltas (call inside a running event loop)."""
        ids, request, plan = self._prompt_and_request(prompt, sampling)
        [stream] = _submit_async(AsyncTextStream, self, request, ids, 1)
        stream._collector.plan = plan  # its completion splits as chat()'s does
        return stream

    def astream_deltas(self, prompt_ids: Sequence[int], **sampling: Any) -> AsyncDeltaStream:
        """Async iterator of `Delta` values for a tokenized prompt: text, token ids,
        log-probabilities and, at the end, the finish reason and usage (what a server
        needs). Call inside a running event loop."""
        [stream] = self.astream_choices(prompt_ids, 1, **sampling)
        return stream

    def astream_choices(
        self, prompt_ids: Sequence[int], n: int, **sampling: Any
    ) -> list[AsyncDeltaStream]:
        """``n`` choices for one prompt (OpenAI's ``n``), one `AsyncDeltaStream` each.
        The prompt is computed once and its cache shared; with a ``seed``, choice ``i``
        samples with ``seed + i``."""
        if isinstance(prompt_ids, (str, bytes)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids
        ):
            raise ValueError("invalid value for 'prompt_ids': must be a list of token ids")
        _check_int("n", n, 1)
        return _submit_async(AsyncDeltaStream, self, _sampling(**sampling), list(prompt_ids), n)

    async def agenerate(self, prompt: str, **sampling: Any) -> Completion:
        if not isinstance(prompt, str):
            raise ValueError("invalid value for 'prompt': must be a string")
        return await _adrain(self.astream(prompt, **sampling))

    async def achat(self, messages: Sequence[Message], **sampling: Any) -> Completion:
        if isinstance(messages, str):
            raise ValueError("invalid value for 'messages': must be a list of messages")
        return await _adrain(self.astream(messages, **sampling))

    def score(self, token_ids: Sequence[int], *, top: int = 10) -> list[list[tuple[int, float]]]:
        """For every position of ``token_ids``, the ``top`` most likely next tokens
        with their log-probabilities (teacher forcing)."""
        _check_int("top", top, 1)
        return self._native.score(list(token_ids), top)

    def close(self) -> None:
        """Stops the engine thread; requests still running end as cancelled."""
        self._native.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _messages_json(messages: Sequence[Message]) -> str:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("invalid value for 'messages': must be a list of messages")
    try:
        return json.dumps(list(messages))
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid value for 'messages': {e}") from None


def _drain(stream: TextStream) -> Completion:
    for _ in stream:
        pass
    assert stream.completion is not None
    return stream.completion


async def _adrain(stream: AsyncTextStream) -> Completion:
    async for _ in stream:
        pass
    assert stream.completion is not None
    return stream.completion

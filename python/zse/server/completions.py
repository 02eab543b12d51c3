"""``POST /v1/chat/completions`` and the legacy ``POST /v1/completions``: requests to
prompts, and engine deltas to OpenAI's response and server-sent-event shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..engine import TokenLogprob
from .context import Ctx, ServerContext
from .errors import ERROR_RESPONSES, APIError, from_engine, invalid
from .generation import Choice, ClientDisconnected, Generation, error_for
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionRequest,
    LegacyLogprobs,
    TextCompletion,
    TokenLogprobInfo,
    TopLogprobInfo,
    UsageInfo,
)

router = APIRouter()

#: nginx's status for "the client closed the request"; only seen in metrics and logs.
CLIENT_CLOSED = 499
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=ERROR_RESPONSES,
    summary="Create a chat completion (SSE stream with stream=true)",
)
async def chat_completions(body: ChatCompletionRequest, request: Request, ctx: Ctx) -> Any:
    model = ctx.served_model(body.model)
    if len(body.messages) > ctx.config.max_messages:
        raise APIError(
            400,
            f"too many messages: {len(body.messages)} (at most {ctx.config.max_messages})",
            param="messages",
            code="too_many_messages",
        )
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    try:
        prompt = ctx.engine.prompt_ids(messages, chat_template_kwargs=body.chat_template_kwargs)
    except ValueError as e:  # the chat template refused the conversation
        raise from_engine(e, "messages") from None
    gen = Generation.start(ctx, [prompt], body.engine_sampling(), body.n, "messages", request)
    reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", model)
    if body.stream:
        return _sse(_chat_events(gen, reply, body.include_usage))
    choices = await _collect(gen, request)
    if choices is None:
        return Response(status_code=CLIENT_CLOSED)
    return ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(c.text)),
                logprobs=ChoiceLogprobs(content=[_chat_logprob(t) for t in c.logprobs])
                if body.logprobs
                else None,
                finish_reason=c.finish_reason or "stop",
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(gen),
    )


@router.post(
    "/v1/completions",
    response_model=TextCompletion,
    responses=ERROR_RESPONSES,
    summary="Create a text completion (legacy; SSE stream with stream=true)",
)
async def completions(body: CompletionRequest, request: Request, ctx: Ctx) -> Any:
    model = ctx.served_model(body.model)
    if body.echo and body.logprobs is not None:
        raise invalid("echo together with logprobs is not supported", param="echo")
    prompts = _legacy_prompts(ctx, body.prompt)
    echo = [ctx.engine.detokenize(p) if body.echo else "" for p in prompts]
    gen = Generation.start(ctx, prompts, body.engine_sampling(), body.n, "prompt", request)
    reply = _Reply(f"cmpl-{uuid.uuid4().hex}", model)
    if body.stream:
        return _sse(_completion_events(gen, reply, body, echo))
    choices = await _collect(gen, request)
    if choices is None:
        return Response(status_code=CLIENT_CLOSED)
    return TextCompletion(
        id=reply.id,
        created=reply.created,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=echo[i // body.n] + "".join(c.text),
                logprobs=_legacy_logprobs(c.logprobs, 0) if body.logprobs is not None else None,
                finish_reason=c.finish_reason or "stop",
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(gen),
    )


async def _collect(gen: Generation, request: Request) -> list[Choice] | None:
    """Every choice's whole answer, or None if the client went away first."""
    async with gen:
        try:
            return await gen.collect(request)
        except ClientDisconnected:
            return None


def _legacy_prompts(
    ctx: ServerContext, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    """The legacy ``prompt``: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        items: Sequence[str | list[int]] = [prompt]
    elif all(isinstance(t, int) for t in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = prompt  # type: ignore[assignment]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid("invalid value for 'prompt': must not be empty", param="prompt")
            out.append(ctx.engine.prompt_ids(item))
        elif not item:
            raise invalid(f"invalid value for 'prompt[{i}]': no token ids", param="prompt")
        else:
            out.append(list(item))
    return out


class _Reply:
    """The id, timestamp and model every chunk of one response repeats."""

    def __init__(self, id: str, model: str) -> None:
        self.id = id
        self.model = model
        self.created = int(time.time())

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def _usage(gen: Generation) -> UsageInfo:
    u = gen.usage
    return UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _chat_logprob(t: TokenLogprob) -> TokenLogprobInfo:
    return TokenLogprobInfo(
        token=t.token,
        logprob=t.logprob,
        bytes=_token_bytes(t.token),
        top_logprobs=[
            TopLogprobInfo(token=a.token, logprob=a.logprob, bytes=_token_bytes(a.token))
            for a in t.top_logprobs
        ],
    )


def _legacy_logprobs(tokens: list[TokenLogprob], offset: int) -> LegacyLogprobs:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return LegacyLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{a.token: a.logprob for a in t.top_logprobs} for t in tokens],
        text_offset=offsets,
    )


# Streaming ---------------------------------------------------------------------------


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


async def _events(
    gen: Generation,
    first: Callable[[int], dict[str, Any] | None],
    chunk: Callable[[int, Any], dict[str, Any] | None],
    usage_head: dict[str, Any] | None,
) -> AsyncIterator[str]:
    """The SSE frames of a generation: an optional opening chunk per choice, one chunk
    per delta with something in it, the usage chunk if asked, then ``[DONE]``. An
    error after the stream began becomes an error event; leaving early (the client
    disconnected) cancels the generation."""
    async with gen:
        try:
            for i in range(len(gen.streams)):
                opening = first(i)
                if opening is not None:
                    yield _data(opening)
            async for i, d in gen.deltas():
                gen.check(d)
                body = chunk(i, d)
                if body is not None:
                    yield _data(body)
            if usage_head is not None:
                yield _data({**usage_head, "choices": [], "usage": _usage(gen).model_dump()})
        except Exception as e:
            yield error_for(e).sse_event()
        yield DONE


def _chat_events(gen: Generation, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    head = reply.head("chat.completion.chunk")

    def frame(i: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**head, "choices": [{**choice, **extra}]}

    def first(i: int) -> dict[str, Any]:
        return frame(i, {"role": "assistant", "content": ""})

    def chunk(i: int, d: Any) -> dict[str, Any] | None:
        if not d.text and d.finish_reason is None and not d.logprobs:
            return None  # a token still held back (a possible stop string)
        extra: dict[str, Any] = {"finish_reason": d.finish_reason}
        if d.logprobs:
            extra["logprobs"] = {"content": [_chat_logprob(t).model_dump() for t in d.logprobs]}
        return frame(i, {"content": d.text} if d.text else {}, **extra)

    return _events(gen, first, chunk, head if include_usage else None)


def _completion_events(
    gen: Generation, reply: _Reply, body: CompletionRequest, echo: list[str]
) -> AsyncIterator[str]:
    head = reply.head("text_completion")
    offsets = [len(echo[i // body.n]) for i in range(len(gen.streams))]

    def frame(i: int, text: str, **extra: Any) -> dict[str, Any]:
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
        return {**head, "choices": [{**choice, **extra}]}

    def first(i: int) -> dict[str, Any] | None:
        return frame(i, echo[i // body.n]) if body.echo else None

    def chunk(i: int, d: Any) -> dict[str, Any] | None:
        if not d.text and d.finish_reason is None and not d.logprobs:
            return None
        extra: dict[str, Any] = {"finish_reason": d.finish_reason}
        if body.logprobs is not None and d.logprobs:
            extra["logprobs"] = _legacy_logprobs(d.logprobs, offsets[i]).model_dump()
        offsets[i] += len(d.text)
        return frame(i, d.text, **extra)

    return _events(gen, first, chunk, head if body.include_usage else None)

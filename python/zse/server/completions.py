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

from ..chat import ChatPlan, ReplyDelta, ReplyParser
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
    ToolCallFunction,
    ToolCallInfo,
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
    sampling = body.engine_sampling()
    try:
        plan = ctx.engine.plan_chat(
            [m.engine_message() for m in body.messages],
            tools=body.tools,
            tool_choice=body.tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            response_format=sampling.pop("response_format", None),
            chat_template_kwargs=body.chat_template_kwargs,
        )
    except ValueError as e:  # a tool field, or the chat template refused the conversation
        raise from_engine(e, "messages") from None
    sampling["response_format"] = plan.response_format
    gen = Generation.start(ctx, [plan.prompt_ids], sampling, body.n, "messages", request)
    reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", model)
    if body.stream:
        return _sse(_chat_events(gen, reply, plan, body.include_usage))
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
                message=_message(plan, "".join(c.text)),
                logprobs=ChoiceLogprobs(content=[_chat_logprob(t) for t in c.logprobs])
                if body.logprobs
                else None,
                finish_reason=_chat_finish(c.finish_reason or "stop", plan.family is not None),
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(gen),
    )


def _message(plan: ChatPlan, text: str) -> AssistantMessage:
    """A whole reply as the assistant's message: thought, answer and calls apart."""
    parser = plan.parser()
    parser.feed(text)
    parser.finish()
    calls = [
        ToolCallInfo(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments))
        for c in parser.tool_calls
    ]
    return AssistantMessage(
        content=parser.content if parser.content or not calls else None,
        reasoning_content=parser.reasoning if plan.thinking != "no" else None,
        tool_calls=calls or None,
    )


def _chat_finish(reason: str, called: bool) -> str:
    """OpenAI's ``tool_calls`` for a reply that ended by calling tools."""
    return "tool_calls" if called and reason == "stop" else reason


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


def _chat_events(
    gen: Generation, reply: _Reply, plan: ChatPlan, include_usage: bool
) -> AsyncIterator[str]:
    head = reply.head("chat.completion.chunk")
    parsers: list[ReplyParser] = [plan.parser() for _ in gen.streams]
    called = [False] * len(gen.streams)

    def frame(i: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**head, "choices": [{**choice, **extra}]}

    def first(i: int) -> dict[str, Any]:
        return frame(i, {"role": "assistant", "content": ""})

    def chunk(i: int, d: Any) -> dict[str, Any] | None:
        part = parsers[i].feed(d.text)
        if d.finish_reason is not None:
            part.add(parsers[i].finish())
        called[i] = called[i] or bool(part.tool_calls)
        if not part and d.finish_reason is None and not d.logprobs:
            return None  # text still held back (a possible stop string or marker)
        extra: dict[str, Any] = {"finish_reason": None}
        if d.finish_reason is not None:
            extra["finish_reason"] = _chat_finish(d.finish_reason, called[i])
        if d.logprobs:
            extra["logprobs"] = {"content": [_chat_logprob(t).model_dump() for t in d.logprobs]}
        return frame(i, _delta(part), **extra)

    return _events(gen, first, chunk, head if include_usage else None)


def _delta(part: ReplyDelta) -> dict[str, Any]:
    """A stream chunk's ``delta``: a call's first piece has its id, type and name,
    later ones pieces of its arguments."""
    delta: dict[str, Any] = {}
    if part.reasoning:
        delta["reasoning_content"] = part.reasoning
    if part.content:
        delta["content"] = part.content
    if part.tool_calls:
        calls = []
        for c in part.tool_calls:
            call: dict[str, Any] = {"index": c.index}
            if c.id is not None:
                call.update(id=c.id, type="function")
                call["function"] = {"name": c.name, "arguments": c.arguments}
            else:
                call["function"] = {"arguments": c.arguments}
            calls.append(call)
        delta["tool_calls"] = calls
    return delta


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

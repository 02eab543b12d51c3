"""`zse serve` over raw HTTP: the SSE bytes, every error status and shape, API keys,
`/health`, `/metrics`, `/docs`, client disconnects, a full queue, shutdown on a
signal, and the curl examples of the REST reference run as written."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zse
from conftest import ROOT
from serving import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
REST_REFERENCE = ROOT.parent / "shared" / "REST-API.md"
EOS = 2


def chat_body(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    body.update(kw)
    return body


def endless(**kw: Any) -> dict[str, Any]:
    """A request that keeps generating (EOS banned) until cancelled."""
    return chat_body(max_tokens=4000, logit_bias={str(EOS): -100}, **kw)


@pytest.fixture(scope="module")
def server(default_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess(default_model) as s:
        yield s


# Most of the REST reference's examples set no max_tokens; a short context bounds their
# answers without changing the commands. It leaves room for the one that asks for 256
# tokens (more than the room left is a 400, as OpenAI answers).
SHORT_CONTEXT = ("--context-length", "384")


@pytest.fixture(scope="module")
def keyed(default_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess(
        default_model,
        "--api-key",
        "sk-your-secret-key",
        "--api-key",
        "sk-second",
        *SHORT_CONTEXT,
        env={"ZSE_API_KEY": "ignored-when-flags-given"},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def short_context(default_model: Path) -> Iterator[ServerProcess]:
    with ServerProcess(default_model, *SHORT_CONTEXT, "--threads", "1") as s:
        yield s


def sse_events(raw: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing on the way."""
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event[len("data: ") :])
    return payloads


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


# Streaming bytes -----------------------------------------------------------------------


def test_sse_bytes(server: ServerProcess) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    payloads = sse_events(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("length") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    whole = httpx.post(server.url("/v1/chat/completions"), json=chat_body(), timeout=60).json()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"]


# Errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "default"}, "messages"),
        (chat_body(temperature=2.5), "temperature"),
        (chat_body(top_p=1.5), "top_p"),
        (chat_body(max_tokens=0), "max_tokens"),
        (chat_body(n=0), "n"),
        (chat_body(presence_penalty=3), "presence_penalty"),
        (chat_body(frequency_penalty=-3), "frequency_penalty"),
        (chat_body(top_logprobs=3), "top_logprobs"),
        (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat_body(logit_bias={"not-a-token": 1}), "logit_bias"),
        (chat_body(logit_bias={"99999999": 1}), "logit_bias"),
        (chat_body(messages=[]), "messages"),
        (chat_body(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
        (
            chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[0].content",
        ),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    err = error_of(httpx.post(server.url("/v1/chat/completions"), json=body, timeout=30), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("field", "value", "param", "says"),
    [
        # OpenAI's deprecated form of tools: refused, never ignored.
        ("functions", [TOOL["function"]], "functions", "not supported; use tools"),
        ("function_call", "auto", "function_call", "not supported; use tool_choice"),
        # A call asked for with no tools to call.
        ("tool_choice", "required", "tool_choice", "no tools"),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}, "tool_choice", "no tools"),
    ],
)
def test_tool_fields_that_cannot_be_served_are_400_not_ignored(
    server: ServerProcess, field: str, value: object, param: str, says: str
) -> None:
    err = error_of(
        httpx.post(server.url("/v1/chat/completions"), json=chat_body(**{field: value})), 400
    )
    assert err["param"] == param and says in err["message"], err


def test_fields_that_ask_for_nothing_new_are_accepted(server: ServerProcess) -> None:
    body = chat_body(tools=[], tool_choice="none", response_format={"type": "text"})
    assert httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60).status_code == 200
    legacy = {"model": "default", "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(server.url("/v1/completions"), json={**legacy, "response_format": {"type": "x"}})
    assert error_of(r, 400)["param"] == "response_format.type"


def test_bad_json_unknown_fields_and_routes(server: ServerProcess) -> None:
    r = httpx.post(
        server.url("/v1/chat/completions"),
        content=b'{"model": "default", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert "JSON" in error_of(r, 400)["message"]
    ok = httpx.post(
        server.url("/v1/chat/completions"), json=chat_body(unknown_field=1, tools_x=[]), timeout=60
    )
    assert ok.status_code == 200
    assert error_of(httpx.get(server.url("/v2/nothing")), 404)["code"] == "not_found"
    assert error_of(httpx.delete(server.url("/v1/models")), 405)
    err = error_of(httpx.post(server.url("/v1/chat/completions"), json=chat_body(model="x")), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_prompt_over_the_context_is_400_with_both_numbers(server: ServerProcess) -> None:
    body = chat_body(messages=[{"role": "user", "content": "word " * 9000}])
    err = error_of(httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60), 400)
    assert err["code"] == "context_length_exceeded"
    numbers = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert 8192 in numbers and any(n > 8192 for n in numbers)
    legacy = httpx.post(
        server.url("/v1/completions"), json={"model": "default", "prompt": "word " * 9000}
    )
    assert error_of(legacy, 400)["param"] == "prompt"


def test_body_too_large_is_413(server: ServerProcess) -> None:
    big = chat_body(messages=[{"role": "user", "content": "x" * (5 * 2**20)}])
    err = error_of(httpx.post(server.url("/v1/chat/completions"), json=big, timeout=60), 413)
    assert err["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"model": "default", "messages": [{"role": "user", "content": "'
        for _ in range(5 * 16):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(
        server.url("/v1/chat/completions"),
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert error_of(r, 413)["code"] == "request_too_large"


# Keys ------------------------------------------------------------------------------------


def test_api_key(keyed: ServerProcess) -> None:
    url = keyed.url("/v1/chat/completions")
    good = {"Authorization": "Bearer sk-second"}
    for headers in (
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": "sk-second"},
        {"Authorization": "Bearer ignored-when-flags-given"},
    ):
        err = error_of(httpx.post(url, json=chat_body(), headers=headers), 401)
        assert err["code"] == "invalid_api_key"
        err = error_of(httpx.post(url, json=chat_body(stream=True), headers=headers), 401)
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json", "/v1/nothing"):
            error_of(httpx.get(keyed.url(path), headers=headers), 401)
    assert httpx.post(url, json=chat_body(), headers=good, timeout=60).status_code == 200
    assert httpx.get(keyed.url("/v1/models"), headers=good).status_code == 200
    assert httpx.get(keyed.url("/metrics"), headers=good).status_code == 200
    # /health is open, for load balancers.
    assert httpx.get(keyed.url("/health")).json()["status"] == "healthy"
    assert re.search(r"API key +required", keyed.log())


def test_api_key_from_the_environment(default_model: Path) -> None:
    with ServerProcess(default_model, env={"ZSE_API_KEY": "sk-env"}) as s:
        assert httpx.get(s.url("/v1/models")).status_code == 401
        headers = {"Authorization": "Bearer sk-env"}
        assert httpx.get(s.url("/v1/models"), headers=headers).status_code == 200


# Health, metrics, docs ---------------------------------------------------------------------


def test_banner(short_context: ServerProcess) -> None:
    banner = short_context.log()
    assert re.search(rf"URL +http://127\.0\.0\.1:{short_context.port}/v1", banner)
    assert re.search(r"context +384 tokens", banner)
    assert re.search(r"architecture +llama\n", banner)
    assert re.search(r"threads +1\n", banner)
    assert re.search(r"KV cache +\d+ MiB", banner)
    assert "WARNING" not in banner  # every SmolLM2 matrix has a ZSE kernel
    assert re.search(r"API key +not required", banner)
    assert re.search(rf"model +{MODEL} ", banner)


def test_health(server: ServerProcess) -> None:
    h = server.health()
    assert h["status"] == "healthy" and h["model"] == MODEL
    # This build and machine have no GPU: the REST reference's GPU fields say so.
    assert h["device"] == "cpu" and h["gpu_memory_used"] is h["gpu_memory_total"] is None
    for key in ("process_memory_used", "system_memory_used", "system_memory_total"):
        assert re.fullmatch(r"\d+(\.\d)? (B|KB|MB|GB)", str(h[key])), h[key]
    assert re.fullmatch(r"(\d+d )?(\d+h )?\d+m( \d+s)?", str(h["uptime"]))
    engine = h["engine"]
    assert isinstance(engine, dict)
    assert {
        "running_sequences",
        "waiting_requests",
        "kv_cache_blocks_used",
        "kv_cache_blocks_total",
        "kv_cache_capacity_tokens",
        "prefix_cache_hit_tokens",
    } <= set(engine)


def test_metrics(server: ServerProcess) -> None:
    httpx.post(server.url("/v1/chat/completions"), json=chat_body(), timeout=60)
    httpx.post(server.url("/v1/chat/completions"), json=chat_body(temperature=9), timeout=60)
    r = httpx.get(server.url("/metrics"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert m, f"{name} missing"
        return float(m.group(1))

    assert value('zse_http_requests_total{route="/v1/chat/completions",status="200"}') >= 1
    assert value('zse_http_requests_total{route="/v1/chat/completions",status="400"}') >= 1
    assert value("zse_prompt_tokens_total") > 0
    assert value("zse_generation_tokens_total") >= 8
    assert value("zse_time_to_first_token_seconds_count") >= 1
    assert value("zse_inter_token_latency_seconds_count") >= 7
    assert value("zse_running_sequences") == 0
    assert value("zse_waiting_requests") == 0
    assert value("zse_kv_cache_usage_ratio") == 0
    # The same prompt twice: its full blocks come from the prefix cache the second time.
    hits = value("zse_prefix_cache_hit_tokens_total")
    httpx.post(server.url("/v1/chat/completions"), json=chat_body(), timeout=60)
    text = httpx.get(server.url("/metrics")).text
    assert value("zse_prefix_cache_hit_tokens_total") > hits
    assert value("zse_prefix_cache_query_tokens_total") >= value(
        "zse_prefix_cache_hit_tokens_total"
    )
    assert value("zse_preemptions_total") == 0


def test_docs_and_openapi(server: ServerProcess) -> None:
    spec = httpx.get(server.url("/openapi.json")).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(
        spec["paths"]
    )
    docs = httpx.get(server.url("/docs"))
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# Disconnects, overload, shutdown ----------------------------------------------------------


def test_streaming_client_disconnect_cancels_generation(server: ServerProcess) -> None:
    body = endless(stream=True)
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.health()["engine"]["running_sequences"] == 1  # type: ignore[index]
    # 4000 tokens would take minutes: the sequence must be gone at once.
    assert server.wait_idle(timeout=5)


def test_waiting_client_disconnect_cancels_generation(server: ServerProcess) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url("/v1/chat/completions"), json=endless(), timeout=1.5)
    assert server.wait_idle(timeout=5)


def test_full_queue_is_503_with_retry_after(default_model: Path) -> None:
    with ServerProcess(default_model, "--max-seqs", "1", "--max-queue", "1") as s:
        url = s.url("/v1/chat/completions")
        with (
            httpx.stream("POST", url, json=endless(stream=True), timeout=60) as first,
            httpx.stream("POST", url, json=endless(stream=True), timeout=60) as second,
        ):
            assert first.status_code == second.status_code == 200
            deadline = time.monotonic() + 10
            while s.health()["engine"]["waiting_requests"] != 1:  # type: ignore[index]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = httpx.post(url, json=chat_body(), timeout=30)
            err = error_of(r, 503)
            assert err["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
            assert s.health()["status"] == "healthy"
        assert s.wait_idle(timeout=5)
        assert httpx.post(url, json=chat_body(), timeout=60).status_code == 200


def test_a_request_that_makes_the_engine_fail_fails_alone(
    default_model: Path, engine: zse.Engine
) -> None:
    """The engine is made to fail (a panic) on any batch holding one token: the
    request with it gets a 500, the stream computed beside it goes on unchanged, and
    the server keeps serving."""
    fault = engine.tokenize(" giraffe")[-1]
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 120}
    body |= {"temperature": 0, "logit_bias": {str(EOS): -100}}
    with ServerProcess(default_model, env={"ZSE_FAULT_TOKEN": str(fault)}) as s:
        url = s.url("/v1/completions")
        expected = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        streamed: list[str] = []

        def consume() -> None:
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
                streamed.append(r.read().decode())

        survivor = threading.Thread(target=consume)
        survivor.start()
        deadline = time.monotonic() + 10
        while s.health()["engine"]["running_sequences"] != 1:  # type: ignore[index]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        poisoned = {**body, "prompt": engine.tokenize("A giraffe"), "max_tokens": 4}
        err = error_of(httpx.post(url, json=poisoned, timeout=60), 500)
        assert err["type"] == "server_error" and "giraffe" not in err["message"]
        survivor.join(60)
        chunks = [json.loads(p) for p in sse_events(streamed[0])[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "fault injected" in s.log()
        assert f"WARNING: ZSE_FAULT_TOKEN={fault} is set" in s.log()
        assert httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"] == expected
        assert s.wait_idle(timeout=5) and s.health()["status"] == "healthy"


def test_sigterm_drains_then_cancels_and_exits_0(default_model: Path) -> None:
    with ServerProcess(default_model, "--grace", "3") as s:
        url = s.url("/v1/chat/completions")
        results: dict[str, str] = {}

        def consume(name: str, body: dict[str, Any]) -> None:
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                results[name] = "".join(r.iter_text())

        short = threading.Thread(
            target=consume, args=("short", chat_body(max_tokens=30, stream=True))
        )
        long = threading.Thread(target=consume, args=("long", endless(stream=True)))
        long.start()
        short.start()
        deadline = time.monotonic() + 10
        while s.health()["engine"]["running_sequences"] != 2:  # type: ignore[index]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url("/health"), timeout=2)  # no longer accepting
        assert s.proc.wait(30) == 0
        elapsed = time.monotonic() - t0
        short.join(5)
        long.join(5)
    # The short request finished normally within the grace period...
    short_chunks = [json.loads(p) for p in sse_events(results["short"])[:-1]]
    assert short_chunks[-1]["choices"][0]["finish_reason"] == "length"
    # ...the endless one was cancelled when it ran out, and told so.
    long_events = sse_events(results["long"])
    assert json.loads(long_events[-2])["error"]["code"] == "server_shutting_down"
    assert 3 <= elapsed < 20


# The REST reference's curl examples, as written ------------------------------------------


def curl_examples() -> list[str]:
    """Every ``curl`` command of REST-API.md, joined across its continuation lines."""
    lines = REST_REFERENCE.read_text().splitlines()
    commands, current = [], ""
    for line in lines:
        if not current and not line.startswith("curl "):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line + "\n"
        if not line.endswith("\\") and current.count("'") % 2 == 0:
            commands.append(current.strip())
            current = ""
    return commands


def test_rest_reference_curl_examples(short_context: ServerProcess, keyed: ServerProcess) -> None:
    examples = curl_examples()
    assert len(examples) == 5, examples
    for cmd in examples:
        target = keyed if "Authorization" in cmd else short_context
        # Only the address changes: the examples assume port 8000.
        run = cmd.replace("http://localhost:8000", target.base)
        out = subprocess.run(
            ["bash", "-c", run], capture_output=True, text=True, timeout=300, check=True
        ).stdout
        assert out, f"no output from: {shlex.quote(cmd)}"
        if '"stream": true' in cmd:
            chunks = [json.loads(p) for p in sse_events(out)[:-1]]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        elif "/chat/completions" in cmd:
            body = json.loads(out)
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["role"] == "assistant"
            assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        elif "/v1/models" in cmd:
            body = json.loads(out)
            assert body["object"] == "list" and body["data"][0]["owned_by"] == "zse"
        else:
            assert json.loads(out)["status"] == "healthy"

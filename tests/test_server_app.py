"""The ASGI app in-process (no sockets): what only a fault inside the server shows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import zse
from fastapi.testclient import TestClient
from zse.server import ServerConfig, create_app


def test_a_bug_is_a_500_without_its_detail(
    engine: zse.Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> list[int]:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "plan_chat", broken)
    client = TestClient(
        create_app(engine, ServerConfig(model_name="m")), raise_server_exceptions=False
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with caplog.at_level(logging.ERROR, logger="zse.server"):
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "secret" not in r.text
    assert "secret internal detail" in caplog.text
    # The server goes on: the other routes still answer.
    assert client.get("/health").json()["status"] == "healthy"


# A template that reacts to a variable of the request's own, as Qwen3's does to
# `enable_thinking`; everything else as ChatML.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}SKIP THINKING\n{% endif %}"
    "{% endif %}"
)


def test_chat_template_kwargs_reach_the_template(qwen_tiny: Path) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    with zse.Engine(qwen_tiny, chat_template=THINKING_TEMPLATE) as engine:
        plain = engine.apply_chat_template(hi)
        off = engine.apply_chat_template(hi, chat_template_kwargs={"enable_thinking": False})
        assert off == plain + "SKIP THINKING\n"
        # The engine's own variables win over the request's.
        clash = {"messages": [], "add_generation_prompt": False}
        assert engine.apply_chat_template(hi, chat_template_kwargs=clash) == plain
        with pytest.raises(ValueError, match="'chat_template_kwargs'"):
            engine.apply_chat_template(hi, chat_template_kwargs=["enable_thinking"])  # type: ignore[arg-type]
        # Through the engine's generation and through the server: the prompt the
        # model is fed has the extra line (its token count says so).
        extra = len(engine.tokenize("SKIP THINKING\n"))
        done = engine.chat(hi, max_tokens=1, chat_template_kwargs={"enable_thinking": False})
        assert done.usage.prompt_tokens == engine.chat(hi, max_tokens=1).usage.prompt_tokens + extra
        client = TestClient(create_app(engine, ServerConfig(model_name="m")))
        body = {"model": "m", "messages": hi, "max_tokens": 1}
        base = client.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
        body["chat_template_kwargs"] = {"enable_thinking": False}
        r = client.post("/v1/chat/completions", json=body)
        assert r.json()["usage"]["prompt_tokens"] == base + extra
        body["chat_template_kwargs"] = "no"
        assert client.post("/v1/chat/completions", json=body).status_code == 400

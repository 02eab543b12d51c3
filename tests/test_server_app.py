"""The ASGI app in-process (no sockets): what only a fault inside the server shows."""

from __future__ import annotations

import logging

import pytest
import zse
from fastapi.testclient import TestClient
from zse.server import ServerConfig, create_app


def test_a_bug_is_a_500_without_its_detail(
    engine: zse.Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> list[int]:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "prompt_ids", broken)
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

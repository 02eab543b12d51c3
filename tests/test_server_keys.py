"""Managed keys, rate limits, request limits and CORS: the key store and the limiter
on their own, the app in-process over the tiny model, `zse keys`, and a real
`zse serve` whose log must never show a key."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zse
from fastapi.testclient import TestClient
from serving import ServerProcess
from zse.keys import KeyStore
from zse.server import ServerConfig, create_app
from zse.server.ratelimit import Limits, RateLimiter

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_store_keeps_only_salted_hashes_and_knows_each_state(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    record, key = store.create("ci", rpm=5, tpm=100)
    assert key.startswith(record.prefix) and record.name == "ci"
    assert store.verify(key) == (store.get(record.id), "active")
    # Neither the key nor its secret (all after the prefix: the secret's URL-safe
    # base64 may hold underscores itself) is in the file.
    raw = (tmp_path / "keys.db").read_bytes()
    secret = key.removeprefix(record.prefix)
    assert len(secret) == 43
    assert key.encode() not in raw and secret.encode() not in raw
    # A right id with a wrong secret, garbage, an empty string: invalid.
    for bad in (record.prefix + "x" * 43, "sk-nope", "", "zse__"):
        assert store.verify(bad) == (None, "invalid")
    assert store.revoke(record.id)
    assert store.verify(key)[1] == "revoked"
    assert not store.revoke("deadbeef")
    _, short = store.create(expires_in_days=1e-6)
    time.sleep(0.2)
    assert store.verify(short)[1] == "expired"
    with pytest.raises(ValueError, match="rpm"):
        store.create(rpm=0)


def test_limiter_counts_requests_and_tokens_per_minute() -> None:
    lim = RateLimiter(Limits())
    key = Limits(rpm=2, tpm=50)
    first = lim.admit("k", key, now=0.0)
    assert first.allowed and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert lim.admit("k", key, now=1.0).allowed
    third = lim.admit("k", key, now=2.0)
    assert not third.allowed and "requests" in third.reason
    assert third.retry_after_s == pytest.approx(58.0)
    # Another key has its own budget; the first frees up a minute later.
    assert lim.admit("other", key, now=2.0).allowed
    assert lim.admit("k", key, now=60.5).allowed
    lim.record_tokens("k", 50, now=61.0)
    refused = lim.admit("k", key, now=62.0)
    assert not refused.allowed and "tokens" in refused.reason
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # The server-wide limit holds over every key.
    server = RateLimiter(Limits(rpm=1))
    assert server.admit("a", Limits(), now=0.0).allowed
    assert not server.admit("b", Limits(), now=0.5).allowed


@pytest.fixture
def keyed(tiny_engine: zse.Engine, tmp_path: Path) -> tuple[TestClient, KeyStore]:
    db = tmp_path / "keys.db"
    config = ServerConfig(
        model_name="tiny", api_keys=("sk-static",), keys_db=str(db), max_messages=3
    )
    return TestClient(create_app(tiny_engine, config)), KeyStore(db)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_health_refuses_missing_wrong_revoked_and_expired_keys(
    keyed: tuple[TestClient, KeyStore],
) -> None:
    client, store = keyed
    _, revoked = store.create("gone")
    store.revoke(revoked.split("_")[1])
    _, expired = store.create("old", expires_in_days=1e-6)
    time.sleep(0.2)
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/tiny", None),
        ("GET", "/metrics", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2}),
    ]
    cases = [
        ({}, "missing API key"),
        (_auth("sk-wrong"), "invalid API key"),
        (_auth(revoked), "revoked"),
        (_auth(expired), "expired"),
    ]
    for method, path, body in routes:
        for headers, message in cases:
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, message)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and message in err["message"]
            assert r.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200
    # The static key and a live managed key both pass.
    _, live = store.create("live")
    for key in ("sk-static", live):
        assert client.post("/v1/chat/completions", json=CHAT, headers=_auth(key)).status_code == 200


def test_a_revoked_key_is_refused_at_once_by_a_running_server(
    keyed: tuple[TestClient, KeyStore],
) -> None:
    client, store = keyed
    record, key = store.create("soon revoked")
    assert client.get("/v1/models", headers=_auth(key)).status_code == 200
    KeyStore(store.path).revoke(record.id)  # as `zse keys revoke` would, elsewhere
    assert client.get("/v1/models", headers=_auth(key)).status_code == 401


def test_per_key_limits_give_429_with_headers_and_usage_is_counted(
    keyed: tuple[TestClient, KeyStore],
) -> None:
    client, store = keyed
    record, key = store.create("limited", rpm=2)
    for left in ("1", "0"):
        r = client.post("/v1/chat/completions", json=CHAT, headers=_auth(key))
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == left
    r = client.post("/v1/chat/completions", json=CHAT, headers=_auth(key))
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # Listing models does not count against the generation budget.
    assert client.get("/v1/models", headers=_auth(key)).status_code == 200
    # Usage reaches the file (written off the event loop).
    deadline = time.monotonic() + 5
    while (used := store.get(record.id)) is not None and used.requests < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert used is not None and used.tokens > 0 and used.last_used_at is not None


def test_request_limits_and_the_server_wide_rate(tiny_engine: zse.Engine) -> None:
    config = ServerConfig(model_name="tiny", max_messages=2, rate_limit=Limits(rpm=3))
    client = TestClient(create_app(tiny_engine, config))
    many = {**CHAT, "messages": CHAT["messages"] * 3}
    r = client.post("/v1/chat/completions", json=many)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**6})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens"
    assert err["code"] == "context_length_exceeded" and "2048" in err["message"]
    r = client.post("/v1/chat/completions", json={**CHAT, "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    # Three requests so far counted (the refused ones too); the fourth is over.
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-requests"] == "3"


def test_cors_is_off_unless_origins_are_allowed(tiny_engine: zse.Engine) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    off = TestClient(create_app(tiny_engine, ServerConfig(model_name="tiny")))
    r = off.get("/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
    config = ServerConfig(
        model_name="tiny", api_keys=("sk-x",), cors_origins=("https://app.example",)
    )
    on = TestClient(create_app(tiny_engine, config))
    r = on.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = on.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def _zse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zse", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    db = str(tmp_path / "k.db")
    made = _zse(
        "keys", "--db", db, "create", "--name", "ci", "--rpm", "10", "--expires-in-days", "7"
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    key_id = key.split("_")[1]
    assert "not stored" in made.stderr
    listed = _zse("keys", "--db", db, "list")
    assert key_id in listed.stdout and "ci" in listed.stdout and "active" in listed.stdout
    assert key not in listed.stdout
    assert _zse("keys", "--db", db, "revoke", key_id).returncode == 0
    assert "revoked" in _zse("keys", "--db", db, "list").stdout
    missing = _zse("keys", "--db", db, "revoke", "00000000")
    assert missing.returncode == 1 and "no key" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = _zse("keys", "--db", db, "create", "--rpm", "0")
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr
    # The file holds hashes only.
    rows = sqlite3.connect(db).execute("SELECT * FROM keys").fetchall()
    assert len(rows) == 1 and key not in repr(rows)


def test_serve_with_managed_keys_never_logs_a_key(default_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    _, managed = KeyStore(db).create("log check")
    args = ("--api-key", "sk-static-secret", "--keys-db", str(db), "--log-level", "debug")
    with ServerProcess(default_model, *args) as s:
        for key in (managed, "sk-static-secret", "sk-wrong-guess"):
            httpx.get(s.url("/v1/models"), headers=_auth(key), timeout=10)
        r = httpx.post(s.url("/v1/chat/completions"), json=CHAT, headers=_auth(managed), timeout=60)
        assert r.status_code == 200
        assert "API key" in s.log() and "required" in s.log()
        s.stop()
        log = s.log()
    for key in (managed, managed.split("_")[-1], "sk-static-secret", "sk-wrong-guess"):
        assert key not in log

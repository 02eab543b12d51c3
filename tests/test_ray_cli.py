"""`zse serve --ray`, as a user starts it: a local Ray cluster of its own, one
replica, the same API, and SIGTERM taking it all down (after `test_ray.py`, whose
cluster is gone by then)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
from serving import ServerProcess


def test_zse_serve_ray_serves_and_stops_on_sigterm(default_model: Path) -> None:
    with ServerProcess(default_model, "--ray", "--replicas", "1", "--kv-cache-mb", "128") as s:
        body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}
        r = httpx.post(s.url("/v1/chat/completions"), json={**body, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == default_model.stem
        assert r.headers["x-zse-replica"]
        assert s.stop(signal.SIGTERM, timeout=120) == 0
        assert "replicas  1, each 1 CPUs" in s.log()

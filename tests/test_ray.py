"""ZSE replicas on Ray Serve (issue 19), on a local Ray cluster started here: two
SmolLM2 replicas behind one endpoint serve streaming load with hang-ups and lose
nothing; a prompt prefix keeps to one replica; a managed key's rate limit holds
across both; a replica killed mid-load fails only its own requests, each with an
error, and Ray brings it back."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import zse.ray
from ray import serve
from serving import free_port
from zse.keys import KeyStore
from zse.ray import asgi
from zse.ray.router import affinity_key
from zse.server.options import ServeOptions

REPLICA = "x-zse-replica"
LOAD_KEY = "sk-load"
# Longer than the affinity key's characters: requests that share it share a replica.
SYSTEM = "You are a terse assistant for a weather service. " * 8


def test_affinity_keys_follow_the_prompts_first_characters() -> None:
    def key(messages: list[dict[str, Any]]) -> str | None:
        return affinity_key(json.dumps({"messages": messages}).encode())

    long = [{"role": "system", "content": SYSTEM}]
    assert key([*long, {"role": "user", "content": "a"}]) == key(
        [*long, {"role": "user", "content": "b"}]
    )
    short = [{"role": "system", "content": "Be brief."}]
    assert key([*short, {"role": "user", "content": "a"}]) != key(
        [*short, {"role": "user", "content": "b"}]
    )
    # A conversation's later turns keep to its first turn's replica.
    first = [*short, {"role": "user", "content": "a"}]
    later = [*first, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert key(first) == key(later)
    assert affinity_key(b'{"prompt": "Once"}') == affinity_key(b'{"prompt": ["Once", "x"]}')
    for no_prompt in (b"", b"not json", b"[1]", b'{"model": "m"}'):
        assert affinity_key(no_prompt) is None


def test_a_config_files_args_build_the_app_or_name_what_is_wrong() -> None:
    app = zse.ray.app_builder({"model": "m.zse", "replicas": 3, "api_keys": ["k"]})
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match=r"unknown zse\.ray argument.*'modle'"):
        zse.ray.app_builder({"modle": "m.zse"})
    with pytest.raises(ValueError, match="replicas"):
        zse.ray.build_app(ServeOptions(), replicas=0)


def test_a_request_through_the_in_process_asgi_call_streams_and_cancels() -> None:
    """The replica's ASGI driver: status and headers, then the body as sent; leaving
    early makes the app see its client go (its stream is cancelled)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    ended = asyncio.Event()

    async def numbers(request: Request) -> StreamingResponse:
        body = await request.json()

        async def gen() -> AsyncIterator[bytes]:
            try:
                for i in range(body["n"]):
                    yield f"{i}\n".encode()
                    await asyncio.sleep(0.01)
            finally:
                ended.set()

        return StreamingResponse(gen(), media_type="text/plain", headers={"x-n": "yes"})

    app = Starlette(routes=[Route("/n", numbers, methods=["POST"])])

    async def run() -> None:
        req = asgi.HttpRequest("POST", "/n", body=b'{"n": 3}')
        parts = [p async for p in asgi.call(app, req)]
        assert isinstance(parts[0], asgi.ResponseStart) and parts[0].status == 200
        assert (b"x-n", b"yes") in parts[0].headers
        assert b"".join(p for p in parts[1:] if isinstance(p, bytes)) == b"0\n1\n2\n"
        ended.clear()
        endless = asgi.call(app, asgi.HttpRequest("POST", "/n", body=b'{"n": 100000}'))
        assert isinstance(await endless.__anext__(), asgi.ResponseStart)
        assert await endless.__anext__() == b"0\n"
        await endless.aclose()
        await asyncio.wait_for(ended.wait(), 5)
        missing = [p async for p in asgi.call(app, asgi.HttpRequest("GET", "/nothing"))]
        assert isinstance(missing[0], asgi.ResponseStart) and missing[0].status == 404

    asyncio.run(run())


@dataclass
class Cluster:
    base: str
    limited_key: str
    #: The managed key's requests per minute.
    rpm: int

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@pytest.fixture(scope="module")
def cluster(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    db = tmp_path_factory.mktemp("ray-keys") / "keys.db"
    rpm = 6
    _, limited = KeyStore(db).create("limited", rpm=rpm)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="zse-test")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = ServeOptions(
            model=str(default_model),
            kv_cache_mb=128,
            max_sequences=16,
            api_keys=(LOAD_KEY,),
            keys_db=str(db),
        )
        serve.run(zse.ray.build_app(opts, replicas=2), name="zse", route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", limited, rpm)
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(question: str, system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": "default", "messages": messages, "max_tokens": 16, **extra}


def _auth(key: str = LOAD_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _stream(url: str, body: dict[str, Any], hang_up: bool = False) -> dict[str, Any]:
    """One streaming request: its replica, its events' payloads and whether it ended
    with [DONE] (or, when ``hang_up``, the replica once the first event came)."""
    body = {**body, "stream": True}
    with httpx.stream("POST", url, json=body, headers=_auth(), timeout=120) as r:
        out: dict[str, Any] = {"status": r.status_code, "replica": r.headers.get(REPLICA)}
        if r.status_code != 200:
            out["error"] = json.loads(r.read())["error"]
            return out
        events: list[str] = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                if hang_up:
                    break
        out["events"] = events
        return out


def _run_all(jobs: list[tuple[str, dict[str, Any], bool]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in jobs]

    def run(i: int) -> None:
        try:
            results[i] = _stream(*jobs[i])
        except Exception as e:  # a hang or a broken connection is the test's failure
            results[i] = {"exception": repr(e)}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
        assert not t.is_alive(), "a client hung"
    return results


def test_streaming_load_with_hang_ups_loses_nothing(cluster: Cluster) -> None:
    url = cluster.url("/v1/chat/completions")
    # 32 clients with distinct prompts (the affinity keys spread them), a quarter of
    # which hang up after the first event.
    jobs = [
        (url, _chat(f"Question {i}: what is {i} plus {i}?", system=f"Client {i}."), i % 4 == 0)
        for i in range(32)
    ]
    results = _run_all(jobs)
    replicas = set()
    for (_, _, hang_up), r in zip(jobs, results, strict=True):
        assert r.get("status") == 200, r
        replicas.add(r["replica"])
        if hang_up:
            continue
        assert r["events"][-1] == "[DONE]", r
        chunks = [json.loads(e) for e in r["events"][:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]
        assert all("error" not in c for c in chunks)
    assert len(replicas) == 2
    # The server goes on: a plain request after the load is answered.
    r = httpx.post(url, json=_chat("Hi"), headers=_auth(), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_prompt_prefix_keeps_to_one_replica(cluster: Cluster) -> None:
    url = cluster.url("/v1/chat/completions")
    shared = {
        httpx.post(url, json=_chat(f"Question {i}?"), headers=_auth(), timeout=60).headers[REPLICA]
        for i in range(8)
    }
    assert len(shared) == 1
    # Distinct prefixes spread over both.
    spread = {
        httpx.post(
            url, json=_chat("Hi", system=f"Persona {i}."), headers=_auth(), timeout=60
        ).headers[REPLICA]
        for i in range(16)
    }
    assert len(spread) == 2


def test_a_keys_rate_limit_holds_across_replicas(cluster: Cluster) -> None:
    url = cluster.url("/v1/chat/completions")
    # Which replica each prompt's affinity key goes to (rendezvous hashing over the
    # replicas' random ids), asked with the unlimited key: then the limited key's
    # requests alternate between the two replicas, rather than landing on one of
    # them by chance (1 run in 32 with six distinct prompts).
    by_replica: dict[str, list[str]] = {}
    for i in range(40):
        system = f"Limit {i}."
        r = httpx.post(url, json=_chat("Hi", system=system, max_tokens=1), headers=_auth())
        by_replica.setdefault(r.headers[REPLICA], []).append(system)
    assert len(by_replica) == 2, by_replica
    systems = [s for pair in zip(*by_replica.values(), strict=False) for s in pair]
    assert len(systems) >= cluster.rpm + 4, by_replica
    answers = [
        httpx.post(url, json=_chat("Hi", system=system), headers=_auth(cluster.limited_key))
        for system in systems[: cluster.rpm + 4]
    ]
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) == cluster.rpm and len(refused) == 4, [r.status_code for r in answers]
    assert len({r.headers[REPLICA] for r in ok}) == 2  # counted together, not per replica
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.post(url, json=_chat("Hi"), headers=_auth("sk-wrong")).status_code == 401


def test_a_replica_killed_mid_load_fails_only_its_requests(cluster: Cluster) -> None:
    url = cluster.url("/v1/chat/completions")
    # Long answers (EOS made unlikely), so that the kill lands while they stream.
    long = {"max_tokens": 200, "logit_bias": {"2": -100}}
    jobs = [(url, _chat("Tell a story.", system=f"Story {i}.", **long), False) for i in range(16)]
    results: list[dict[str, Any]] = []
    runner = threading.Thread(target=lambda: results.extend(_run_all(jobs)))
    runner.start()
    victim = _busy_replica(url)
    ray.kill(_replica_actor(victim), no_restart=True)
    runner.join(240)
    assert not runner.is_alive(), "a client hung"
    failed = 0
    for r in results:
        assert "exception" not in r, r
        if r["status"] == 503:  # its replica died before the answer began
            assert r["error"]["code"] == "replica_unavailable", r
            failed += 1
            continue
        assert r["status"] == 200 and r["events"][-1] == "[DONE]", r
        last = json.loads(r["events"][-2])
        if r["replica"] == victim:  # it died while the answer streamed
            assert last["error"]["code"] == "replica_unavailable", last
            failed += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length", last
    assert failed >= 1
    # Ray brings the replica back: two replicas answer again.
    deadline = time.monotonic() + 120
    while _running_replicas() < 2:
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(1)
    # The ingress's router learns of the new replica a moment after Ray reports it.
    spread: set[str] = set()
    for i in range(200):
        r = httpx.post(url, json=_chat("Hi", system=f"After {i}."), headers=_auth(), timeout=60)
        spread.add(r.headers[REPLICA])
        if len(spread) == 2:
            break
        assert time.monotonic() < deadline, "the new replica gets no requests"
        time.sleep(0.2)
    assert len(spread) == 2 and victim not in spread


def _busy_replica(url: str) -> str:
    """A replica that is streaming answers now (asked with a request of its own)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(url.replace("/v1/chat/completions", "/health"), headers=_auth(), timeout=30)
        if r.json()["engine"]["running_sequences"] > 0:
            return r.headers[REPLICA]
        time.sleep(0.2)
    raise AssertionError("no replica got busy")


def _replica_actor(replica_id: str) -> Any:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def _running_replicas() -> int:
    status = serve.status().applications["zse"].deployments["ZseReplica"]
    return int(status.replica_states.get("RUNNING", 0))

"""Which replica a request goes to: the same one for the same prompt prefix, so that
ZSE's prefix cache (a system prompt, earlier turns) is reused there, while that
replica has room; else the least loaded one. A Ray Serve request router (Ray's
`RequestRouter`: Ray probes the replicas' queues and picks within each rank)."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

#: Characters of a prompt's opening its affinity key is made of: about 64 tokens,
#: four of the KV cache's 16-position blocks.
AFFINITY_CHARS = 256


def affinity_key(body: bytes, chars: int = AFFINITY_CHARS) -> str | None:
    """The routing key of a request body: a hash of its prompt's opening, at most
    ``chars`` characters of it; None when the body has no prompt (any replica will
    do). A chat's opening is its messages up to the first user message: every later
    turn of the conversation starts with it, so the whole conversation meets the
    cache its earlier turns left, and requests that share a long system prompt share
    a replica. A completion's opening is its prompt's start."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    text = _opening(data.get("messages"), data.get("prompt"))
    if not text:
        return None
    return hashlib.blake2b(text[:chars].encode(), digest_size=8).hexdigest()


def _opening(messages: Any, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            break
        content = m.get("content")
        text = content if isinstance(content, str) else json.dumps(content)
        parts.append(f"{m.get('role')}\n{text}\n")
        if m.get("role") == "user":
            break
    return "".join(parts)


def _weight(key: str, replica: RunningReplica) -> bytes:
    """Rendezvous hashing: each replica's weight for a key. The highest wins, and a
    replica that comes or goes moves only its own share of the keys."""
    return hashlib.blake2b(f"{key}/{replica.replica_id.unique_id}".encode()).digest()


class PrefixAffinityRouter(RequestRouter):
    """The request's first argument is its affinity key (`affinity_key`): the replica
    that key hashes to comes first; Ray takes it when its queue has room (fewer than
    its ``max_ongoing_requests``, the engine's sequences) and otherwise the least
    loaded of the rest. Requests without a key go to the least loaded."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every replica is offered below: when all are full, back off before
            # asking again rather than spin.
            pending_request.routing_context.should_backoff = True
        key = None
        if pending_request is not None and pending_request.args:
            first = pending_request.args[0]
            key = first if isinstance(first, str) else None
        if key is None or len(candidate_replicas) < 2:
            # Ray takes the least loaded of a rank, the first of equals: shuffled,
            # equals share the requests.
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        ranked = sorted(candidate_replicas, key=lambda r: _weight(key, r), reverse=True)
        return [ranked[:1], ranked[1:]]

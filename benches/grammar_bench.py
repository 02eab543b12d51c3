"""What structured outputs cost: decode tok/s with a JSON-schema grammar against the
same requests without one, at 1 stream and at N concurrent streams, on one model in
one process (the grammar's mask is computed on the engine thread, per sequence, per
step, so this is the whole cost).

    python benches/grammar_bench.py [--model FILE.gguf] [--runs 5] [--tokens 128]
                                    [--streams 8]

Each request produces exactly ``--tokens`` tokens: free text with EOS ignored, and
under a schema (a long list of short strings) that cannot be complete sooner. Rates
count the tokens after the first over the time they took (1 stream) and all tokens
over the wall time (N streams). Medians over ``--runs``, the two cases taking turns.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import zse
from zse.models import default_gguf_path

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "minItems": 200,
        }
    },
    "required": ["items"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}


def one_stream(engine: zse.Engine, prompt: list[dict[str, str]], kw: dict[str, Any]) -> float:
    stream = engine.stream(prompt, **kw)
    next(stream)
    t = time.perf_counter()
    for _ in stream:
        pass
    assert stream.completion is not None
    n = stream.completion.usage.completion_tokens
    assert n == kw["max_tokens"], f"{n} tokens, expected {kw['max_tokens']}"
    return (n - 1) / (time.perf_counter() - t)


async def many_streams(engine: zse.Engine, prompts: list[list[int]], kw: dict[str, Any]) -> float:
    async def one(ids: list[int]) -> int:
        last = None
        async for delta in engine.astream_deltas(ids, **kw):
            last = delta
        assert last is not None and last.usage is not None
        return last.usage.completion_tokens

    t = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    assert all(c == kw["max_tokens"] for c in counts), counts
    return sum(counts) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a GGUF or .zse file (default: the default model)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=8)
    args = p.parse_args()
    if args.model is None:
        zse.pull(progress=False)
    model = zse.models.resolve_model(args.model or default_gguf_path(), progress=False)
    engine = zse.Engine(model)
    ask = [{"role": "user", "content": "List the animals you know, as JSON."}]
    prompts = [
        engine.prompt_ids([{"role": "user", "content": f"List {i + 3} animals, as JSON."}])
        for i in range(args.streams)
    ]
    cases: dict[str, dict[str, Any]] = {
        "free": {"ignore_eos": True},
        "json_schema": {"response_format": FORMAT},
    }
    engine.chat(ask, max_tokens=2, response_format=FORMAT)  # builds the token trie once
    rates: dict[tuple[str, int], list[float]] = {}
    for run in range(args.runs + 1):  # the first run warms up
        for name, extra in cases.items():
            kw = {"temperature": 0.8, "seed": run, "max_tokens": args.tokens, **extra}
            single = one_stream(engine, ask, kw)
            multi = asyncio.run(many_streams(engine, prompts, kw))
            if run:
                rates.setdefault((name, 1), []).append(single)
                rates.setdefault((name, args.streams), []).append(multi)
    engine.close()

    print(
        f"model: {Path(model).name}, {args.tokens} tokens per request, median of {args.runs} runs"
    )
    print("| streams | free tok/s | json_schema tok/s | ratio |")
    print("|---|---|---|---|")
    for streams in (1, args.streams):
        free = statistics.median(rates[("free", streams)])
        constrained = statistics.median(rates[("json_schema", streams)])
        print(f"| {streams} | {free:.1f} | {constrained:.1f} | x{constrained / free:.2f} |")


if __name__ == "__main__":
    main()

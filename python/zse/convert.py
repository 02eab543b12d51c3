"""Model conversion and inspection, with a progress bar on terminals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from . import _core

Quant = Literal["int4", "int8", "fp16", "keep", "q4_0", "q4_1", "q4_k", "q8_0"]


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    quant: Quant = "int4",
    progress: bool = True,
) -> dict[str, Any]:
    """Converts a GGUF file or a HF model directory into a ``.zse`` file.

    ``quant``: ``int4`` (Q4_K, or Q4_1 where rows do not divide into 256), ``int8``
    (Q8_0), ``fp16``, ``keep`` (the source's types), or one GGML block type for all
    matrices (``q4_0``, ``q4_1``, ``q4_k``, ``q8_0``). 4-bit schemes keep embeddings in Q8_0.

    Returns a summary: output path, tensor count, bytes written, quantization and the
    source's SHA-256. The bar only shows on a terminal.
    """
    bar: tqdm[Any] | None = None

    def on_progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if not progress:
            return
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc=f"convert ({quant})", disable=None)
        bar.n = done
        bar.set_postfix_str(name, refresh=False)
        bar.refresh()

    try:
        report = _core.convert(str(src), str(out), quant, on_progress)
    finally:
        if bar is not None:
            bar.close()
    result: dict[str, Any] = json.loads(report)
    result["output"] = Path(result["output"])
    return result


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What is inside a ``.zse`` file (architecture, quantization, tokenizer, ...)."""
    info: dict[str, Any] = json.loads(_core.inspect(str(path)))
    return info

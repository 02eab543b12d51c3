"""Model conversion and inspection, with a progress bar on terminals."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import _core

if TYPE_CHECKING:
    from tqdm import tqdm

Quant = Literal["int4", "int8", "fp16", "keep", "q4_0", "q4_1", "q4_k", "q8_0"]


class RequantizeWarning(UserWarning):
    """Already quantized tensors were quantized again (``allow_requantize=True``)."""


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    quant: Quant | None = None,
    allow_requantize: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Converts a GGUF file or a HF model directory into a ``.zse`` file.

    ``quant``: ``int4`` (Q4_K, or Q4_1 where rows do not divide into 256), ``int8``
    (Q8_0), ``fp16``, ``keep`` (the source's types), or one GGML block type for all
    matrices (``q4_0``, ``q4_1``, ``q4_k``, ``q8_0``). 4-bit schemes keep embeddings in Q8_0.
    Default: ``keep`` for a GGUF file, ``int4`` for a HF directory's float weights.

    Quantizing a tensor that the GGUF file already stores quantized into another
    block type rounds its weights a second time; that raises ``ValueError`` unless
    ``allow_requantize`` (then a ``RequantizeWarning`` names how many were).

    Returns a summary: output path, tensor count, bytes written, quantization, the
    source's SHA-256 and the requantized tensors. The bar only shows on a terminal.
    """
    bar: tqdm[Any] | None = None

    def on_progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if not progress:
            return
        if bar is None:
            # Imported here: it takes tens of milliseconds of every start otherwise.
            from tqdm import tqdm

            desc = f"convert ({quant or 'default'})"
            bar = tqdm(total=total, unit="tensor", desc=desc, disable=None)
        bar.n = done
        bar.set_postfix_str(name, refresh=False)
        bar.refresh()

    try:
        report = _core.convert(str(src), str(out), quant, on_progress, allow_requantize)
    finally:
        if bar is not None:
            bar.close()
    result: dict[str, Any] = json.loads(report)
    result["output"] = Path(result["output"])
    if requantized := result["requantized"]:
        first = requantized[0]
        warnings.warn(
            f"{len(requantized)} already quantized tensor(s) were quantized again "
            f"(e.g. {first['name']}: {first['from']} -> {first['to']}); "
            "expect lower quality than the source",
            RequantizeWarning,
            stacklevel=2,
        )
    return result


def inspect(path: str | os.PathLike[str], *, tokenizer: bool = True) -> dict[str, Any]:
    """What is inside a ``.zse`` file (architecture, quantization, tokenizer, ...).
    With ``tokenizer=False`` the tokenizer is not read (its ``"tokenizer"`` entry is
    None): a large vocabulary takes most of a second to read."""
    info: dict[str, Any] = json.loads(_core.inspect(str(path), tokenizer))
    return info


def missing_kernels_line(counts: dict[str, int]) -> str | None:
    """The warning for matrices ZSE's CPU kernels do not run (by block type), which
    `zse info` and the server's banner print; None when there are none."""
    if not counts:
        return None
    types = ", ".join(f"{dtype} x{n}" for dtype, n in sorted(counts.items()))
    return (
        f"{sum(counts.values())} weight matrices ({types}) have no ZSE kernel: "
        "candle's matmul runs them, several times slower"
    )

"""Block types candle cannot hold (IQ4_NL, IQ4_XS: llama.cpp's IQ4 presets) load,
convert and run on ZSE's kernels, and compute what their values as GGML defines them
compute: the tiny random Qwen3 with its layers' matrices as random IQ4 blocks, against
its twin holding the same blocks dequantized by the gguf package (an implementation
of GGML's formats independent of ZSE's) in F32."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
import zse
from conftest import REFERENCE_DIR

TOKENS = [1, 5, 9, 200, 17, 33, 4, 8, 100, 7, 4000, 12]
# ffn_down's rows of 256 take IQ4_XS's super-blocks; the others fall back to IQ4_NL.
FFN = 256

Scores = list[list[tuple[int, float]]]


@pytest.fixture(scope="module", params=["IQ4_NL", "IQ4_XS"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(the IQ4 file, its F32 twin), both converted to .zse keeping their types."""
    kind: str = request.param
    tmp = tmp_path_factory.mktemp(kind)
    out = []
    for dequantized in (False, True):
        gguf = tmp / f"qwen3-{kind}{'-f32' if dequantized else ''}.gguf"
        tokenizer = REFERENCE_DIR / "qwen2-tiny-random-f32.gguf"
        tiny_models.write("qwen3", gguf, tokenizer, ffn=FFN, iq4=kind, dequantized=dequantized)
        zse_file = gguf.with_suffix(".zse")
        zse.convert(gguf, zse_file, quant="keep", progress=False)
        out.append(zse_file)
    return out[0], out[1]


def scores(path: Path, kernels: str) -> Scores:
    try:
        engine = zse.Engine(path, cpu_kernels=kernels, kv_cache_dtype="f32")  # type: ignore[arg-type]
    except zse.UnsupportedModelError:
        pytest.skip(f"this CPU cannot run the {kernels} kernels")
    try:
        assert engine.metadata["matrices_without_kernel"] == {}
        return engine.score(TOKENS, top=20)
    finally:
        engine.close()


def apart(a: Scores, b: Scores) -> float:
    """The largest |log-prob difference| over `a`'s top five (within `b`'s top
    twenty), position by position."""
    worst = 0.0
    for mine, theirs in zip(a, b, strict=True):
        by_id = dict(theirs)
        worst = max(worst, *(abs(lp - by_id.get(t, -1e9)) for t, lp in mine[:5]))
    return worst


def test_the_types_are_kept_and_named(pair: tuple[Path, Path]) -> None:
    iq4, _ = pair
    kind = iq4.stem.split("-")[1]
    types = {row["dtype"] for row in zse.inspect(iq4)["tensor_types"]}
    assert {"IQ4_NL", kind} <= types
    assert "F32" in types and "Q8_0" not in types


def test_candles_path_computes_the_values_ggml_defines(pair: tuple[Path, Path]) -> None:
    # Off the CPU kernels (a GPU's path), the blocks come dequantized to F32: the
    # same values as the twin's, so the same log-probabilities.
    iq4, twin = pair
    assert apart(scores(iq4, "candle"), scores(twin, "candle")) < 1e-5


@pytest.mark.parametrize("kernels", ["generic", "avx2", "avx512"])
def test_every_kernel_path_gives_the_portable_bits_near_the_values(
    pair: tuple[Path, Path], kernels: str
) -> None:
    iq4, twin = pair
    mine = scores(iq4, kernels)
    assert mine == scores(iq4, "generic")
    # The twin's float weights meet unquantized activations; the blocks meet 8-bit
    # ones: close, the same token first at every position.
    floats = scores(twin, kernels)
    assert apart(mine, floats) < 0.3
    assert [p[0][0] for p in mine] == [p[0][0] for p in floats]


def test_requantizing_iq4_takes_leave_and_then_works(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    iq4, _ = pair
    out = tmp_path / "q8.zse"
    with pytest.raises(ValueError, match="IQ4"):
        zse.convert(iq4, out, quant="q8_0", progress=False)
    with pytest.warns(zse.RequantizeWarning, match="IQ4"):
        zse.convert(iq4, out, quant="q8_0", progress=False, allow_requantize=True)
    types = {row["dtype"] for row in zse.inspect(out)["tensor_types"]}
    assert "Q8_0" in types and not any(t.startswith("IQ4") for t in types)
    with zse.Engine(out, kv_cache_dtype="f32") as engine:
        assert len(engine.score(TOKENS, top=5)) == len(TOKENS)

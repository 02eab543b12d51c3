"""Architectures without a reachable real file, in F32 against llama.cpp's
teacher-forced log-probabilities on tiny random-weight models, on every CPU kernel
path and on candle's operations (the code path a GPU runs):

- qwen2 (q/k/v biases, NeoX RoPE, tied embeddings): the shared reference file;
- the models of tiny_models.py (qwen3: per-head q/k norms, explicit head size),
  written again here and checked against the sha256 their reference recorded
  (scripts/make-tiny-references made the references)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import zse
from conftest import REFERENCE_DIR, load_reference

HERE = Path(__file__).parent
SMOL = load_reference("smollm2-q4_1-greedy.json")
TOLERANCE = 2e-3  # F32 throughout: only summation order differs from llama.cpp
PATHS = ["generic", "avx2", "avx512", "candle"]
MODELS = ["qwen2", *tiny_models.MODELS]


def reference(name: str) -> dict[str, Any]:
    if name == "qwen2":
        return load_reference("qwen2-tiny-random-reference.json")
    data: dict[str, Any] = json.loads(
        (HERE / "references" / f"{name}-tiny-random-reference.json").read_text()
    )
    return data


@pytest.fixture(scope="module", params=MODELS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model as a .zse file keeping its F32 weights."""
    name: str = request.param
    tmp = tmp_path_factory.mktemp(name)
    if name == "qwen2":
        gguf = REFERENCE_DIR / "qwen2-tiny-random-f32.gguf"
    else:
        gguf = tmp / f"{name}.gguf"
        sha = tiny_models.write(name, gguf, REFERENCE_DIR / "qwen2-tiny-random-f32.gguf")
        assert sha == reference(name)["sha256"], "tiny_models.py no longer writes the file scored"
    out = tmp / f"{name}.zse"
    zse.convert(gguf, out, quant="keep", progress=False)
    return out


@pytest.fixture(scope="module", params=PATHS)
def tiny(request: pytest.FixtureRequest, model: Path) -> Iterator[tuple[zse.Engine, str]]:
    path: str = request.param
    try:
        engine = zse.Engine(model, cpu_kernels=path, kv_cache_dtype="f32")  # type: ignore[arg-type]
    except zse.UnsupportedModelError:
        pytest.skip(f"this CPU cannot run the {path} kernels")
    assert engine.metadata["cpu_kernels"] == path
    yield engine, model.stem
    engine.close()


def test_teacher_forced_top10_logprobs_at_every_position(tiny: tuple[zse.Engine, str]) -> None:
    engine, name = tiny
    assert engine.metadata["config"]["architecture"] == name
    worst = 0.0
    for i, case in enumerate(reference(name)["cases"]):
        ours = engine.score(case["token_ids"], top=10)
        ref = case["top10_logprobs_per_position"]
        assert len(ours) == len(ref)
        for pos, (mine, theirs) in enumerate(zip(ours, ref, strict=True)):
            mine_by_id = dict(mine)
            for token, logprob in theirs:
                assert token in mine_by_id, f"case {i} position {pos}: {token} not in our top 10"
                assert mine_by_id[token] == pytest.approx(logprob, abs=TOLERANCE), (i, pos, token)
                worst = max(worst, abs(mine_by_id[token] - logprob))
    path = engine.metadata["cpu_kernels"]
    print(f"\n{name} {path}: worst |delta| to llama.cpp {worst:.1e}")


def test_greedy_continuation(tiny: tuple[zse.Engine, str]) -> None:
    engine, name = tiny
    ref = reference(name)
    prompt = SMOL["cases"][0]["prompt_ids"]
    assert ref["cases"][0]["token_ids"][: len(prompt)] == prompt
    text = engine.detokenize(prompt, skip_special_tokens=False)
    assert engine.tokenize(text) == prompt
    expected = ref["greedy_from_case0"]
    out = engine.generate(text, temperature=0, max_tokens=len(expected), ignore_eos=True)
    assert out.token_ids == expected

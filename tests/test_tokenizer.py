"""The tokenizer a GGUF file describes, as llama.cpp tokenizes with it: byte-level BPE
(SmolLM2) and SentencePiece (Gemma 3: scores, byte fallback, user-defined runs of
spaces), on awkward texts (tests/references/tokenization-reference.json, made by
scripts/make-tokenizer-references) and on the Gemma reference prompts; and the BOS
token the file asks prompts to start with, added once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import zse
from conftest import REFERENCE_DIR, ROOT, load_reference

TOKENIZATION = json.loads((ROOT / "tests/references/tokenization-reference.json").read_text())


def cases(model: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = TOKENIZATION["models"][model]
    return out


@pytest.fixture(scope="module")
def gemma3_engine(gemma3: Path) -> Iterator[zse.Engine]:
    with zse.Engine(gemma3) as e:
        yield e


def check_tokenizes_as_llama_cpp(engine: zse.Engine, model: str) -> None:
    for case in cases(model):
        ids = engine.tokenize(case["text"], add_bos=True)
        assert ids == case["ids"], case["text"]
        if "<" not in case["text"]:  # no special-token text, which decoding skips
            assert engine.detokenize(ids) == case["text"]


def test_byte_level_bpe_as_llama_cpp(engine: zse.Engine) -> None:
    check_tokenizes_as_llama_cpp(engine, "SmolLM2-135M-Instruct")


def test_sentencepiece_as_llama_cpp(gemma3_engine: zse.Engine) -> None:
    assert gemma3_engine.metadata["config"]["architecture"] == "gemma3"
    check_tokenizes_as_llama_cpp(gemma3_engine, "gemma-3-270m")


def test_sentencepiece_reference_prompts(gemma3_engine: zse.Engine) -> None:
    """The 8 prompts llama.cpp's Gemma references start from, BOS included (one of
    1289 tokens)."""
    for case in load_reference("gemma3-270m-f32-reference.json")["cases"]:
        assert gemma3_engine.prompt_ids(case["prompt_text"]) == case["prompt_ids"]
        assert gemma3_engine.detokenize(case["prompt_ids"]) == case["prompt_text"]


def test_sentencepiece_byte_fallback(gemma3_engine: zse.Engine) -> None:
    """A character outside the vocabulary is spelled as its UTF-8 bytes' tokens."""
    ids = gemma3_engine.tokenize("\U00013000")  # EGYPTIAN HIEROGLYPH A001: 4 bytes
    assert len(ids) == 4
    assert gemma3_engine.detokenize(ids) == "\U00013000"
    assert "\U00013000" not in gemma3_engine.detokenize(ids[:3])


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zse.Engine]:
    """The tiny model with a file that asks for BOS (SmolLM2's tokenizer: BOS is
    `<|im_start|>`, which its chat template writes itself)."""
    tmp = tmp_path_factory.mktemp("bos")
    gguf = tmp / "bos.gguf"
    tiny_models.write("qwen3", gguf, REFERENCE_DIR / "qwen2-tiny-random-f32.gguf", add_bos=True)
    out = tmp / "bos.zse"
    zse.convert(gguf, out, progress=False)
    with zse.Engine(out) as e:
        yield e


def test_prompts_start_with_bos_once(bos_model: zse.Engine) -> None:
    bos = bos_model.tokenize("<|im_start|>")
    assert len(bos) == 1
    raw = bos_model.tokenize("Hello")
    assert bos_model.prompt_ids("Hello") == bos + raw
    assert bos_model.tokenize("Hello", add_bos=True) == bos + raw
    # The chat template writes BOS itself: it is not doubled.
    chat = bos_model.prompt_ids([{"role": "user", "content": "Hello"}])
    assert chat[0] == bos[0] and chat[1] != bos[0]
    out = bos_model.generate("Hello", max_tokens=1)
    assert out.usage.prompt_tokens == len(raw) + 1


def test_no_bos_where_the_file_says_none(engine: zse.Engine) -> None:
    assert engine.prompt_ids("Hello") == engine.tokenize("Hello")

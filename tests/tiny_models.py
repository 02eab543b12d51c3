"""Tiny random-weight GGUF models of architectures no reachable real file has, for
checking ZSE's forward pass against llama.cpp's on them.

Each model is written byte for byte the same wherever it is made: the weights come
from integer hashing (no library random generator whose stream could change), the
tokenizer and chat template are SmolLM2's, copied from the reference Qwen2 tiny model.
`scripts/make-tiny-references` runs llama.cpp on these files to write the reference
log-probabilities under tests/references/; the tests write the files again and check
their sha256 against the one recorded there before comparing.

Needs numpy and gguf only (it also runs in the peer's environment, without zse).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 64, 2, 128, 4, 2


@dataclass(frozen=True)
class Tiny:
    """One tiny model: its GGUF architecture, the keys beyond the common ones, and
    its layers' tensors (name suffix -> shape, numpy order [out, in])."""

    arch: str
    head_dim: int
    #: A layer's tensors for (head size, feed-forward width).
    layer_tensors: Callable[[int, int], dict[str, tuple[int, ...]]]
    keys: dict[str, int | float] = field(default_factory=dict)
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    tied_embeddings: bool = True
    #: Half-width of the token embeddings' values (Gemma scales them by sqrt(hidden)).
    embed_range: float = 1.0


def _qwen3_layer(hd: int, ffn: int) -> dict[str, tuple[int, ...]]:
    q, kv = HEADS * hd, KV_HEADS * hd
    return {
        "attn_norm.weight": (HIDDEN,),
        "attn_q.weight": (q, HIDDEN),
        "attn_k.weight": (kv, HIDDEN),
        "attn_v.weight": (kv, HIDDEN),
        "attn_q_norm.weight": (hd,),
        "attn_k_norm.weight": (hd,),
        "attn_output.weight": (HIDDEN, q),
        "ffn_norm.weight": (HIDDEN,),
        "ffn_gate.weight": (ffn, HIDDEN),
        "ffn_up.weight": (ffn, HIDDEN),
        "ffn_down.weight": (HIDDEN, ffn),
    }


def _phi3_layer(hd: int, ffn: int) -> dict[str, tuple[int, ...]]:
    q, kv = HEADS * hd, KV_HEADS * hd
    return {
        "attn_norm.weight": (HIDDEN,),
        "attn_qkv.weight": (q + 2 * kv, HIDDEN),
        "attn_output.weight": (HIDDEN, q),
        "ffn_norm.weight": (HIDDEN,),
        "ffn_up.weight": (2 * ffn, HIDDEN),  # gate rows, then up rows
        "ffn_down.weight": (HIDDEN, ffn),
    }


def _gemma3_layer(hd: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """Qwen3's layer with a norm after the attention and one after the MLP (in the
    order the reference file has them: the seeds follow it)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in _qwen3_layer(hd, ffn).items():
        if name == "ffn_norm.weight":
            out["post_attention_norm.weight"] = (HIDDEN,)
        out[name] = shape
    out["post_ffw_norm.weight"] = (HIDDEN,)
    return out


MODELS = {
    # Per-head q/k RMSNorm, no biases, a head size other than hidden / heads.
    "qwen3": Tiny("qwen3", head_dim=32, layer_tensors=_qwen3_layer),
    # Fused q/k/v and gate/up matrices, NeoX RoPE, separate output head.
    "phi3": Tiny(
        "phi3",
        head_dim=HIDDEN // HEADS,
        layer_tensors=_phi3_layer,
        keys={"rope.dimension_count": HIDDEN // HEADS},
        rope_theta=10_000.0,
        rms_eps=1e-5,
        tied_embeddings=False,
    ),
    # Embeddings scaled by sqrt(hidden), post-norms, GELU-gated MLP; layer 0 attends
    # within a 4-position window (RoPE base 10000), layer 1 globally (base 1e6).
    "gemma3": Tiny(
        "gemma3",
        head_dim=32,
        layer_tensors=_gemma3_layer,
        keys={
            "attention.sliding_window": 4,
            "attention.sliding_window_pattern": 2,
            "rope.freq_base_swa": 10_000.0,
        },
        tied_embeddings=False,
        embed_range=1.0 / 8,
    ),
}


def _bits(seed: int, n: int) -> np.ndarray:
    """`n` 64-bit mixes of (seed, index)."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _values(seed: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Uniform values in [-scale, scale) from a 64-bit mix of (seed, index)."""
    z = _bits(seed, int(np.prod(shape)))
    unit = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # [0, 1)
    return ((2.0 * unit - 1.0) * scale).astype(np.float32).reshape(shape)


#: The IQ4 block types (which candle cannot hold): values and bytes per block, and
#: the largest |level x sub-block scale| a value's f16 block scale multiplies.
IQ4_TYPES = {
    "IQ4_NL": (GGMLQuantizationType.IQ4_NL, 32, 18, 127),
    "IQ4_XS": (GGMLQuantizationType.IQ4_XS, 256, 136, 127 * 32),
}


def _iq4_blocks(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random IQ4 blocks for a `[out, in]` matrix (every index and sub-block scale
    possible), each block's f16 scale such that its values stay within the F32
    weights' range; GGML's bytes, `[out, in / block * bytes per block]`."""
    _, block, size, reach = IQ4_TYPES[kind]
    rows, cols = shape
    n = rows * cols // block
    raw = (_bits(seed, n * size) & np.uint64(0xFF)).astype(np.uint8).reshape(n, size)
    limit = np.sqrt(6.0 / cols) / reach
    d = (limit * (0.25 + raw[:, 2].astype(np.float64) / 340.0)).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, cols // block * size)


def _tensor(name: str, shape: tuple[int, ...], seed: int, embed_range: float) -> np.ndarray:
    if name.endswith("norm.weight"):
        # Norm weights near 1, as trained models have them.
        return 1.0 + _values(seed, shape, 0.2)
    if name.endswith(".bias"):
        return _values(seed, shape, 0.1)
    if name == "token_embd.weight":
        return _values(seed, shape, embed_range)
    if name == "output.weight":
        # Wide enough that the logits are peaked, as a trained model's are (a flat
        # distribution would hide errors in the log-probabilities' spread).
        return _values(seed, shape, 1.0)
    fan_in = shape[-1]
    return _values(seed, shape, float(np.sqrt(6.0 / fan_in)))


#: llama.cpp's type of a token written as text in replies (`llama_token_type`).
USER_DEFINED = 4


def _copy_tokenizer(
    writer: GGUFWriter,
    source: Path,
    chat_template: bool,
    add_bos: bool | None,
    user_tokens: Mapping[int, str],
) -> None:
    reader = GGUFReader(source)
    if add_bos is not None:
        writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    for key, f in reader.fields.items():
        skipped = (key == "tokenizer.chat_template" and not chat_template) or (
            key == "tokenizer.ggml.add_bos_token" and add_bos is not None
        )
        if not key.startswith("tokenizer.") or skipped:
            continue
        value = f.contents()
        if key == "tokenizer.ggml.tokens":
            value = [user_tokens.get(i, t) for i, t in enumerate(value)]
        elif key == "tokenizer.ggml.token_type":
            value = [USER_DEFINED if i in user_tokens else t for i, t in enumerate(value)]
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, value)
        elif kind == GGUFValueType.BOOL:
            writer.add_bool(key, value)
        elif kind == GGUFValueType.UINT32:
            writer.add_uint32(key, value)
        else:
            raise ValueError(f"{key}: unexpected type {kind}")


def write(
    name: str,
    path: Path,
    tokenizer_source: Path,
    *,
    chat_template: bool = True,
    add_bos: bool | None = None,
    ffn: int = FFN,
    user_tokens: Mapping[int, str] | None = None,
    iq4: str | None = None,
    dequantized: bool = False,
) -> str:
    """Writes model `name` to `path` (without the chat template where asked: a base
    model's file; with `tokenizer.ggml.add_bos_token` set where `add_bos` says; with
    another feed-forward width where `ffn` says; with the tokens `user_tokens` names
    respelled as user-defined ones, one token each as Qwen3's `<think>` is; with the
    layers' matrices as random IQ4 blocks where `iq4` names the type, IQ4_XS falling
    back to IQ4_NL where a row is not whole super-blocks, as llama-quantize does, or
    with the same blocks' values as GGML dequantizes them, in F32, where `dequantized`
    is also set); returns the file's sha256."""
    m = MODELS[name]
    a = m.arch
    w = GGUFWriter(str(path), a)
    # Not the architecture's name: llama.cpp patches a vocabulary by what the model's
    # name contains ("phi3" expects Phi-3's own special tokens).
    w.add_name("zse-test-tiny-random")
    w.add_uint32(f"{a}.context_length", 2048)
    w.add_uint32(f"{a}.embedding_length", HIDDEN)
    w.add_uint32(f"{a}.block_count", LAYERS)
    w.add_uint32(f"{a}.feed_forward_length", ffn)
    w.add_uint32(f"{a}.attention.head_count", HEADS)
    w.add_uint32(f"{a}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{a}.attention.key_length", m.head_dim)
    w.add_uint32(f"{a}.attention.value_length", m.head_dim)
    w.add_float32(f"{a}.rope.freq_base", m.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", m.rms_eps)
    for key, value in m.keys.items():
        if isinstance(value, float):
            w.add_float32(f"{a}.{key}", value)
        else:
            w.add_uint32(f"{a}.{key}", value)
    _copy_tokenizer(w, tokenizer_source, chat_template, add_bos, user_tokens or {})
    vocab = len(GGUFReader(tokenizer_source).fields["tokenizer.ggml.tokens"].data)
    tensors: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, HIDDEN),
        "output_norm.weight": (HIDDEN,),
    }
    if not m.tied_embeddings:
        tensors["output.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        tensors.update({f"blk.{i}.{k}": s for k, s in m.layer_tensors(m.head_dim, ffn).items()})
    for seed, (tname, shape) in enumerate(tensors.items(), start=1):
        kind = iq4 if tname.startswith("blk.") and len(shape) == 2 else None
        if kind == "IQ4_XS" and shape[1] % IQ4_TYPES[kind][1]:
            kind = "IQ4_NL"
        if kind is None:
            w.add_tensor(tname, _tensor(tname, shape, seed, m.embed_range))
            continue
        qtype = IQ4_TYPES[kind][0]
        blocks = _iq4_blocks(kind, shape, seed)
        if dequantized:
            w.add_tensor(tname, dequantize(blocks, qtype).astype(np.float32))
        else:
            w.add_tensor(tname, blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()

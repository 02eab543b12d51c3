//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): the GGUF lists the merges, and the
//! pre-tokenizer is named by `tokenizer.ggml.pre`. Supported pre-tokenizers: llama.cpp's
//! `smollm`, `gpt2`/`default`, `qwen2` and `llama-bpe` (Llama 3).

use serde_json::{json, Value as Json};

use super::{document, Vocab};
use crate::error::{Error, Result};

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn pre_tokenizer(pre: &str) -> Result<Json> {
    Ok(match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt2" | "default" => byte_level(true),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]}),
        "llama-bpe" | "llama3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]})
        }
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF pre-tokenizer '{other}' (supported: smollm, gpt2, qwen2, llama-bpe); convert from the HF directory instead"
            )))
        }
    })
}

/// The tokenizer for a byte-level BPE vocabulary with its `merges` ("left right").
pub(super) fn tokenizer(
    vocab: &Vocab,
    merges: &[&str],
    pre: &str,
    unk: Option<&str>,
) -> Result<Json> {
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
        "ignore_merges": false, "vocab": vocab.json_vocab(), "merges": merges,
    });
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    Ok(document(
        vocab,
        Json::Null,
        pre_tokenizer(pre)?,
        model,
        decoder,
    ))
}

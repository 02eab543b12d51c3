//! Builds a HF `tokenizer.json` from the tokenizer a GGUF file describes in its
//! `tokenizer.ggml.*` keys, so that every `.zse` file carries one tokenizer format.
//!
//! Supported: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizers
//! llama.cpp names `smollm`, `gpt2`/`default`, `qwen2` and `llama-bpe` (Llama 3).

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use super::gguf::GgufFile;
use crate::error::{Error, Result};

/// llama.cpp's token types (llama_token_type).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(v: Option<&Value>) -> Option<Vec<&str>> {
    match v? {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Some(s.as_str()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn ints(v: Option<&Value>) -> Option<Vec<i64>> {
    match v? {
        Value::Array(items) => items
            .iter()
            .map(|i| match *i {
                Value::I32(x) => Some(x as i64),
                Value::U32(x) => Some(x as i64),
                Value::I64(x) => Some(x),
                Value::I8(x) => Some(x as i64),
                Value::U8(x) => Some(x as i64),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

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

/// The `tokenizer.json` text for the GGUF's tokenizer.
pub fn tokenizer_json_from_gguf(g: &GgufFile) -> Result<String> {
    let model = g.get_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "GGUF tokenizer model '{model}' (only byte-level BPE, 'gpt2', is read from GGUF); convert from the HF directory instead"
        )));
    }
    let missing = |k: &str| Error::invalid_file(g.path(), format!("{k} is missing or malformed"));
    let tokens =
        strings(g.get("tokenizer.ggml.tokens")).ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
    let merges =
        strings(g.get("tokenizer.ggml.merges")).ok_or_else(|| missing("tokenizer.ggml.merges"))?;
    let types = ints(g.get("tokenizer.ggml.token_type")).unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(missing("tokenizer.ggml.token_type"));
    }
    let pre = pre_tokenizer(g.get_str("tokenizer.ggml.pre").unwrap_or("default"))?;

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(tok.to_string(), json!(id));
        if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let unk = g
        .get_u64("tokenizer.ggml.unknown_token_id")
        .and_then(|id| tokens.get(id as usize))
        .map(|s| s.to_string());
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    Ok(tokenizer.to_string())
}

//! Builds a HF `tokenizer.json` from the tokenizer a GGUF file describes in its
//! `tokenizer.ggml.*` keys, so that every `.zse` file carries one tokenizer format and
//! the `tokenizers` crate does all tokenization.
//!
//! - `gpt2` (byte-level BPE: SmolLM2, Qwen, Llama 3): `byte_level`.
//! - `llama` (SentencePiece BPE with scores and byte fallback: Gemma, Llama 2,
//!   Mistral v0.1): `sentencepiece`.

mod byte_level;
mod sentencepiece;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use super::gguf::{value_as_u64, GgufFile};
use crate::error::{Error, Result};

/// llama.cpp's token types (`llama_token_type`).
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    /// `<0xNN>` tokens: in the vocabulary only, for byte fallback.
    #[cfg(test)]
    pub const BYTE: i64 = 6;
}

/// The vocabulary as the GGUF lists it: one entry per token id.
struct Vocab<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

impl<'a> Vocab<'a> {
    fn read(g: &'a GgufFile) -> Result<Self> {
        let tokens = strings(g.get("tokenizer.ggml.tokens"))
            .ok_or_else(|| missing(g, "tokenizer.ggml.tokens"))?;
        let types =
            ints(g.get("tokenizer.ggml.token_type")).unwrap_or_else(|| vec![1; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(missing(g, "tokenizer.ggml.token_type"));
        }
        Ok(Self { tokens, types })
    }

    /// Every token by text, for the model's `vocab`.
    fn json_vocab(&self) -> serde_json::Map<String, Json> {
        let mut vocab = serde_json::Map::with_capacity(self.tokens.len());
        for (id, tok) in self.tokens.iter().enumerate() {
            vocab.insert(tok.to_string(), json!(id));
        }
        vocab
    }

    /// Tokens matched in the raw text before the model sees it, as llama.cpp splits
    /// them out first: control and unknown tokens are special (never shown in
    /// generated text), user-defined ones (Gemma's runs of spaces and HTML tags) are
    /// plain text.
    fn added_tokens(&self) -> Vec<Json> {
        let mut added = Vec::new();
        for (id, (tok, ty)) in self.tokens.iter().zip(&self.types).enumerate() {
            let special = matches!(*ty, token_type::CONTROL | token_type::UNKNOWN);
            if special || *ty == token_type::USER_DEFINED {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }));
            }
        }
        added
    }

    fn token(&self, id: Option<u64>) -> Option<&'a str> {
        id.and_then(|id| self.tokens.get(id as usize).copied())
    }
}

/// The `tokenizer.json` text for the GGUF's tokenizer.
pub fn tokenizer_json_from_gguf(g: &GgufFile) -> Result<String> {
    let vocab = Vocab::read(g)?;
    let unk = vocab.token(g.get_u64("tokenizer.ggml.unknown_token_id"));
    let tokenizer = match g.get_str("tokenizer.ggml.model").unwrap_or("") {
        "gpt2" => {
            let merges = strings(g.get("tokenizer.ggml.merges"))
                .ok_or_else(|| missing(g, "tokenizer.ggml.merges"))?;
            let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
            byte_level::tokenizer(&vocab, &merges, pre, unk)?
        }
        "llama" => {
            let scores = floats(g.get("tokenizer.ggml.scores"))
                .filter(|s| s.len() == vocab.tokens.len())
                .ok_or_else(|| missing(g, "tokenizer.ggml.scores"))?;
            let prefix = bool_key(g, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
            sentencepiece::tokenizer(&vocab, &scores, prefix, unk)
        }
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF tokenizer model '{other}' (supported: 'gpt2' byte-level BPE, 'llama' \
                 SentencePiece); convert from the HF directory instead"
            )))
        }
    };
    Ok(tokenizer.to_string())
}

/// Whether prompts start with BOS, as the file says (`tokenizer.ggml.add_bos_token`);
/// where it is silent, llama.cpp's default: SentencePiece models do, BPE ones do not.
pub fn adds_bos_token(g: &GgufFile) -> bool {
    bool_key(g, "tokenizer.ggml.add_bos_token")
        .unwrap_or_else(|| g.get_str("tokenizer.ggml.model") == Some("llama"))
}

/// A whole `tokenizer.json` around `model` (no truncation, padding or post-processing:
/// the engine adds BOS itself, see `Tokenizer::encode_prompt`).
fn document(vocab: &Vocab, normalizer: Json, pre: Json, model: Json, decoder: Json) -> Json {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(),
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": decoder,
        "model": model,
    })
}

fn missing(g: &GgufFile, key: &str) -> Error {
    Error::invalid_file(g.path(), format!("{key} is missing or malformed"))
}

fn bool_key(g: &GgufFile, key: &str) -> Option<bool> {
    value_as_u64(g.get(key)?).map(|v| v != 0)
}

/// The items of an array value, each read by `item`; None if any is not readable.
fn array_of<'a, T>(v: Option<&'a Value>, item: impl Fn(&'a Value) -> Option<T>) -> Option<Vec<T>> {
    match v? {
        Value::Array(items) => items.iter().map(item).collect(),
        _ => None,
    }
}

fn strings(v: Option<&Value>) -> Option<Vec<&str>> {
    array_of(v, |i| match i {
        Value::String(s) => Some(s.as_str()),
        _ => None,
    })
}

/// Token types: small non-negative integers of any integer type.
fn ints(v: Option<&Value>) -> Option<Vec<i64>> {
    array_of(v, |i| value_as_u64(i).and_then(|x| i64::try_from(x).ok()))
}

fn floats(v: Option<&Value>) -> Option<Vec<f32>> {
    array_of(v, |i| match *i {
        Value::F32(x) => Some(x),
        Value::F64(x) => Some(x as f32),
        _ => None,
    })
}

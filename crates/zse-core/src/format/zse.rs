//! The `.zse` file: a GGUF container (llama.cpp can read it) plus `zse.*` keys that
//! hold everything the engine needs besides tensors — the architecture config, the
//! HF `tokenizer.json`, the chat template, special token ids and provenance.

use std::path::Path;

use candle_core::quantized::{gguf_file::Value, QTensor};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::gguf::{value_as_u64, GgufFile};
use crate::error::{Error, Result};
use crate::kernels::weights::QWeight;
use crate::model::ModelConfig;
use crate::model::{RawTensor, TensorSource};

/// The metadata keys ZSE adds to a GGUF container.
pub mod keys {
    pub const FORMAT_VERSION: &str = "zse.format_version";
    pub const CONFIG: &str = "zse.config";
    pub const TOKENIZER_JSON: &str = "zse.tokenizer_json";
    pub const CHAT_TEMPLATE: &str = "zse.chat_template";
    pub const BOS_TOKEN_ID: &str = "zse.bos_token_id";
    /// Bool: prompts start with BOS (files from before it was written: no).
    pub const ADD_BOS_TOKEN: &str = "zse.add_bos_token";
    pub const EOS_TOKEN_IDS: &str = "zse.eos_token_ids";
    pub const QUANTIZATION: &str = "zse.quantization";
    pub const SOURCE_NAME: &str = "zse.source.name";
    pub const SOURCE_SHA256: &str = "zse.source.sha256";
    /// JSON object: each tensor's block type in the source (`zse info` shows it).
    pub const SOURCE_TENSOR_TYPES: &str = "zse.source.tensor_types";
    /// `format::convert::CONVERTER_REVISION` of the converter that wrote the file.
    pub const CONVERTER_REVISION: &str = "zse.converter_revision";
    pub const ZSE_VERSION: &str = "zse.version";
    pub const MODEL_NAME: &str = "general.name";
}

pub const FORMAT_VERSION: u32 = 1;

/// Where a `.zse` file came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    pub source_name: String,
    pub source_sha256: String,
    pub zse_version: String,
    /// None for files written before converters recorded it.
    pub converter_revision: Option<u32>,
}

/// An opened, validated `.zse` file. Tensors stay in the memory map until loaded.
#[derive(Debug)]
pub struct ZseFile {
    gguf: GgufFile,
    pub config: ModelConfig,
    pub name: String,
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    /// Prompts start with BOS: the engine adds it where the text does not.
    pub add_bos_token: bool,
    pub eos_token_ids: Vec<u32>,
    pub quantization: String,
    pub provenance: Provenance,
}

impl ZseFile {
    pub fn open(path: &Path) -> Result<Self> {
        // The GGUF tokenizer's arrays, kept for llama.cpp's sake, are not what ZSE
        // reads (`zse.tokenizer_json` is): passed over, not built (Gemma 3's hold
        // 800k values, which would sit in memory beside the weights as they load).
        Self::from_gguf(GgufFile::open_without(path, |k| {
            k.starts_with("tokenizer.ggml.")
        })?)
    }

    /// A file held in memory (the fuzz target and tests), named `name` in errors.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        Self::from_gguf(GgufFile::from_bytes(name, bytes)?)
    }

    fn from_gguf(mut gguf: GgufFile) -> Result<Self> {
        let p = gguf.path().to_string();
        let version = gguf.get_u64(keys::FORMAT_VERSION).ok_or_else(|| {
            Error::invalid_file(&p, "this is a GGUF file but not a .zse file (no zse.* metadata); run `zse convert` on it first")
        })?;
        if version > FORMAT_VERSION as u64 {
            return Err(Error::invalid_file(
                &p,
                format!("format version {version} is newer than this ZSE reads ({FORMAT_VERSION}); upgrade zse"),
            ));
        }
        let need_str = |k: &str| -> Result<String> {
            gguf.get_str(k)
                .map(str::to_string)
                .ok_or_else(|| Error::invalid_file(&p, format!("{k} is missing")))
        };
        let config: ModelConfig = serde_json::from_str(&need_str(keys::CONFIG)?)
            .map_err(|e| Error::invalid_file(&p, format!("{} is malformed: {e}", keys::CONFIG)))?;
        config.validate()?;
        let eos_token_ids = match gguf.get(keys::EOS_TOKEN_IDS) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(value_as_u64)
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        };
        // Moved out rather than copied: it is megabytes for a large vocabulary.
        let tokenizer_json = match gguf.metadata.remove(keys::TOKENIZER_JSON) {
            Some(Value::String(s)) => s,
            _ => {
                return Err(Error::invalid_file(
                    &p,
                    format!("{} is missing", keys::TOKENIZER_JSON),
                ))
            }
        };
        let opt_str = |k: &str| gguf.get_str(k).map(str::to_string).unwrap_or_default();
        Ok(Self {
            config,
            name: gguf
                .get_str(keys::MODEL_NAME)
                .unwrap_or("model")
                .to_string(),
            tokenizer_json,
            chat_template: gguf.get_str(keys::CHAT_TEMPLATE).map(str::to_string),
            bos_token_id: gguf.get_u64(keys::BOS_TOKEN_ID).map(|v| v as u32),
            add_bos_token: matches!(gguf.get(keys::ADD_BOS_TOKEN), Some(Value::Bool(true))),
            eos_token_ids,
            quantization: opt_str(keys::QUANTIZATION),
            provenance: Provenance {
                source_name: opt_str(keys::SOURCE_NAME),
                source_sha256: opt_str(keys::SOURCE_SHA256),
                zse_version: opt_str(keys::ZSE_VERSION),
                converter_revision: gguf.get_u64(keys::CONVERTER_REVISION).map(|v| v as u32),
            },
            gguf,
        })
    }

    pub fn gguf(&self) -> &GgufFile {
        &self.gguf
    }

    /// Tensor count per (kind, block type, block type in the source, kernel), e.g.
    /// ("attn_q", "Q4_1", "Q4_1", Some(true)) -> 30, for `zse info`. The source's type
    /// is None where the file does not record it; `kernel` says for a matrix whether
    /// ZSE's CPU kernels run it (else candle's matmul does), None for a vector or an
    /// embedding table only looked up.
    pub fn tensor_types(&self) -> Vec<TensorTypeCount> {
        let untied = self.gguf.tensor_info("output.weight").is_some();
        let source: serde_json::Map<String, serde_json::Value> = self
            .gguf
            .get_str(keys::SOURCE_TENSOR_TYPES)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        type Key = (String, String, Option<String>, Option<bool>);
        let mut counts: std::collections::BTreeMap<Key, usize> = Default::default();
        for t in &self.gguf.tensors {
            let kind = t
                .name
                .split('.')
                .rev()
                .nth(1)
                .unwrap_or(&t.name)
                .to_string();
            let from = source
                .get(&t.name)
                .and_then(|v| v.as_str())
                .map(str::to_string);
            let lookup_only = untied && t.name == "token_embd.weight";
            let kernel = match t.shape.as_slice() {
                [_, cols] if !lookup_only => Some(QWeight::handles(t.dtype, *cols)),
                _ => None,
            };
            *counts
                .entry((kind, t.dtype.to_string(), from, kernel))
                .or_default() += 1;
        }
        counts
            .into_iter()
            .map(
                |((kind, dtype, source_dtype, kernel), count)| TensorTypeCount {
                    kind,
                    dtype,
                    source_dtype,
                    kernel,
                    count,
                },
            )
            .collect()
    }
}

/// One row of `ZseFile::tensor_types`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorTypeCount {
    pub kind: String,
    pub dtype: String,
    pub source_dtype: Option<String>,
    /// For a matrix: whether ZSE's CPU kernels run it.
    pub kernel: Option<bool>,
    pub count: usize,
}

/// Loads tensors from the memory map onto a device.
pub struct ZseTensors<'a> {
    pub file: &'a ZseFile,
    pub device: &'a Device,
}

impl TensorSource for ZseTensors<'_> {
    fn load(&self, name: &str) -> Result<Option<QTensor>> {
        if self.file.gguf.tensor_info(name).is_none() {
            return Ok(None);
        }
        self.file.gguf.qtensor(name, self.device).map(Some)
    }

    fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let gguf = &self.file.gguf;
        let info = gguf.tensor_info(name)?;
        Some(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            bytes: gguf.tensor_bytes(info),
            release: Box::new(move |range| gguf.release(info, range)),
        })
    }
}

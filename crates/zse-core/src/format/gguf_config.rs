//! A GGUF file's architecture description (the `{arch}.*` keys llama.cpp writes)
//! as a `ModelConfig`.

use super::gguf::GgufFile;
use crate::error::{Error, Result};
use crate::model::{architecture, ModelConfig};

/// Reads the config of a GGUF file of a supported architecture.
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g
        .get_str("general.architecture")
        .ok_or_else(|| Error::invalid_file(g.path(), "general.architecture is missing"))?
        .to_string();
    let spec = architecture(&arch)?;
    let need = |key: &str| -> Result<u64> {
        g.get_u64(&format!("{arch}.{key}"))
            .ok_or_else(|| Error::invalid_file(g.path(), format!("{arch}.{key} is missing")))
    };
    let hidden = need("embedding_length")? as usize;
    let heads = need("attention.head_count")? as usize;
    let kv_heads = g
        .get_u64(&format!("{arch}.attention.head_count_kv"))
        .unwrap_or(heads as u64);
    let embd = g
        .tensor_info("token_embd.weight")
        .ok_or_else(|| Error::invalid_file(g.path(), "tensor token_embd.weight is missing"))?;
    let head_dim = match g.get_u64(&format!("{arch}.attention.key_length")) {
        Some(d) => d as usize,
        None => hidden.checked_div(heads).unwrap_or(0),
    };
    // RoPE over part of each head (Phi-3.5, Phi-4-mini) is not implemented.
    if let Some(rotated) = g.get_u64(&format!("{arch}.rope.dimension_count")) {
        if rotated as usize != head_dim {
            return Err(Error::Unsupported(format!(
                "RoPE over {rotated} of each head's {head_dim} dimensions"
            )));
        }
    }
    let cfg = ModelConfig {
        rope_style: spec.rope_style,
        qkv_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
        qk_norm: g.tensor_info("blk.0.attn_q_norm.weight").is_some(),
        sliding_window: match spec.sliding_window {
            true => g
                .get_u64(&format!("{arch}.attention.sliding_window"))
                .map(|w| w as usize),
            false => None,
        },
        sliding_window_pattern: g
            .get_u64(&format!("{arch}.attention.sliding_window_pattern"))
            .map(|n| n as usize),
        rope_theta_swa: g
            .get_f64(&format!("{arch}.rope.freq_base_swa"))
            .map(|b| b as f32),
        tied_embeddings: g.tensor_info("output.weight").is_none(),
        vocab_size: embd.shape[0],
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")? as usize,
        num_layers: need("block_count")? as usize,
        num_heads: heads,
        num_kv_heads: kv_heads as usize,
        head_dim,
        rope_theta: g
            .get_f64(&format!("{arch}.rope.freq_base"))
            .unwrap_or(10_000.0) as f32,
        rms_norm_eps: g
            .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5) as f32,
        context_length: need("context_length")? as usize,
        architecture: arch,
    };
    cfg.validate()?;
    Ok(cfg)
}

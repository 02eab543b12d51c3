//! The architecture description every model file carries (`zse.config`), and the
//! translation from a HF `config.json` into it (GGUF's keys: `format::gguf_config`).

use serde::{Deserialize, Serialize};

use super::architecture;
use crate::error::{Error, Result};
pub use crate::kernels::elementwise::RopeStyle;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// GGUF architecture name, a key of `model::ARCHITECTURES`: `llama` (Llama,
    /// Mistral, SmolLM), `qwen2` or `qwen3`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f32,
    pub context_length: usize,
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head (Qwen3); absent from files made before it.
    #[serde(default)]
    pub qk_norm: bool,
    pub tied_embeddings: bool,
    /// Sliding-window attention over this many positions (Mistral); absent from
    /// files made before it.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Gemma 3: every this-many-th layer attends globally, the others within the
    /// window (llama.cpp's default 6).
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: the RoPE base of the windowed layers (llama.cpp's default 10000).
    #[serde(default)]
    pub rope_theta_swa: Option<f32>,
}

impl ModelConfig {
    /// Checks the numbers are coherent, so the model code can rely on them.
    pub fn validate(&self) -> Result<()> {
        architecture(&self.architecture)?;
        if self.sliding_window == Some(0) {
            return Err(Error::Unsupported("a sliding window of 0 positions".into()));
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("context_length", self.context_length),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Unsupported(format!("{name} is 0")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Unsupported(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Unsupported(format!(
                "odd head_dim {}",
                self.head_dim
            )));
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps > 0.0) {
            return Err(Error::Unsupported(
                "rope_theta and rms_norm_eps must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Reads a HF `config.json`.
    pub fn from_hf_config(json: &serde_json::Value) -> Result<Self> {
        let bad = |m: String| Error::Unsupported(format!("config.json: {m}"));
        let archs = json["architectures"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let hf_arch = archs.first().and_then(|a| a.as_str()).unwrap_or("");
        let arch = match hf_arch {
            "LlamaForCausalLM" | "MistralForCausalLM" => "llama",
            "Qwen2ForCausalLM" => "qwen2",
            other => {
                return Err(bad(format!(
                    "architecture '{other}' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
                )))
            }
        };
        let int = |k: &str| json[k].as_u64().map(|v| v as usize);
        let need = |k: &str| int(k).ok_or_else(|| bad(format!("'{k}' is missing")));
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let head_dim = int("head_dim").unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let cfg = ModelConfig {
            architecture: arch.to_string(),
            vocab_size: need("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need("intermediate_size")?,
            num_layers: need("num_hidden_layers")?,
            num_heads: heads,
            num_kv_heads: int("num_key_value_heads").unwrap_or(heads),
            head_dim,
            rope_theta: json["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
            rope_style: architecture(arch)?.rope_style,
            rms_norm_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            context_length: int("max_position_embeddings").unwrap_or(4096),
            qkv_bias: arch == "qwen2" || json["attention_bias"].as_bool().unwrap_or(false),
            qk_norm: false,
            sliding_window: match hf_arch {
                "MistralForCausalLM" => int("sliding_window"),
                _ => None,
            },
            sliding_window_pattern: None,
            rope_theta_swa: None,
            tied_embeddings: json["tie_word_embeddings"].as_bool().unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rough parameter count from the shapes (embeddings counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        let (h, f, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 };
        let attn = attn
            + if self.qk_norm {
                2 * self.head_dim as u64
            } else {
                0
            };
        let layer = attn + 3 * h * f + 2 * h;
        let head = if self.tied_embeddings { 0 } else { v * h };
        v * h + self.num_layers as u64 * layer + h + head
    }
}

/// Llama 3's frequency-dependent RoPE scaling, as one divisor per rotary pair
/// (llama.cpp stores the same numbers as the `rope_freqs.weight` tensor).
pub fn llama3_rope_factors(
    head_dim: usize,
    theta: f32,
    scaling: &serde_json::Value,
) -> Option<Vec<f32>> {
    let kind = scaling["rope_type"]
        .as_str()
        .or_else(|| scaling["type"].as_str())?;
    if kind != "llama3" {
        return None;
    }
    let factor = scaling["factor"].as_f64()? as f32;
    let low = scaling["low_freq_factor"].as_f64().unwrap_or(1.0) as f32;
    let high = scaling["high_freq_factor"].as_f64().unwrap_or(4.0) as f32;
    let original = scaling["original_max_position_embeddings"]
        .as_f64()
        .unwrap_or(8192.0) as f32;
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    Some(
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 256, "tie_word_embeddings": true
        })
    }

    #[test]
    fn hf_config_defaults() {
        let c = ModelConfig::from_hf_config(&hf()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_style, RopeStyle::Interleaved);
        assert!(!c.qkv_bias && c.tied_embeddings);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let mut j = hf();
        j["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        assert!(ModelConfig::from_hf_config(&j)
            .unwrap_err()
            .to_string()
            .contains("GPT2LMHeadModel"));
        let mut j = hf();
        j["num_key_value_heads"] = serde_json::json!(3);
        assert!(ModelConfig::from_hf_config(&j).is_err());
    }

    #[test]
    fn llama3_factors_span_one_to_factor() {
        let s = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let f = llama3_rope_factors(128, 500_000.0, &s).unwrap();
        assert_eq!(f[0], 1.0);
        assert_eq!(*f.last().unwrap(), 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
    }
}

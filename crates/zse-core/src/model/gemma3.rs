//! Gemma 3: embeddings scaled by √hidden; per layer RMSNorm, self-attention with
//! per-head q/k RMSNorm, an RMSNorm of its output, then RMSNorm, a GELU-gated MLP
//! and an RMSNorm of its output, each added to the residual. Five layers of six
//! attend within a sliding window with their own RoPE base; every sixth attends
//! globally (the file may set another pattern).

use candle_core::Tensor;

use super::blocks::{AttentionLayout, GatedMlp, SelfAttention};
use super::config::ModelConfig;
use super::ops::{Activation, AttentionShape, Ops, Step};
use super::rope::Rope;
use super::weights::Loader;
use super::{Architecture, Layers, RopeStyle, TensorShapes};
use crate::error::Result;
use crate::kv::KvPool;

pub const GEMMA3: Architecture = Architecture {
    name: "gemma3",
    rope_style: RopeStyle::Neox,
    sliding_window: true,
    tensors,
    load,
};

/// llama.cpp's defaults where the file does not say.
const PATTERN: usize = 6;
const ROPE_THETA_SWA: f32 = 10_000.0;

/// Whether layer `i` attends within the window (llama.cpp's `set_swa_pattern`).
fn windowed(c: &ModelConfig, i: usize) -> bool {
    let n = c.sliding_window_pattern.unwrap_or(PATTERN);
    c.sliding_window.is_some() && (n == 0 || i % n < n - 1)
}

fn layout(c: &ModelConfig, i: usize) -> AttentionLayout {
    AttentionLayout {
        shape: AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window.filter(|_| windowed(c, i)),
        },
        hidden: c.hidden_size,
        qkv_bias: false,
        qk_norm: true,
        fused_qkv: false,
    }
}

const NORMS: [&str; 4] = [
    "attn_norm",
    "post_attention_norm",
    "ffn_norm",
    "post_ffw_norm",
];

fn tensors(c: &ModelConfig) -> TensorShapes {
    let h = c.hidden_size;
    let mut out = Vec::new();
    for i in 0..c.num_layers {
        let p = format!("blk.{i}");
        out.extend(NORMS.map(|n| (format!("{p}.{n}.weight"), vec![h])));
        out.extend(SelfAttention::tensors(&p, layout(c, i)));
        out.extend(GatedMlp::tensors(&p, h, c.intermediate_size, false));
    }
    out
}

struct Layer {
    /// attn_norm, post_attention_norm, ffn_norm, post_ffw_norm.
    norms: [Tensor; 4],
    attn: SelfAttention,
    mlp: GatedMlp,
    windowed: bool,
}

struct Gemma3 {
    layers: Vec<Layer>,
    global: Rope,
    local: Rope,
    eps: f32,
    embed_scale: f64,
}

fn load(c: &ModelConfig, l: &Loader<'_>, max_positions: usize) -> Result<Box<dyn Layers>> {
    let h = c.hidden_size;
    let layers = (0..c.num_layers)
        .map(|i| {
            let p = format!("blk.{i}");
            let norm = |n: &str| l.vector(&format!("{p}.{n}.weight"), h);
            Ok(Layer {
                norms: [
                    norm(NORMS[0])?,
                    norm(NORMS[1])?,
                    norm(NORMS[2])?,
                    norm(NORMS[3])?,
                ],
                attn: SelfAttention::load(l, &p, layout(c, i))?,
                mlp: GatedMlp::load(l, &p, h, c.intermediate_size, Activation::GeluTanh, false)?,
                windowed: windowed(c, i),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rope = |theta: f32| {
        Rope::new(
            c.head_dim,
            theta,
            None,
            c.rope_style,
            max_positions,
            l.device(),
        )
    };
    Ok(Box::new(Gemma3 {
        layers,
        global: rope(c.rope_theta)?,
        local: rope(c.rope_theta_swa.unwrap_or(ROPE_THETA_SWA))?,
        eps: c.rms_norm_eps,
        // llama.cpp scales by sqrtf(n_embd), an f32.
        embed_scale: f64::from((h as f32).sqrt()),
    }))
}

impl Layers for Gemma3 {
    fn forward(&self, ops: &dyn Ops, x: Tensor, step: &Step<'_>, pool: &KvPool) -> Result<Tensor> {
        let mut x = (x * self.embed_scale)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let [attn_norm, post_attn, ffn_norm, post_ffn] = &layer.norms;
            let rope = if layer.windowed {
                &self.local
            } else {
                &self.global
            };
            let h = ops.rms_norm(&x, attn_norm, self.eps)?;
            let a = layer.attn.forward(ops, i, &h, rope, self.eps, step, pool)?;
            x = ops.add(&x, &ops.rms_norm(&a, post_attn, self.eps)?)?;
            let h = ops.rms_norm(&x, ffn_norm, self.eps)?;
            let m = layer.mlp.forward(ops, &h)?;
            x = ops.add(&x, &ops.rms_norm(&m, post_ffn, self.eps)?)?;
        }
        Ok(x)
    }

    fn blocks(&self) -> Vec<(&SelfAttention, &GatedMlp)> {
        self.layers.iter().map(|l| (&l.attn, &l.mlp)).collect()
    }
}

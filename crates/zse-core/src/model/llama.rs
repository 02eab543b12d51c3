//! The Llama family: Llama (and Mistral and SmolLM, stored as `llama`), Qwen2 (q/k/v
//! biases) and Qwen3 (per-head q/k RMSNorm, no biases). Each layer is a pre-norm
//! residual block of self-attention then a SwiGLU feed-forward network. Files that
//! store the same layers with fused projections (Phi-3) load through `load_stored`.

use candle_core::Tensor;

use super::blocks::{AttentionLayout, GatedMlp, SelfAttention};
use super::config::ModelConfig;
use super::ops::{Activation, AttentionShape, Ops, Step};
use super::rope::Rope;
use super::weights::Loader;
use super::{Architecture, Layers, TensorShapes, ROPE_FREQS};
use crate::error::{Error, Result};
use crate::kernels::elementwise::RopeStyle;
use crate::kv::KvPool;

pub const LLAMA: Architecture = Architecture {
    name: "llama",
    rope_style: RopeStyle::Interleaved,
    sliding_window: true,
    tensors,
    load,
};

pub const QWEN2: Architecture = Architecture {
    name: "qwen2",
    rope_style: RopeStyle::Neox,
    sliding_window: false,
    tensors,
    load,
};

pub const QWEN3: Architecture = Architecture {
    name: "qwen3",
    rope_style: RopeStyle::Neox,
    sliding_window: false,
    tensors,
    load,
};

struct Layer {
    attn_norm: Tensor,
    attn: SelfAttention,
    ffn_norm: Tensor,
    mlp: GatedMlp,
}

struct Llama {
    layers: Vec<Layer>,
    rope: Rope,
    eps: f32,
}

/// How a file of the family stores its projections: q/k/v as one matrix
/// (`attn_qkv`), gate and up as one (`ffn_up`, gate first), or each on its own.
#[derive(Debug, Clone, Copy)]
pub(super) struct Storage {
    pub fused_qkv: bool,
    pub fused_gate_up: bool,
}

const SEPARATE: Storage = Storage {
    fused_qkv: false,
    fused_gate_up: false,
};

fn layout(c: &ModelConfig, s: Storage) -> AttentionLayout {
    AttentionLayout {
        shape: AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        },
        hidden: c.hidden_size,
        qkv_bias: c.qkv_bias,
        qk_norm: c.qk_norm,
        fused_qkv: s.fused_qkv,
    }
}

fn tensors(c: &ModelConfig) -> TensorShapes {
    tensors_stored(c, SEPARATE)
}

fn load(c: &ModelConfig, l: &Loader<'_>, max_positions: usize) -> Result<Box<dyn Layers>> {
    load_stored(c, l, max_positions, SEPARATE)
}

pub(super) fn tensors_stored(c: &ModelConfig, s: Storage) -> TensorShapes {
    let h = c.hidden_size;
    let mut out = Vec::new();
    for i in 0..c.num_layers {
        let p = format!("blk.{i}");
        out.push((format!("{p}.attn_norm.weight"), vec![h]));
        out.extend(SelfAttention::tensors(&p, layout(c, s)));
        out.push((format!("{p}.ffn_norm.weight"), vec![h]));
        out.extend(GatedMlp::tensors(
            &p,
            h,
            c.intermediate_size,
            s.fused_gate_up,
        ));
    }
    out
}

pub(super) fn load_stored(
    c: &ModelConfig,
    l: &Loader<'_>,
    max_positions: usize,
    s: Storage,
) -> Result<Box<dyn Layers>> {
    let h = c.hidden_size;
    let f = c.intermediate_size;
    let layers = (0..c.num_layers)
        .map(|i| {
            let p = format!("blk.{i}");
            Ok(Layer {
                attn_norm: l.vector(&format!("{p}.attn_norm.weight"), h)?,
                attn: SelfAttention::load(l, &p, layout(c, s))?,
                ffn_norm: l.vector(&format!("{p}.ffn_norm.weight"), h)?,
                mlp: GatedMlp::load(l, &p, h, f, Activation::Silu, s.fused_gate_up)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Llama 3's scaled frequencies, where the file has them.
    let factors = l.optional_values(ROPE_FREQS)?;
    if let Some(f) = &factors {
        if f.len() != c.head_dim / 2 {
            return Err(Error::Unsupported(format!(
                "{ROPE_FREQS} has {} entries, expected {}",
                f.len(),
                c.head_dim / 2
            )));
        }
    }
    let rope = Rope::new(
        c.head_dim,
        c.rope_theta,
        factors.as_deref(),
        c.rope_style,
        max_positions,
        l.device(),
    )?;
    Ok(Box::new(Llama {
        layers,
        rope,
        eps: c.rms_norm_eps,
    }))
}

impl Layers for Llama {
    fn forward(
        &self,
        ops: &dyn Ops,
        mut x: Tensor,
        step: &Step<'_>,
        pool: &KvPool,
    ) -> Result<Tensor> {
        for (i, layer) in self.layers.iter().enumerate() {
            let h = ops.rms_norm(&x, &layer.attn_norm, self.eps)?;
            let a = layer
                .attn
                .forward(ops, i, &h, &self.rope, self.eps, step, pool)?;
            x = ops.add(&x, &a)?;
            let h = ops.rms_norm(&x, &layer.ffn_norm, self.eps)?;
            x = ops.add(&x, &layer.mlp.forward(ops, &h)?)?;
        }
        Ok(x)
    }

    fn blocks(&self) -> Vec<(&SelfAttention, &GatedMlp)> {
        self.layers.iter().map(|l| (&l.attn, &l.mlp)).collect()
    }
}

//! The blocks architectures share: self-attention over the KV pool and the gated
//! feed-forward network, each loaded from llama.cpp's tensor names and run on any
//! backend's operations.

use candle_core::Tensor;

use super::ops::{Activation, AttentionShape, Ops, Step};
use super::rope::Rope;
use super::weights::{Loader, Projections, Weight};
use super::TensorShapes;
use crate::error::{Error, Result};
use crate::kv::KvPool;

/// How one architecture's attention block is laid out in its file.
#[derive(Debug, Clone, Copy)]
pub struct AttentionLayout {
    pub shape: AttentionShape,
    pub hidden: usize,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// q, k and v stored as one matrix, `attn_qkv` (Phi-3).
    pub fused_qkv: bool,
}

/// Self-attention: q/k/v projections, optional per-head q/k norms, RoPE, causal
/// attention over the sequence's cache, output projection.
pub struct SelfAttention {
    qkv: Projections,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o: Weight,
    shape: AttentionShape,
}

impl SelfAttention {
    pub fn shape(&self) -> AttentionShape {
        self.shape
    }

    /// Layer `prefix`'s tensors (`blk.N`).
    pub fn load(l: &Loader<'_>, prefix: &str, layout: AttentionLayout) -> Result<Self> {
        let s = layout.shape;
        let (h, qw, kvw) = (layout.hidden, s.q_width(), s.kv_width());
        let widths = vec![qw, kvw, kvw];
        let qkv = if layout.fused_qkv {
            let name = format!("{prefix}.attn_qkv");
            let bias = l.bias(&name, qw + 2 * kvw, layout.qkv_bias)?;
            let biases = match bias {
                Some(b) => vec![
                    Some(b.narrow(0, 0, qw)?),
                    Some(b.narrow(0, qw, kvw)?),
                    Some(b.narrow(0, qw + kvw, kvw)?),
                ],
                None => vec![None, None, None],
            };
            Projections::fused(l.matrix(&name, qw + 2 * kvw, h)?, widths, biases)
        } else {
            let names = ["attn_q", "attn_k", "attn_v"].map(|n| format!("{prefix}.{n}"));
            let mut weights = Vec::with_capacity(3);
            let mut biases = Vec::with_capacity(3);
            for (name, &w) in names.iter().zip(&widths) {
                weights.push(l.matrix(name, w, h)?);
                biases.push(l.bias(name, w, layout.qkv_bias)?);
            }
            Projections::new(weights, widths, biases)?
        };
        let norm = |n: &str| -> Result<Option<Tensor>> {
            layout
                .qk_norm
                .then(|| l.vector(&format!("{prefix}.{n}.weight"), s.head_dim))
                .transpose()
        };
        Ok(Self {
            qkv,
            q_norm: norm("attn_q_norm")?,
            k_norm: norm("attn_k_norm")?,
            o: l.matrix(&format!("{prefix}.attn_output"), h, qw)?,
            shape: s,
        })
    }

    /// The tensors `load` reads, with their shapes (candle order).
    pub fn tensors(prefix: &str, layout: AttentionLayout) -> TensorShapes {
        let s = layout.shape;
        let (h, qw, kvw) = (layout.hidden, s.q_width(), s.kv_width());
        let mut out = Vec::new();
        let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{prefix}.{name}"), shape));
        if layout.fused_qkv {
            add("attn_qkv.weight", vec![qw + 2 * kvw, h]);
            if layout.qkv_bias {
                add("attn_qkv.bias", vec![qw + 2 * kvw]);
            }
        } else {
            for (n, w) in [("attn_q", qw), ("attn_k", kvw), ("attn_v", kvw)] {
                add(&format!("{n}.weight"), vec![w, h]);
                if layout.qkv_bias {
                    add(&format!("{n}.bias"), vec![w]);
                }
            }
        }
        if layout.qk_norm {
            add("attn_q_norm.weight", vec![s.head_dim]);
            add("attn_k_norm.weight", vec![s.head_dim]);
        }
        add("attn_output.weight", vec![h, qw]);
        out
    }

    /// Its weight matrices.
    pub fn weights(&self) -> impl Iterator<Item = &Weight> {
        self.qkv.weights().iter().chain([&self.o])
    }

    /// Matrices the q/k/v projections run as (one where stacked).
    pub fn qkv_matrices(&self) -> usize {
        self.qkv.matrices()
    }

    /// `x: [tokens, hidden]` (normed) -> `[tokens, hidden]`, the step's keys and
    /// values stored in layer `layer` of `pool`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ops: &dyn Ops,
        layer: usize,
        x: &Tensor,
        rope: &Rope,
        eps: f32,
        step: &Step<'_>,
        pool: &KvPool,
    ) -> Result<Tensor> {
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| Error::Compute("q/k/v projections".into()))?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (ops.rms_norm(&q, qn, eps)?, ops.rms_norm(&k, kn, eps)?),
            _ => (q, k),
        };
        let q = ops.rope(&q, rope, step)?;
        let k = ops.rope(&k, rope, step)?;
        let att = ops.attention(layer, &q, &k, &v, self.shape, step, pool)?;
        self.o.forward(&att)
    }
}

/// The gated feed-forward network: `down(act(gate(x)) * up(x))`.
pub struct GatedMlp {
    gate_up: Projections,
    down: Weight,
    act: Activation,
}

impl GatedMlp {
    /// `ffn_gate` and `ffn_up`, or (`fused`, Phi-3) one `ffn_up` holding gate then
    /// up; `ffn_down`.
    pub fn load(
        l: &Loader<'_>,
        prefix: &str,
        hidden: usize,
        width: usize,
        act: Activation,
        fused: bool,
    ) -> Result<Self> {
        let gate_up = if fused {
            let w = l.matrix(&format!("{prefix}.ffn_up"), 2 * width, hidden)?;
            Projections::fused(w, vec![width, width], vec![None, None])
        } else {
            Projections::new(
                vec![
                    l.matrix(&format!("{prefix}.ffn_gate"), width, hidden)?,
                    l.matrix(&format!("{prefix}.ffn_up"), width, hidden)?,
                ],
                vec![width, width],
                vec![None, None],
            )?
        };
        Ok(Self {
            gate_up,
            down: l.matrix(&format!("{prefix}.ffn_down"), hidden, width)?,
            act,
        })
    }

    /// The tensors `load` reads, with their shapes (candle order).
    pub fn tensors(prefix: &str, hidden: usize, width: usize, fused: bool) -> TensorShapes {
        let mut out = Vec::new();
        if fused {
            out.push((format!("{prefix}.ffn_up.weight"), vec![2 * width, hidden]));
        } else {
            out.push((format!("{prefix}.ffn_gate.weight"), vec![width, hidden]));
            out.push((format!("{prefix}.ffn_up.weight"), vec![width, hidden]));
        }
        out.push((format!("{prefix}.ffn_down.weight"), vec![hidden, width]));
        out
    }

    /// Its weight matrices.
    pub fn weights(&self) -> impl Iterator<Item = &Weight> {
        self.gate_up.weights().iter().chain([&self.down])
    }

    /// `x: [tokens, hidden]` (normed) -> `[tokens, hidden]`.
    pub fn forward(&self, ops: &dyn Ops, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up.forward_joined(x)?;
        self.down.forward(&ops.gated(self.act, &gate_up)?)
    }
}

//! The operations a transformer layer needs, behind one interface with one
//! implementation per backend:
//!
//! - [`cpu`]: ZSE's kernels (`crate::kernels`): quantized matmul with its own repacked
//!   weights, llama.cpp's arithmetic for norms and activations, attention in place
//!   over the KV pool;
//! - [`candle`]: candle's operations, which is how a GPU runs; on the CPU it is chosen
//!   by name (`candle`), so that the GPU's code path is tested here.
//!
//! Activations are `[tokens, width]` row tensors between operations: every token of
//! a step (a prefill, a prefill chunk, a decode step, or a mix of them) goes through
//! each operation together, and every reduction is per row or per sequence, so a
//! sequence's results do not depend on what else is in the batch.

pub mod candle;
pub mod cpu;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use std::sync::Arc;

use super::rope::Rope;
use super::weights::Weight;
use super::BatchItem;
use crate::error::{Error, Result};
use crate::kernels::KernelPath;
use crate::kv::KvPool;

/// How the model computes: on the CPU with ZSE's kernels, or with candle's own
/// operations (a GPU's way, also runnable on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernels(KernelPath),
    Candle,
}

impl Backend {
    /// The backend for `device`: candle's on a GPU; on the CPU, what `choice` names
    /// (`candle`, or a kernel path for `KernelPath::parse`), else what the
    /// environment's `ZSE_CPU_KERNELS` names, else the best kernels this CPU runs.
    pub fn select(device: &Device, choice: Option<&str>) -> Result<Self> {
        let from_env = std::env::var("ZSE_CPU_KERNELS").ok();
        let choice = choice.or(from_env.as_deref()).unwrap_or("auto");
        if !device.is_cpu() || choice == "candle" {
            return Ok(Backend::Candle);
        }
        Ok(Backend::Kernels(KernelPath::parse(choice)?))
    }

    /// `generic`, `avx2` or `avx512` for ZSE's kernels, `candle` otherwise.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kernels(path) => path.name(),
            Backend::Candle => "candle",
        }
    }

    /// The operations of this backend on `device`.
    pub fn ops(self, device: &Device) -> Result<Box<dyn Ops>> {
        match self {
            Backend::Kernels(_) if !device.is_cpu() => Err(Error::invalid_argument(
                "backend",
                "ZSE's kernels run on the CPU only",
            )),
            Backend::Kernels(path) => Ok(Box::new(cpu::CpuOps::new(path))),
            Backend::Candle => Ok(Box::new(candle::CandleOps::new(device))),
        }
    }
}

/// The activation of a gated feed-forward block: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): the Llama family, Qwen, Phi-3, Mistral.
    Silu,
    /// GELU, tanh form (GeGLU): Gemma.
    GeluTanh,
}

/// One attention layer's shape, and how far back its queries see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window: a query at position p sees keys `p + 1 - window ..= p`.
    pub window: Option<usize>,
}

impl AttentionShape {
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// One forward pass's batch, laid out once for every layer: the tokens of all items
/// packed in item order, their positions, the cache slots their keys and values go
/// to, and what the backend prepared for itself.
pub struct Step<'a> {
    pub items: &'a [BatchItem<'a>],
    /// Token ids, packed.
    pub ids: Vec<u32>,
    /// Each token's position in its sequence.
    pub positions: Vec<u32>,
    /// Each token's cache slot, and its slot in the windowed layers' pool.
    pub new_slots: Vec<u32>,
    pub new_window_slots: Vec<u32>,
    /// Candle's index tensors, made by `CandleOps::begin`.
    candle: Option<candle::StepTensors>,
}

impl<'a> Step<'a> {
    /// Checks the items against the vocabulary and the context and packs them.
    fn new(items: &'a [BatchItem<'a>], vocab_size: usize, max_positions: usize) -> Result<Self> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut new_slots = Vec::new();
        let mut new_window_slots = Vec::new();
        for it in items {
            let end = it.past + it.tokens.len();
            if it.tokens.is_empty() {
                return Err(Error::invalid_argument(
                    "tokens",
                    "a batch item has no tokens",
                ));
            }
            if end > max_positions {
                return Err(Error::ContextLengthExceeded {
                    prompt_tokens: end,
                    context_length: max_positions,
                });
            }
            if it.slots.len() != end || it.window_slots.len() != end {
                return Err(Error::Compute(format!(
                    "{} and {} cache slots for {end} positions",
                    it.slots.len(),
                    it.window_slots.len()
                )));
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= vocab_size) {
                return Err(Error::invalid_argument(
                    "tokens",
                    format!("token id {bad} is outside the vocabulary"),
                ));
            }
            ids.extend_from_slice(it.tokens);
            positions.extend(it.past as u32..end as u32);
            new_slots.extend_from_slice(&it.slots[it.past..]);
            new_window_slots.extend_from_slice(&it.window_slots[it.past..]);
        }
        Ok(Self {
            items,
            ids,
            positions,
            new_slots,
            new_window_slots,
            candle: None,
        })
    }

    /// Tokens in the step.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// The new tokens' slots in the windowed layers' pool, or the others'.
    pub fn new_slots_for(&self, windowed: bool) -> &[u32] {
        if windowed {
            &self.new_window_slots
        } else {
            &self.new_slots
        }
    }
}

/// The operations, as one backend computes them. Activations are `[tokens, width]`.
pub trait Ops: Send + Sync {
    /// The backend these operations are.
    fn backend(&self) -> Backend;

    fn device(&self) -> &Device;

    /// A weight matrix (`[out, in]`, any GGML block type), held as this backend
    /// multiplies it.
    fn weight(&self, t: Arc<QTensor>) -> Result<Weight>;

    /// Packs a batch for a forward pass (`vocab_size` and `max_positions` bound its
    /// tokens and positions).
    fn begin<'a>(
        &self,
        items: &'a [BatchItem<'a>],
        vocab_size: usize,
        max_positions: usize,
    ) -> Result<Step<'a>>;

    /// RMSNorm of every run of `weight.len()` values of `x` (a row, or one head of
    /// a row), scaled by `weight`; the shape is kept.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor>;

    /// `x + y`, two activations of one shape: the residual stream's sum.
    fn add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor>;

    /// `act(gate) * up` of rows `[gate | up]` (`[tokens, 2 * width]`) ->
    /// `[tokens, width]`.
    fn gated(&self, act: Activation, gate_up: &Tensor) -> Result<Tensor>;

    /// `x: [tokens, heads * head_dim]`, each head rotated for its token's position.
    fn rope(&self, x: &Tensor, rope: &Rope, step: &Step<'_>) -> Result<Tensor>;

    /// Stores the step's keys and values (`k`, `v`: `[tokens, kv_width]`) in layer
    /// `layer` of `pool`, then computes each token's causal attention over its
    /// sequence's cache: `q: [tokens, q_width]` -> `[tokens, q_width]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
        step: &Step<'_>,
        pool: &KvPool,
    ) -> Result<Tensor>;
}

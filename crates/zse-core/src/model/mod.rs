//! Model architectures, on any backend.
//!
//! - [`ops`]: the operations a layer needs, one implementation per backend (ZSE's
//!   CPU kernels, candle's operations);
//! - [`weights`]: reading tensors, weight matrices, stacked projections;
//! - [`rope`]: rotary embedding tables;
//! - [`blocks`]: blocks architectures share (self-attention, gated MLP);
//! - one file per architecture family ([`llama`]: Llama, Mistral, Qwen2, Qwen3;
//!   [`phi3`]: the same layers with fused projections; [`gemma3`]), each an
//!   [`Architecture`] in [`ARCHITECTURES`], keyed by GGUF's `general.architecture`;
//! - [`Model`]: what the engine runs: embedding, an architecture's layers, the
//!   output norm and head.
//!
//! A new architecture is a file here that lists its tensors and loads and runs its
//! layers from the shared blocks, plus its entry in `ARCHITECTURES` and the GGUF keys
//! of its config (`format::gguf_config`).

pub mod blocks;
pub mod config;
pub mod gemma3;
pub mod llama;
pub mod ops;
pub mod phi3;
pub mod rope;
pub mod weights;

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

pub use config::{ModelConfig, RopeStyle};
pub use ops::{Backend, Ops, Step};
pub use weights::{RawTensor, TensorSource};

use crate::error::{Error, Result};
use crate::kv::KvPool;
use blocks::{GatedMlp, SelfAttention};
use weights::{Loader, Weight};

/// Tensor names with their shapes (candle order).
pub type TensorShapes = Vec<(String, Vec<usize>)>;

/// One architecture: its name in GGUF files, the tensors it has, and how its layers
/// load.
pub struct Architecture {
    /// `general.architecture`.
    pub name: &'static str,
    /// How its files pair the dimensions RoPE rotates.
    pub rope_style: RopeStyle,
    /// Whether a file's `{arch}.attention.sliding_window` applies to every layer
    /// (Mistral's files are `llama`; llama.cpp leaves Phi-3's window off, and so
    /// does ZSE, to compute what it computes).
    pub sliding_window: bool,
    /// Every tensor of its layers a model with this config has, with its shape
    /// (candle order); the embedding, output norm and head are common to all.
    pub tensors: fn(&ModelConfig) -> TensorShapes,
    /// Its layers, loaded, with RoPE tables for `max_positions` positions.
    pub load: fn(&ModelConfig, &Loader<'_>, usize) -> Result<Box<dyn Layers>>,
}

/// Every architecture ZSE runs.
pub const ARCHITECTURES: &[Architecture] = &[
    llama::LLAMA,
    llama::QWEN2,
    llama::QWEN3,
    phi3::PHI3,
    gemma3::GEMMA3,
];

/// The architecture named `name`, or an error listing the supported ones.
pub fn architecture(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
            Error::Unsupported(format!(
                "architecture '{name}' (supported: {})",
                names.join(", ")
            ))
        })
}

/// An architecture's layers, between the embedding and the output norm.
pub trait Layers: Send + Sync {
    /// `x: [tokens, hidden]` (the step's embeddings) through every layer, storing
    /// each layer's keys and values in `pool`.
    fn forward(&self, ops: &dyn Ops, x: Tensor, step: &Step<'_>, pool: &KvPool) -> Result<Tensor>;

    /// Each layer's attention and feed-forward blocks, which hold its matrices.
    fn blocks(&self) -> Vec<(&SelfAttention, &GatedMlp)>;

    /// Every layer's weight matrices.
    fn weights(&self) -> Vec<&Weight> {
        (self.blocks().into_iter())
            .flat_map(|(attn, mlp)| attn.weights().chain(mlp.weights()))
            .collect()
    }

    /// Bytes of weight matrices held.
    fn size_bytes(&self) -> usize {
        self.weights().into_iter().map(Weight::size_bytes).sum()
    }

    /// Per layer, how many matrices its q/k/v projections run as (1 where stacked).
    fn qkv_matrices(&self) -> Vec<usize> {
        (self.blocks().iter())
            .map(|(attn, _)| attn.qkv_matrices())
            .collect()
    }
}

/// Optional tensor: Llama 3 RoPE frequency divisors.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// One sequence's part in a forward pass.
pub struct BatchItem<'a> {
    /// The tokens at positions `past..past + tokens.len()`.
    pub tokens: &'a [u32],
    /// Positions already in the cache.
    pub past: usize,
    /// The cache slot of every position `0..past + tokens.len()`.
    pub slots: &'a [u32],
    /// The same in the windowed layers' pool (`KvPool::is_windowed`); `slots` where
    /// the pool has no such layers.
    pub window_slots: &'a [u32],
    pub logits: Logits,
}

impl<'a> BatchItem<'a> {
    /// An item whose positions have the same slots in both pools (a cache made for it
    /// alone, where nothing is freed: scoring, tests).
    pub fn same_slots(tokens: &'a [u32], past: usize, slots: &'a [u32], logits: Logits) -> Self {
        Self {
            tokens,
            past,
            slots,
            window_slots: slots,
            logits,
        }
    }

    /// Its slots in the windowed layers' pool, or the others'.
    pub fn slots_for(&self, windowed: bool) -> &'a [u32] {
        if windowed {
            self.window_slots
        } else {
            self.slots
        }
    }
}

/// Which positions of a batch item need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that does not end the prompt).
    None,
    /// The last position (generation).
    Last,
    /// Every position (scoring).
    All,
}

/// Every tensor a model with this config has, with its shape (candle order). The
/// loader and the converter both check files against this one table.
pub fn expected_tensors(c: &ModelConfig) -> Result<TensorShapes> {
    let arch = architecture(&c.architecture)?;
    let (h, v) = (c.hidden_size, c.vocab_size);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![v, h]),
        ("output_norm.weight".to_string(), vec![h]),
    ];
    if !c.tied_embeddings {
        out.push(("output.weight".to_string(), vec![v, h]));
    }
    out.extend((arch.tensors)(c));
    Ok(out)
}

/// Checks a list of (name, shape) against the config: every expected tensor present
/// with its shape, nothing unexpected.
pub fn check_tensor_set(c: &ModelConfig, found: &[(String, Vec<usize>)]) -> Result<()> {
    let expected_list = expected_tensors(c)?;
    let expected: HashMap<_, _> = expected_list.iter().cloned().collect();
    for (name, shape) in found {
        match expected.get(name) {
            Some(want) if want != shape => {
                return Err(Error::Unsupported(format!(
                    "tensor '{name}' has shape {shape:?}, expected {want:?}"
                )))
            }
            Some(_) => {}
            None if name == ROPE_FREQS && shape == &vec![c.head_dim / 2] => {}
            None => {
                return Err(Error::Unsupported(format!(
                    "unexpected tensor '{name}' with shape {shape:?}"
                )))
            }
        }
    }
    let have: HashSet<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    if let Some((missing, _)) = expected_list
        .iter()
        .find(|(n, _)| !have.contains(n.as_str()))
    {
        return Err(Error::Unsupported(format!("tensor '{missing}' is missing")));
    }
    Ok(())
}

/// A model ready to run: the token embedding, an architecture's layers, the output
/// norm and head, on one backend's operations.
pub struct Model {
    config: ModelConfig,
    ops: Box<dyn Ops>,
    /// The token embedding; None when it is the output head's weights (tied
    /// embeddings), which serve the lookup too instead of a second copy.
    embed: Option<Weight>,
    layers: Box<dyn Layers>,
    output_norm: Tensor,
    lm_head: Weight,
    max_positions: usize,
    /// Storage type of the KV cache.
    kv_dtype: DType,
}

impl Model {
    /// Builds the model from `src`, checking every tensor's presence and shape.
    /// `max_positions` bounds the RoPE tables (the serving context length); the
    /// backend comes from `Backend::select`.
    pub fn load(
        config: &ModelConfig,
        src: &dyn TensorSource,
        max_positions: usize,
        kv_dtype: DType,
        device: &Device,
        backend: Backend,
    ) -> Result<Self> {
        config.validate()?;
        if !matches!(kv_dtype, DType::F16 | DType::F32) {
            return Err(Error::invalid_argument(
                "kv_dtype",
                format!("{kv_dtype:?} (expected F16 or F32)"),
            ));
        }
        let arch = architecture(&config.architecture)?;
        let ops = backend.ops(device)?;
        let l = Loader {
            src,
            ops: ops.as_ref(),
        };
        let (h, v) = (config.hidden_size, config.vocab_size);
        let layers = (arch.load)(config, &l, max_positions)?;
        let embed = l.matrix("token_embd", v, h)?;
        let (embed, lm_head) = if config.tied_embeddings {
            (None, embed)
        } else {
            (Some(embed), l.matrix("output", v, h)?)
        };
        let output_norm = l.vector("output_norm.weight", h)?;
        Ok(Self {
            config: config.clone(),
            ops,
            embed,
            layers,
            output_norm,
            lm_head,
            max_positions,
            kv_dtype,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How the model computes, chosen at load.
    pub fn backend(&self) -> Backend {
        self.ops.backend()
    }

    /// Bytes of weight matrices held (a decode step reads all of them; norms and
    /// biases are too small to count).
    pub fn weight_bytes(&self) -> usize {
        // The embedding is read a row per token, but held all the same.
        self.lm_head.size_bytes()
            + self.embed.as_ref().map_or(0, Weight::size_bytes)
            + self.layers.size_bytes()
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Where the model runs on ZSE's kernels: the matrices they do not run (candle's
    /// matmul does, far slower), counted by block type. Empty on candle's backend,
    /// which runs every matrix by choice.
    pub fn matrices_without_kernel(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        if self.backend() == Backend::Candle {
            return counts;
        }
        let matrices = self.layers.weights().into_iter().chain([&self.lm_head]);
        for dtype in matrices.filter_map(Weight::without_kernel) {
            *counts.entry(dtype).or_default() += 1;
        }
        counts
    }

    /// Each layer's sliding window, where it has one.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        (self.layers.blocks().iter())
            .map(|(attn, _)| attn.shape().window)
            .collect()
    }

    /// A KV pool of `num_blocks` blocks of `block_size` positions for the layers
    /// that see every earlier position, and `window_blocks` for those that see a
    /// window, in the cache precision chosen at load.
    pub fn new_kv_pool(
        &self,
        num_blocks: usize,
        window_blocks: usize,
        block_size: usize,
    ) -> Result<KvPool> {
        let c = &self.config;
        let windowed: Vec<bool> = self.layer_windows().iter().map(Option::is_some).collect();
        KvPool::new(
            &windowed,
            num_blocks,
            window_blocks,
            block_size,
            c.num_kv_heads * c.head_dim,
            self.kv_dtype,
            self.ops.device(),
        )
    }

    /// Runs one step for a batch of sequences, storing their new keys and values in
    /// `pool`, and returns per item the logits it asked for (`[n, vocab]`, in CPU
    /// memory). All tokens of the batch go through the weight matmuls together;
    /// only attention runs per sequence.
    pub fn forward(&self, items: &[BatchItem<'_>], pool: &KvPool) -> Result<Vec<Option<Tensor>>> {
        let ops = self.ops.as_ref();
        let step = ops.begin(items, self.config.vocab_size, self.max_positions)?;
        let table = self.embed.as_ref().unwrap_or(&self.lm_head);
        let x = table.rows(&step.ids, ops.device())?;
        let x = self.layers.forward(ops, x, &step, pool)?;
        // Only the rows whose logits are wanted go through the (large) output head.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        let mut off = 0u32;
        for it in items {
            let n = it.tokens.len() as u32;
            let wanted = match it.logits {
                Logits::None => 0..0,
                Logits::Last => off + n - 1..off + n,
                Logits::All => off..off + n,
            };
            counts.push(wanted.len());
            rows.extend(wanted);
            off += n;
        }
        if rows.is_empty() {
            return Ok(vec![None; items.len()]);
        }
        let rows_t = Tensor::from_vec(rows, counts.iter().sum::<usize>(), ops.device())?;
        let x = x.index_select(&rows_t, 0)?;
        let x = ops.rms_norm(&x, &self.output_norm, self.config.rms_norm_eps)?;
        // Sampling runs on the CPU: one copy of every row from a GPU, not one per row.
        let logits = self
            .lm_head
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut start = 0;
        for n in counts {
            out.push((n > 0).then(|| logits.narrow(0, start, n)).transpose()?);
            start += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;

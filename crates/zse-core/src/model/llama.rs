//! The Llama-family transformer on candle: token embedding, RMSNorm, RoPE, grouped-
//! query attention, SwiGLU MLP, tied or separate output head, optional q/k/v biases.
//!
//! `forward` takes a batch of sequences, each with its new tokens, the number of
//! positions already in its KV cache, and the cache slots of all its positions (the
//! block pool in `kv`). All tokens of the batch go through the weight matmuls
//! together, packed into one `[tokens, hidden]` matrix; only attention runs per
//! sequence. A prefill, a prefill chunk, a decode step, or a mix are the same call.
//!
//! Every reduction is per row or per sequence (matmul rows, norms, one sequence's
//! attention), so a sequence's results do not depend on what else is in the batch.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::attention::{paged_attention, Heads, SeqAttn};
use super::config::{ModelConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::kernels::{KernelPath, QWeight};
use crate::kv::KvPool;

/// Where the model reads its tensors from (a `.zse` file, or a test's memory).
pub trait TensorSource {
    fn load(&self, name: &str) -> Result<Option<QTensor>>;
}

/// One sequence's part in a forward pass.
pub struct BatchItem<'a> {
    /// The tokens at positions `past..past + tokens.len()`.
    pub tokens: &'a [u32],
    /// Positions already in the cache.
    pub past: usize,
    /// The cache slot of every position `0..past + tokens.len()`.
    pub slots: &'a [u32],
    pub logits: Logits,
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

/// A weight matrix: ZSE's CPU kernels where they handle its block type (on the CPU),
/// candle's quantized matmul otherwise.
enum Weight {
    Kernel(QWeight, KernelPath),
    Candle(QMatMul),
}

impl Weight {
    fn new(t: Arc<QTensor>, device: &Device, path: KernelPath) -> Result<Self> {
        if device.is_cpu() {
            if let Some(w) = QWeight::from_qtensor(&t)? {
                return Ok(Weight::Kernel(w, path));
            }
        }
        Ok(Weight::Candle(QMatMul::from_arc(t)?))
    }

    /// `x: [tokens, in]` -> `[tokens, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Kernel(w, path) => {
                let m = x.dim(0)?;
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let y = w.matmul(&xs, m, *path);
                Ok(Tensor::from_vec(y, (m, w.rows), x.device())?)
            }
            Weight::Candle(q) => Ok(q.forward(x)?),
        }
    }
}

struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Llama {
    config: ModelConfig,
    device: Device,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    lm_head: Weight,
    /// `[max_positions, head_dim / 2]` tables for RoPE.
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    /// Storage type of the KV cache.
    kv_dtype: DType,
}

/// Every tensor a model with this config has, with its shape (candle order). The
/// loader and the converter both check files against this one table.
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![v, h]),
        ("output_norm.weight".to_string(), vec![h]),
    ];
    if !c.tied_embeddings {
        out.push(("output.weight".to_string(), vec![v, h]));
    }
    for i in 0..c.num_layers {
        let mut add = |name: &str, shape: Vec<usize>| out.push((format!("blk.{i}.{name}"), shape));
        add("attn_norm.weight", vec![h]);
        add("attn_q.weight", vec![q, h]);
        add("attn_k.weight", vec![kv, h]);
        add("attn_v.weight", vec![kv, h]);
        if c.qkv_bias {
            add("attn_q.bias", vec![q]);
            add("attn_k.bias", vec![kv]);
            add("attn_v.bias", vec![kv]);
        }
        add("attn_output.weight", vec![h, q]);
        add("ffn_norm.weight", vec![h]);
        add("ffn_gate.weight", vec![f, h]);
        add("ffn_up.weight", vec![f, h]);
        add("ffn_down.weight", vec![h, f]);
    }
    out
}

/// Optional tensors: Llama 3 RoPE frequency divisors.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Checks a list of (name, shape) against the config: every expected tensor present
/// with its shape, nothing unexpected.
pub fn check_tensor_set(c: &ModelConfig, found: &[(String, Vec<usize>)]) -> Result<()> {
    let expected: std::collections::HashMap<_, _> = expected_tensors(c).into_iter().collect();
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
    let have: std::collections::HashSet<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    if let Some((missing, _)) = expected_tensors(c)
        .iter()
        .find(|(n, _)| !have.contains(n.as_str()))
    {
        return Err(Error::Unsupported(format!("tensor '{missing}' is missing")));
    }
    Ok(())
}

fn load_checked(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<QTensor> {
    let t = src
        .load(name)?
        .ok_or_else(|| Error::Unsupported(format!("tensor '{name}' is missing")))?;
    if t.shape().dims() != shape {
        return Err(Error::Unsupported(format!(
            "tensor '{name}' has shape {:?}, expected {shape:?}",
            t.shape().dims()
        )));
    }
    Ok(t)
}

fn load_f32(
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    Ok(load_checked(src, name, shape)?
        .dequantize(device)?
        .to_dtype(DType::F32)?)
}

impl Llama {
    /// Builds the model from `src`, checking every tensor's presence and shape.
    /// `max_positions` bounds the RoPE tables (the serving context length).
    pub fn load(
        config: &ModelConfig,
        src: &dyn TensorSource,
        max_positions: usize,
        kv_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if !matches!(kv_dtype, DType::F16 | DType::F32) {
            return Err(Error::invalid_argument(
                "kv_dtype",
                format!("{kv_dtype:?} (expected F16 or F32)"),
            ));
        }
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
        let path = KernelPath::select()?;
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let t = load_checked(src, &format!("{name}.weight"), &[out, inp])?;
            let weight = Weight::new(Arc::new(t), device, path)?;
            let bias = if bias {
                Some(load_f32(src, &format!("{name}.bias"), &[out], device)?)
            } else {
                None
            };
            Ok(Linear { weight, bias })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: load_f32(src, &format!("{p}.attn_norm.weight"), &[h], device)?,
                q: linear(&format!("{p}.attn_q"), q_dim, h, c.qkv_bias)?,
                k: linear(&format!("{p}.attn_k"), kv_dim, h, c.qkv_bias)?,
                v: linear(&format!("{p}.attn_v"), kv_dim, h, c.qkv_bias)?,
                o: linear(&format!("{p}.attn_output"), h, q_dim, false)?,
                ffn_norm: load_f32(src, &format!("{p}.ffn_norm.weight"), &[h], device)?,
                gate: linear(&format!("{p}.ffn_gate"), c.intermediate_size, h, false)?,
                up: linear(&format!("{p}.ffn_up"), c.intermediate_size, h, false)?,
                down: linear(&format!("{p}.ffn_down"), h, c.intermediate_size, false)?,
            });
        }
        let embed = Arc::new(load_checked(src, "token_embd.weight", &[c.vocab_size, h])?);
        let lm_head = if c.tied_embeddings {
            Weight::new(embed.clone(), device, path)?
        } else {
            let t = load_checked(src, "output.weight", &[c.vocab_size, h])?;
            Weight::new(Arc::new(t), device, path)?
        };
        let factors = match src.load(ROPE_FREQS)? {
            Some(t) => Some(
                t.dequantize(device)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        if let Some(f) = &factors {
            if f.len() != hd / 2 {
                return Err(Error::Unsupported(format!(
                    "rope_freqs has {} entries, expected {}",
                    f.len(),
                    hd / 2
                )));
            }
        }
        let (cos, sin) = rope_tables(hd, c.rope_theta, factors.as_deref(), max_positions, device)?;
        Ok(Self {
            config: c.clone(),
            device: device.clone(),
            output_norm: load_f32(src, "output_norm.weight", &[h], device)?,
            embed,
            layers,
            lm_head,
            cos,
            sin,
            max_positions,
            kv_dtype,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// A KV pool of `num_blocks` blocks of `block_size` positions, in the cache
    /// precision chosen at load.
    pub fn new_kv_pool(&self, num_blocks: usize, block_size: usize) -> Result<KvPool> {
        let c = &self.config;
        KvPool::new(
            c.num_layers,
            num_blocks,
            block_size,
            c.num_kv_heads * c.head_dim,
            self.kv_dtype,
            &self.device,
        )
    }

    /// Runs one step for a batch of sequences, storing their new keys and values in
    /// `pool`, and returns per item the logits it asked for (`[n, vocab]`).
    pub fn forward(&self, items: &[BatchItem<'_>], pool: &KvPool) -> Result<Vec<Option<Tensor>>> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut new_slots = Vec::new();
        for it in items {
            let end = it.past + it.tokens.len();
            if it.tokens.is_empty() {
                return Err(Error::invalid_argument(
                    "tokens",
                    "a batch item has no tokens",
                ));
            }
            if end > self.max_positions {
                return Err(Error::ContextLengthExceeded {
                    prompt_tokens: end,
                    context_length: self.max_positions,
                });
            }
            if it.slots.len() != end {
                return Err(Error::Compute(format!(
                    "{} cache slots for {end} positions",
                    it.slots.len()
                )));
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(Error::invalid_argument(
                    "tokens",
                    format!("token id {bad} is outside the vocabulary"),
                ));
            }
            ids.extend_from_slice(it.tokens);
            positions.extend(it.past as u32..end as u32);
            new_slots.extend_from_slice(&it.slots[it.past..]);
        }
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let positions = Tensor::from_vec(positions, total, &self.device)?;
        let (cos, sin) = (
            self.cos.index_select(&positions, 0)?,
            self.sin.index_select(&positions, 0)?,
        );
        let write = pool.prepare_write(&new_slots)?;
        let kv_width = c.num_kv_heads * c.head_dim;
        let mut x = self.embed.embedding(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_norm_eps)?;
            let q = self.rope(&layer.q.forward(&h)?, c.num_heads, &cos, &sin)?;
            let k = self.rope(&layer.k.forward(&h)?, c.num_kv_heads, &cos, &sin)?;
            let v = layer.v.forward(&h)?;
            // Keys back to rows, [tokens, kv_heads * head_dim], for the pool.
            let k_rows = k.transpose(0, 1)?.reshape((total, kv_width))?;
            pool.write(li, &write, &k_rows, &v)?;
            let att = self.attend(li, &q, items, pool)?;
            x = (x + layer.o.forward(&att)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps)?;
            let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }
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
        let rows_t = Tensor::from_vec(rows, counts.iter().sum::<usize>(), &self.device)?;
        let x = x.index_select(&rows_t, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.output_norm, c.rms_norm_eps)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut start = 0;
        for n in counts {
            out.push((n > 0).then(|| logits.narrow(0, start, n)).transpose()?);
            start += n;
        }
        Ok(out)
    }

    /// `x: [tokens, heads * head_dim]` rotated for its tokens' positions (`cos` and
    /// `sin` hold one row per token), as `[heads, tokens, head_dim]`.
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let x4 = x
            .reshape((t, heads, self.config.head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let y = match self.config.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, cos, sin)?,
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x4, cos, sin)?,
        };
        Ok(y.squeeze(0)?)
    }

    /// The batch's attention for layer `li`, `q: [heads, tokens, head_dim]` ->
    /// `[tokens, heads * head_dim]`: in place over the pool on the CPU
    /// (`attention::paged_attention`), else per sequence over keys and values
    /// gathered from it.
    fn attend(
        &self,
        li: usize,
        q: &Tensor,
        items: &[BatchItem<'_>],
        pool: &KvPool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let tokens = q.dim(1)?;
        if q.device().is_cpu() {
            let mut seqs = Vec::with_capacity(items.len());
            let mut offset = 0;
            for it in items {
                seqs.push(SeqAttn {
                    slots: it.slots,
                    past: it.past,
                    n: it.tokens.len(),
                    offset,
                });
                offset += it.tokens.len();
            }
            let heads = Heads {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
            };
            let qv = q.flatten_all()?.to_vec1::<f32>()?;
            let out =
                pool.with_rows(li, |k, v| paged_attention(&qv, tokens, k, v, &seqs, heads))?;
            if let Some(out) = out {
                let shape = (tokens, c.num_heads * c.head_dim);
                return Ok(Tensor::from_vec(out, shape, &self.device)?);
            }
        }
        let mut outs = Vec::with_capacity(items.len());
        let mut off = 0;
        for it in items {
            let n = it.tokens.len();
            let qi = q.narrow(1, off, n)?.contiguous()?;
            let slots = Tensor::from_slice(it.slots, it.slots.len(), &self.device)?;
            let (kc, vc) = pool.gather(li, &slots)?;
            // The cache may hold F16 (half the memory, llama.cpp's default);
            // attention itself computes in F32.
            let heads = |t: Tensor| -> Result<Tensor> {
                Ok(t.reshape((it.slots.len(), c.num_kv_heads, c.head_dim))?
                    .transpose(0, 1)?
                    .to_dtype(DType::F32)?
                    .contiguous()?)
            };
            outs.push(self.attention(&qi, &heads(kc)?, &heads(vc)?, it.past)?);
            off += n;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Causal attention of `q: [heads, n, d]` at positions `pos..pos + n` over the
    /// cached `k, v: [kv_heads, pos + n, d]`; returns `[n, heads * d]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, pos: usize) -> Result<Tensor> {
        let c = &self.config;
        let (nh, n, d) = q.dims3()?;
        let nkv = c.num_kv_heads;
        let groups = nh / nkv;
        let total = k.dim(1)?;
        // Query heads sharing a KV head are stacked along the row axis, so GQA needs
        // no copy of the cache: [kv_heads, groups * n, d] x [kv_heads, d, total].
        let q = q.reshape((nkv, groups * n, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = if n > 1 {
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, total), &self.device)?;
            scores
                .reshape((nkv, groups, n, total))?
                .broadcast_add(&mask)?
                .reshape((nkv, groups * n, total))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(v)?; // [nkv, groups * n, d]
        Ok(out
            .reshape((nh, n, d))?
            .transpose(0, 1)?
            .reshape((n, nh * d))?)
    }
}

fn rope_tables(
    head_dim: usize,
    theta: f32,
    factors: Option<&[f32]>,
    max_positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
            f / factors.map_or(1.0, |fs| fs[i])
        })
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions = Tensor::arange(0u32, max_positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_positions, 1))?;
    let angles = positions.broadcast_mul(&inv_freq)?;
    Ok((angles.cos()?.contiguous()?, angles.sin()?.contiguous()?))
}

//! The Llama-family transformer on candle: token embedding, RMSNorm, RoPE, grouped-
//! query attention, SwiGLU MLP, tied or separate output head, optional q/k/v biases.
//!
//! `forward` takes a batch of sequences, each with its own tokens and its own KV
//! cache (so its own positions). All tokens of the batch go through the weight
//! matmuls together, packed into one `[tokens, hidden]` matrix; only attention runs
//! per sequence. A prefill, a decode step, or a mix of both are the same call.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::config::{ModelConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::kv::SeqKvCache;

/// Where the model reads its tensors from (a `.zse` file, or a test's memory).
pub trait TensorSource {
    fn load(&self, name: &str) -> Result<Option<QTensor>>;
}

/// One sequence's part in a forward pass.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqKvCache,
    /// Logits for every position (scoring) instead of only the last (generation).
    pub all_logits: bool,
}

struct Linear {
    weight: QMatMul,
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
    lm_head: QMatMul,
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
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight =
                QMatMul::from_qtensor(load_checked(src, &format!("{name}.weight"), &[out, inp])?)?;
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
            QMatMul::from_arc(embed.clone())?
        } else {
            QMatMul::from_qtensor(load_checked(src, "output.weight", &[c.vocab_size, h])?)?
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

    pub fn new_cache(&self) -> SeqKvCache {
        SeqKvCache::new(self.config.num_layers)
    }

    /// Runs one step for a batch of sequences and returns, per item, the logits
    /// `[n, vocab]` of its last position (or of all its positions if it asked).
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let mut ids = Vec::new();
        for it in items.iter() {
            if it.tokens.is_empty() {
                return Err(Error::invalid_argument(
                    "tokens",
                    "a batch item has no tokens",
                ));
            }
            if it.cache.len() + it.tokens.len() > self.max_positions {
                return Err(Error::ContextLengthExceeded {
                    prompt_tokens: it.cache.len() + it.tokens.len(),
                    context_length: self.max_positions,
                });
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(Error::invalid_argument(
                    "tokens",
                    format!("token id {bad} is outside the vocabulary"),
                ));
            }
            ids.extend_from_slice(it.tokens);
        }
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed.embedding(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_norm_eps)?;
            let q = layer.q.forward(&h)?;
            let k = layer.k.forward(&h)?;
            let v = layer.v.forward(&h)?;
            let mut outs = Vec::with_capacity(items.len());
            let mut off = 0;
            for it in items.iter_mut() {
                let n = it.tokens.len();
                let pos = it.cache.len();
                let heads = |t: &Tensor, nh: usize| -> Result<Tensor> {
                    Ok(t.narrow(0, off, n)?
                        .reshape((n, nh, c.head_dim))?
                        .transpose(0, 1)?
                        .contiguous()?)
                };
                let qi = self.rope(&heads(&q, c.num_heads)?, pos)?;
                let ki = self.rope(&heads(&k, c.num_kv_heads)?, pos)?;
                let vi = heads(&v, c.num_kv_heads)?;
                // The cache may hold F16 (half the memory, llama.cpp's default);
                // attention itself computes in F32.
                let kv = self.kv_dtype;
                let (kc, vc) = it.cache.append(li, &ki.to_dtype(kv)?, &vi.to_dtype(kv)?)?;
                let (kc, vc) = (kc.to_dtype(DType::F32)?, vc.to_dtype(DType::F32)?);
                outs.push(self.attention(&qi, &kc, &vc, pos)?);
                off += n;
            }
            let att = if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(&outs, 0)?
            };
            x = (x + layer.o.forward(&att)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps)?;
            let act = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        // Only the rows whose logits are wanted go through the (large) output head.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        let mut off = 0u32;
        for it in items.iter_mut() {
            let n = it.tokens.len() as u32;
            it.cache.commit(n as usize);
            if it.all_logits {
                rows.extend(off..off + n);
                counts.push(n as usize);
            } else {
                rows.push(off + n - 1);
                counts.push(1);
            }
            off += n;
        }
        let rows_t = Tensor::from_vec(rows, counts.iter().sum::<usize>(), &self.device)?;
        let x = x.index_select(&rows_t, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.output_norm, c.rms_norm_eps)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut start = 0;
        for n in counts {
            out.push(logits.narrow(0, start, n)?);
            start += n;
        }
        Ok(out)
    }

    /// Rotates `x: [heads, n, head_dim]` for positions `pos..pos + n`.
    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let n = x.dim(1)?;
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        let x4 = x.unsqueeze(0)?;
        let y = match self.config.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, &cos, &sin)?,
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x4, &cos, &sin)?,
        };
        Ok(y.squeeze(0)?)
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

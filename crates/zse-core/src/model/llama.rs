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

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
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

/// The one-token items of a batch (decoding sequences), laid out once per forward
/// pass for `Llama::attend_decoding`, which every layer runs.
struct DecodeBatch {
    count: usize,
    /// The longest of their contexts (cached positions plus the new one).
    longest: usize,
    /// `[count]`: their rows among the batch's tokens.
    rows: Tensor,
    /// `[count * longest]`: each one's slots, padded with its first slot (written,
    /// so finite; the mask hides it).
    slots: Tensor,
    /// `[count, 1, 1, longest]`: 0 where a position exists, -inf past its end.
    mask: Tensor,
    /// Where the batch also has longer items: the permutation from [decoding rows;
    /// the others' rows] back to the batch's token order.
    order: Option<Tensor>,
}

impl DecodeBatch {
    fn new(items: &[BatchItem<'_>], device: &Device) -> Result<Option<Self>> {
        let decoding: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].tokens.len() == 1)
            .collect();
        if decoding.is_empty() {
            return Ok(None);
        }
        let count = decoding.len();
        let longest = decoding
            .iter()
            .map(|&i| items[i].slots.len())
            .max()
            .unwrap_or(1);
        let mut slots = Vec::with_capacity(count * longest);
        let mut mask = Vec::with_capacity(count * longest);
        for &i in &decoding {
            let s = items[i].slots;
            slots.extend_from_slice(s);
            slots.extend(std::iter::repeat_n(s[0], longest - s.len()));
            mask.extend(std::iter::repeat_n(0f32, s.len()));
            mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, longest - s.len()));
        }
        // Token rows of the batch, and for each its row in [decoding; others].
        let mut starts = Vec::with_capacity(items.len());
        let mut total = 0;
        for it in items {
            starts.push(total);
            total += it.tokens.len();
        }
        let rows: Vec<u32> = decoding.iter().map(|&i| starts[i] as u32).collect();
        let order = (count < items.len()).then(|| {
            let mut order = vec![0u32; total];
            let mut next = count as u32;
            for (i, it) in items.iter().enumerate() {
                match decoding.binary_search(&i) {
                    Ok(j) => order[starts[i]] = j as u32,
                    Err(_) => {
                        for r in 0..it.tokens.len() {
                            order[starts[i] + r] = next;
                            next += 1;
                        }
                    }
                }
            }
            Tensor::from_vec(order, total, device)
        });
        Ok(Some(Self {
            count,
            longest,
            rows: Tensor::from_vec(rows, count, device)?,
            slots: Tensor::from_vec(slots, count * longest, device)?,
            mask: Tensor::from_vec(mask, (count, 1, 1, longest), device)?,
            order: order.transpose()?,
        }))
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

/// How the model computes: on the CPU with ZSE's kernels and its attention in place
/// over the KV pool, or with candle's own operations (quantized matmul, attention
/// over gathered keys and values). The second is how a GPU runs; on the CPU,
/// `candle` (the engine's `cpu_kernels`, or `ZSE_CPU_KERNELS`) picks it, so that
/// the GPU's code path is tested here.
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
}

/// A weight matrix: ZSE's CPU kernels where they handle its block type, candle's
/// quantized matmul otherwise.
enum Weight {
    Kernel(QWeight, KernelPath),
    Candle(QMatMul),
}

impl Weight {
    fn new(t: Arc<QTensor>, device: &Device, backend: Backend) -> Result<Self> {
        if let Backend::Kernels(path) = backend {
            if let Some(w) = QWeight::from_qtensor(&t)? {
                return Ok(Weight::Kernel(w, path));
            }
        }
        // Candle widens 16-bit float weights to F32; on a GPU they stay 16-bit (half
        // the memory, and a decode step reads every weight once).
        if !device.is_cpu() && matches!(t.dtype(), GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(Weight::Candle(QMatMul::TensorF16(
                t.dequantize_f16(device)?,
            )));
        }
        Ok(Weight::Candle(QMatMul::from_arc(t)?))
    }

    fn size_bytes(&self) -> usize {
        match self {
            Weight::Kernel(w, _) => w.size_bytes(),
            Weight::Candle(q) => match q {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            },
        }
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

/// Projections of one input (q/k/v, or gate/up), each with an optional bias. Where
/// the kernels run them all, their weights are stacked into one matrix: one matmul,
/// one quantization of the input and one parallel dispatch instead of several.
struct Projections {
    weights: Vec<Weight>,
    /// Output width of each projection.
    widths: Vec<usize>,
    biases: Vec<Option<Tensor>>,
}

impl Projections {
    fn new(weights: Vec<Weight>, widths: Vec<usize>, biases: Vec<Option<Tensor>>) -> Result<Self> {
        // Stacked only where the kernels run every part with one layout (a file may
        // mix block types across q/k/v); otherwise each runs on its own.
        let kernels: Vec<&QWeight> = weights
            .iter()
            .filter_map(|w| match w {
                Weight::Kernel(q, _) => Some(q),
                Weight::Candle(_) => None,
            })
            .collect();
        let stackable =
            kernels.len() == weights.len() && kernels.windows(2).all(|p| p[0].stacks_with(p[1]));
        let weights = match (stackable, weights.first()) {
            (true, Some(Weight::Kernel(_, path))) => {
                let path = *path;
                let parts = weights
                    .into_iter()
                    .filter_map(|w| match w {
                        Weight::Kernel(q, _) => Some(q),
                        Weight::Candle(_) => None,
                    })
                    .collect();
                vec![Weight::Kernel(QWeight::stack(parts)?, path)]
            }
            _ => weights,
        };
        Ok(Self {
            weights,
            widths,
            biases,
        })
    }

    /// Where the kernels run the projections as one stacked matrix: `x: [tokens, in]`
    /// -> the rows `[tokens, sum of widths]`, biases added, with no tensor between
    /// (the CPU forward pass reads its parts in place). None otherwise, computing
    /// nothing.
    fn stacked_rows(&self, x: &Tensor) -> Result<Option<Vec<f32>>> {
        let [Weight::Kernel(w, path)] = self.weights.as_slice() else {
            return Ok(None);
        };
        let m = x.dim(0)?;
        let mut y = w.matmul(&x.flatten_all()?.to_vec1::<f32>()?, m, *path);
        let mut at = 0;
        for (&width, bias) in self.widths.iter().zip(&self.biases) {
            if let Some(b) = bias {
                let b = b.to_vec1::<f32>()?;
                for row in y.chunks_exact_mut(w.rows) {
                    for (v, b) in row[at..at + width].iter_mut().zip(&b) {
                        *v += b;
                    }
                }
            }
            at += width;
        }
        Ok(Some(y))
    }

    /// `x: [tokens, in]` -> one `[tokens, width]` tensor per projection.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(self.widths.len());
        if let [stacked] = self.weights.as_slice() {
            let y = stacked.forward(x)?;
            let mut at = 0;
            for &w in &self.widths {
                outs.push(y.narrow(1, at, w)?.contiguous()?);
                at += w;
            }
        } else {
            for w in &self.weights {
                outs.push(w.forward(x)?);
            }
        }
        for (y, b) in outs.iter_mut().zip(&self.biases) {
            if let Some(b) = b {
                *y = y.broadcast_add(b)?;
            }
        }
        Ok(outs)
    }
}

struct Layer {
    attn_norm: Tensor,
    /// q, k and v.
    qkv: Projections,
    o: Weight,
    ffn_norm: Tensor,
    /// gate and up.
    gate_up: Projections,
    down: Weight,
}

pub struct Llama {
    config: ModelConfig,
    device: Device,
    /// The token embedding; None when it is the output head's weights (tied
    /// embeddings), which serve the lookup too instead of a second copy.
    embed: Option<Weight>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    lm_head: Weight,
    /// `[max_positions, head_dim / 2]` tables for RoPE.
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    /// Storage type of the KV cache.
    kv_dtype: DType,
    backend: Backend,
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
        if backend != Backend::Candle && !device.is_cpu() {
            return Err(Error::invalid_argument(
                "backend",
                "ZSE's kernels run on the CPU only",
            ));
        }
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
        let weight = |name: &str, out: usize, inp: usize| -> Result<Weight> {
            let t = load_checked(src, &format!("{name}.weight"), &[out, inp])?;
            Weight::new(Arc::new(t), device, backend)
        };
        let bias = |name: &str, out: usize, present: bool| -> Result<Option<Tensor>> {
            present
                .then(|| load_f32(src, &format!("{name}.bias"), &[out], device))
                .transpose()
        };
        let f = c.intermediate_size;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("blk.{i}");
            let (q, k, v) = (
                format!("{p}.attn_q"),
                format!("{p}.attn_k"),
                format!("{p}.attn_v"),
            );
            let qkv = Projections::new(
                vec![
                    weight(&q, q_dim, h)?,
                    weight(&k, kv_dim, h)?,
                    weight(&v, kv_dim, h)?,
                ],
                vec![q_dim, kv_dim, kv_dim],
                vec![
                    bias(&q, q_dim, c.qkv_bias)?,
                    bias(&k, kv_dim, c.qkv_bias)?,
                    bias(&v, kv_dim, c.qkv_bias)?,
                ],
            )?;
            let gate_up = Projections::new(
                vec![
                    weight(&format!("{p}.ffn_gate"), f, h)?,
                    weight(&format!("{p}.ffn_up"), f, h)?,
                ],
                vec![f, f],
                vec![None, None],
            )?;
            layers.push(Layer {
                attn_norm: load_f32(src, &format!("{p}.attn_norm.weight"), &[h], device)?,
                qkv,
                o: weight(&format!("{p}.attn_output"), h, q_dim)?,
                ffn_norm: load_f32(src, &format!("{p}.ffn_norm.weight"), &[h], device)?,
                gate_up,
                down: weight(&format!("{p}.ffn_down"), h, f)?,
            });
        }
        let embed = weight("token_embd", c.vocab_size, h)?;
        let (embed, lm_head) = if c.tied_embeddings {
            (None, embed)
        } else {
            (Some(embed), weight("output", c.vocab_size, h)?)
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
            backend,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How the model computes, chosen at load.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Bytes of weight matrices held (a decode step reads all of them; norms and
    /// biases are too small to count).
    pub fn weight_bytes(&self) -> usize {
        let mut total = self.lm_head.size_bytes();
        if let Some(e) = &self.embed {
            // Read a row per token, but held all the same.
            total += e.size_bytes();
        }
        for l in &self.layers {
            total += l.qkv.weights.iter().map(Weight::size_bytes).sum::<usize>();
            total += l
                .gate_up
                .weights
                .iter()
                .map(Weight::size_bytes)
                .sum::<usize>();
            total += l.o.size_bytes() + l.down.size_bytes();
        }
        total
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
    /// `pool`, and returns per item the logits it asked for (`[n, vocab]`, in CPU
    /// memory).
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
        // Candle's scatter indices, made when a layer first needs them.
        let mut write = None;
        let decode = match self.backend {
            Backend::Candle => DecodeBatch::new(items, &self.device)?,
            Backend::Kernels(_) => None,
        };
        let kv_width = c.num_kv_heads * c.head_dim;
        // The kernels' path rotates queries and keys from rows of f32 tables.
        let rope_rows = match self.backend {
            Backend::Kernels(_) => Some((
                cos.flatten_all()?.to_vec1::<f32>()?,
                sin.flatten_all()?.to_vec1::<f32>()?,
            )),
            Backend::Candle => None,
        };
        let mut x = self.embed(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let qkv = match &rope_rows {
                Some(_) => layer.qkv.stacked_rows(&h)?,
                None => None,
            };
            let att = if let (Some(qkv), Some((cos, sin))) = (qkv, &rope_rows) {
                let (q, k, v) = self.rotate_rows(&qkv, total, cos, sin);
                pool.write_rows(li, &new_slots, &k, &v)?;
                let out = self
                    .cpu_attention(li, &q, total, items, pool)?
                    .ok_or_else(|| {
                        Error::Compute("the CPU kernels need the KV pool in CPU memory".into())
                    })?;
                Tensor::from_vec(out, (total, c.num_heads * c.head_dim), &self.device)?
            } else {
                let [q, k, v]: [Tensor; 3] = layer
                    .qkv
                    .forward(&h)?
                    .try_into()
                    .map_err(|_| Error::Compute("q/k/v projections".into()))?;
                let q = self.rope(&q, c.num_heads, &cos, &sin)?;
                let k = self.rope(&k, c.num_kv_heads, &cos, &sin)?;
                // Keys back to rows, [tokens, kv_heads * head_dim], for the pool.
                let k_rows = k.transpose(0, 1)?.reshape((total, kv_width))?;
                let at = match &mut write {
                    Some(at) => at,
                    unset @ None => unset.insert(pool.prepare_write(&new_slots)?),
                };
                pool.write(li, at, &k_rows, &v)?;
                self.attend(li, &q, items, pool, decode.as_ref())?
            };
            x = (x + layer.o.forward(&att)?)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let act = self.feed_forward_act(&layer.gate_up, &h)?;
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
        let x = self.rms_norm(&x, &self.output_norm)?;
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

    /// The embeddings of `ids`, `[tokens, hidden]`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match self.embed.as_ref().unwrap_or(&self.lm_head) {
            Weight::Kernel(w, _) => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * w.cols];
                for (row, &id) in out.chunks_exact_mut(w.cols).zip(&ids) {
                    w.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), w.cols), &self.device)?)
            }
            Weight::Candle(q) => Ok(q.embedding(ids)?.to_dtype(DType::F32)?),
        }
    }

    /// RMSNorm of `x: [tokens, hidden]` with `weight`: llama.cpp's arithmetic on ZSE's
    /// CPU kernels, candle's operation elsewhere.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if let Backend::Kernels(_) = self.backend {
            let (xs, w) = (x.flatten_all()?.to_vec1()?, weight.to_vec1()?);
            let y = super::cpu_ops::rms_norm(&xs, &w, eps);
            return Ok(Tensor::from_vec(y, x.shape(), &self.device)?);
        }
        Ok(candle_nn::ops::rms_norm(x, weight, eps)?)
    }

    /// `silu(gate) * up` of the gate and up projections of `h`: fused on ZSE's CPU
    /// kernels (`cpu_ops::swiglu`, reading the stacked projections' rows in place),
    /// candle's operations elsewhere.
    fn feed_forward_act(&self, gate_up: &Projections, h: &Tensor) -> Result<Tensor> {
        let Backend::Kernels(path) = self.backend else {
            let [gate, up] = Self::gate_and_up(gate_up.forward(h)?)?;
            return Ok((candle_nn::ops::silu(&gate)? * up)?);
        };
        let (tokens, inter) = (h.dim(0)?, self.config.intermediate_size);
        let rows = match gate_up.stacked_rows(h)? {
            Some(rows) => rows,
            None => {
                // Gate and up in different block types: side by side in one row.
                let [gate, up] = Self::gate_and_up(gate_up.forward(h)?)?;
                Tensor::cat(&[gate, up], 1)?.flatten_all()?.to_vec1()?
            }
        };
        let mut act = vec![0f32; tokens * inter];
        for (row, out) in rows
            .chunks_exact(2 * inter)
            .zip(act.chunks_exact_mut(inter))
        {
            super::cpu_ops::swiglu(path, &row[..inter], &row[inter..], out);
        }
        Ok(Tensor::from_vec(act, (tokens, inter), &self.device)?)
    }

    fn gate_and_up(parts: Vec<Tensor>) -> Result<[Tensor; 2]> {
        parts
            .try_into()
            .map_err(|_| Error::Compute("gate/up projections".into()))
    }

    /// The stacked q/k/v rows (`[tokens, q + k + v widths]`) rotated for their
    /// positions (`cos`/`sin`: `head_dim / 2` values per token): queries as
    /// `[heads, tokens, head_dim]` for the attention, keys and values as rows for
    /// the pool.
    fn rotate_rows(
        &self,
        qkv: &[f32],
        tokens: usize,
        cos: &[f32],
        sin: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = &self.config;
        let (hd, half) = (c.head_dim, c.head_dim / 2);
        let (qw, kvw) = (c.num_heads * hd, c.num_kv_heads * hd);
        let mut q = vec![0f32; tokens * qw];
        let mut k = vec![0f32; tokens * kvw];
        let mut v = Vec::with_capacity(tokens * kvw);
        for (t, row) in qkv.chunks_exact(qw + 2 * kvw).enumerate() {
            let (cs, sn) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            for (head, x) in row[..qw].chunks_exact(hd).enumerate() {
                let out = &mut q[(head * tokens + t) * hd..][..hd];
                super::cpu_ops::rope_head(x, cs, sn, c.rope_style, out);
            }
            let out_rows = k[t * kvw..][..kvw].chunks_exact_mut(hd);
            for (x, out) in row[qw..qw + kvw].chunks_exact(hd).zip(out_rows) {
                super::cpu_ops::rope_head(x, cs, sn, c.rope_style, out);
            }
            v.extend_from_slice(&row[qw + kvw..]);
        }
        (q, k, v)
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

    /// `attention::paged_attention` over the pool in place, `q: [heads, tokens,
    /// head_dim]` -> `[tokens, heads * head_dim]`; None where the pool is not in CPU
    /// memory.
    fn cpu_attention(
        &self,
        li: usize,
        q: &[f32],
        tokens: usize,
        items: &[BatchItem<'_>],
        pool: &KvPool,
    ) -> Result<Option<Vec<f32>>> {
        let c = &self.config;
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
        pool.with_rows(li, |k, v| paged_attention(q, tokens, k, v, &seqs, heads))
    }

    /// The batch's attention for layer `li`, `q: [heads, tokens, head_dim]` ->
    /// `[tokens, heads * head_dim]`: in place over the pool with ZSE's kernels
    /// (`attention::paged_attention`); on candle's operations, the decoding
    /// sequences together (`decode`) and the others one by one, over keys and
    /// values gathered from the pool.
    fn attend(
        &self,
        li: usize,
        q: &Tensor,
        items: &[BatchItem<'_>],
        pool: &KvPool,
        decode: Option<&DecodeBatch>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let tokens = q.dim(1)?;
        if let Backend::Kernels(_) = self.backend {
            let qv = q.flatten_all()?.to_vec1::<f32>()?;
            if let Some(out) = self.cpu_attention(li, &qv, tokens, items, pool)? {
                let shape = (tokens, c.num_heads * c.head_dim);
                return Ok(Tensor::from_vec(out, shape, &self.device)?);
            }
        }
        let mut outs = Vec::with_capacity(items.len() + 1);
        if let Some(d) = decode {
            outs.push(self.attend_decoding(li, q, d, pool)?);
        }
        let mut off = 0;
        for it in items {
            let n = it.tokens.len();
            if decode.is_some() && n == 1 {
                off += n;
                continue;
            }
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
        let out = Tensor::cat(&outs, 0)?;
        match decode.and_then(|d| d.order.as_ref()) {
            Some(order) => Ok(out.index_select(order, 0)?),
            None => Ok(out),
        }
    }

    /// Attention of every one-token item of the batch at once, `[decoding, heads *
    /// head_dim]`: keys and values gathered into `[decoding, kv_heads, longest,
    /// head_dim]`, shorter sequences masked.
    fn attend_decoding(
        &self,
        li: usize,
        q: &Tensor,
        d: &DecodeBatch,
        pool: &KvPool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (n, len) = (d.count, d.longest);
        let q = q
            .index_select(&d.rows, 1)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, nkv, nh / nkv, hd))?;
        let (kc, vc) = pool.gather(li, &d.slots)?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, len, nkv, hd))?
                .transpose(1, 2)?
                .to_dtype(DType::F32)?
                .contiguous()?)
        };
        let (k, v) = (heads(kc)?, heads(vc)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&d.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&v)?.reshape((n, nh * hd))?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use std::collections::HashMap;

    /// Tensors in memory, quantized on the way in.
    struct Memory(HashMap<String, QTensor>);

    impl TensorSource for Memory {
        fn load(&self, name: &str) -> Result<Option<QTensor>> {
            Ok(self.0.get(name).map(|t| {
                let data = t.data().map(|d| d.into_owned()).unwrap_or_default();
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    t.dtype(),
                    &data,
                    t.shape().dims().to_vec(),
                    &Device::Cpu,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"))
            }))
        }
    }

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            vocab_size: 64,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 32,
            rope_theta: 10000.0,
            rope_style: RopeStyle::Interleaved,
            rms_norm_eps: 1e-5,
            context_length: 64,
            qkv_bias: false,
            tied_embeddings: true,
        }
    }

    /// Random weights; `k_type` for the key projection, Q8_0 for the other matrices.
    fn model(k_type: GgmlDType) -> Llama {
        model_with(
            k_type,
            GgmlDType::Q8_0,
            Backend::Kernels(KernelPath::best()),
        )
    }

    /// Random weights, `k_type` for the key projection and `w_type` for the other
    /// matrices, on `backend`.
    fn model_with(k_type: GgmlDType, w_type: GgmlDType, backend: Backend) -> Llama {
        let c = config();
        let mut tensors = HashMap::new();
        for (i, (name, shape)) in expected_tensors(&c).into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = (0..n)
                .map(|j| (((j + 31 * i) * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
                .collect();
            let t = Tensor::from_vec(vals, shape.as_slice(), &Device::Cpu).unwrap();
            let dtype = match (shape.len(), name.contains("attn_k")) {
                (1, _) => GgmlDType::F32,
                (_, true) => k_type,
                _ => w_type,
            };
            tensors.insert(name, QTensor::quantize(&t, dtype).unwrap());
        }
        let src = Memory(tensors);
        Llama::load(&c, &src, 64, DType::F32, &Device::Cpu, backend).unwrap()
    }

    fn logits(m: &Llama, tokens: &[u32]) -> Vec<f32> {
        let pool = m.new_kv_pool(4, 16).unwrap();
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        let item = BatchItem {
            tokens,
            past: 0,
            slots: &slots,
            logits: Logits::Last,
        };
        let out = m.forward(&[item], &pool).unwrap().remove(0).unwrap();
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn mixed_block_types_in_qkv_run_as_separate_matmuls() {
        // All Q8_0: q/k/v stacked into one matmul. Q4_0 keys: three matmuls. Both
        // load and run; only the keys' quantization differs, so the logits are close.
        let (stacked, mixed) = (model(GgmlDType::Q8_0), model(GgmlDType::Q4_0));
        assert_eq!(stacked.layers[0].qkv.weights.len(), 1);
        assert_eq!(mixed.layers[0].qkv.weights.len(), 3);
        let tokens = [1u32, 5, 9, 2];
        let (a, b) = (logits(&stacked, &tokens), logits(&mixed, &tokens));
        assert_eq!(a.len(), 64);
        assert!(a.iter().chain(&b).all(|x| x.is_finite()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.5, "logits apart by {worst}");
        // The tied head serves the embedding: no second copy.
        assert!(stacked.embed.is_none());
    }

    fn item<'a>(tokens: &'a [u32], past: usize, slots: &'a [u32]) -> BatchItem<'a> {
        BatchItem {
            tokens,
            past,
            slots,
            logits: Logits::All,
        }
    }

    /// Runs two steps of three sequences on `m`: A and C prefill, then A and C
    /// decode beside B's prefill. Returns every logits row of the second step.
    fn two_steps(m: &Llama) -> Vec<Vec<f32>> {
        let pool = m.new_kv_pool(4, 16).unwrap();
        let (a, b, c) = (
            [3u32, 7, 1, 4, 9, 2],
            [5u32, 6, 8],
            [2u32, 2, 4, 8, 16, 32, 1, 11],
        );
        let slots = |r: std::ops::Range<u32>| r.collect::<Vec<u32>>();
        let (sa, sb, sc) = (slots(0..6), slots(16..19), slots(32..40));
        m.forward(
            &[item(&a[..5], 0, &sa[..5]), item(&c[..7], 0, &sc[..7])],
            &pool,
        )
        .unwrap();
        let second = [
            item(&a[5..], 5, &sa),
            item(&b, 0, &sb),
            item(&c[7..], 7, &sc),
        ];
        let out = m.forward(&second, &pool).unwrap();
        out.into_iter()
            .flat_map(|t| t.unwrap().to_vec2::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn candles_operations_compute_what_the_kernels_compute() {
        // F32 weights: the same matmul on both; only attention differs (in place
        // over the pool, against gathered, with the decoding sequences batched and
        // the rows put back in the batch's order).
        let kernels = Backend::Kernels(KernelPath::best());
        let native = two_steps(&model_with(GgmlDType::F32, GgmlDType::F32, kernels));
        let candle = two_steps(&model_with(GgmlDType::F32, GgmlDType::F32, Backend::Candle));
        assert_eq!(native.len(), 1 + 3 + 1);
        for (row, (x, y)) in native.iter().zip(&candle).enumerate() {
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "row {row}: logits apart by {worst}");
        }
    }
}

//! The operations on candle's own: quantized matmul, RoPE, softmax attention over
//! keys and values gathered from the pool. This is the GPU's path; the decoding
//! sequences of a step attend together (one masked batch), the others one by one.

use std::cell::{OnceCell, RefCell};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::{Activation, AttentionShape, Backend, Ops, Step};
use crate::error::{Error, Result};
use crate::kernels::elementwise::RopeStyle;
use crate::kv::pool::SlotWrite;
use crate::kv::KvPool;
use crate::model::rope::Rope;
use crate::model::weights::Weight;
use crate::model::BatchItem;

pub struct CandleOps {
    device: Device,
}

impl CandleOps {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
        }
    }
}

/// What a step needs on candle, made once for all layers.
pub(crate) struct StepTensors {
    positions: Tensor,
    /// Per pool (the others', the windowed layers'), made by its first layer: the
    /// scatter indices of the new keys and values, and the decoding items' layout.
    write: [OnceCell<SlotWrite>; 2],
    decode: [OnceCell<Option<DecodeBatch>>; 2],
    /// `cos`/`sin` rows of the step's positions, per rope table (by address).
    rope_rows: RefCell<Vec<(usize, Tensor, Tensor)>>,
}

/// The one-token items of a batch (decoding sequences), laid out once per forward
/// pass for `attend_decoding`, which every layer runs.
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
    /// Each one's context length (the mask's 0s).
    lens: Vec<usize>,
    /// `mask` also hiding what lies before each one's window, made by the first
    /// windowed layer for the others (a model has one window).
    windowed: OnceCell<(usize, Tensor)>,
    /// Where the batch also has longer items: the permutation from [decoding rows;
    /// the others' rows] back to the batch's token order.
    order: Option<Tensor>,
}

impl DecodeBatch {
    /// `mask` for a layer with a sliding window: also -inf before each one's window.
    fn windowed_mask(&self, window: Option<usize>) -> Result<Tensor> {
        let Some(w) = window else {
            return Ok(self.mask.clone());
        };
        if let Some((made_for, mask)) = self.windowed.get() {
            if *made_for == w {
                return Ok(mask.clone());
            }
        }
        let mut mask = Vec::with_capacity(self.count * self.longest);
        for &len in &self.lens {
            let first = len.saturating_sub(w);
            mask.extend((0..self.longest).map(|j| {
                if j < first || j >= len {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            }));
        }
        let shape = (self.count, 1, 1, self.longest);
        let mask = Tensor::from_vec(mask, shape, self.mask.device())?;
        // Set once; a later, other window (none so far) is made each time.
        let _ = self.windowed.set((w, mask.clone()));
        Ok(mask)
    }

    /// The layout of `items`' one-token items, with their slots in the windowed
    /// layers' pool or the others'.
    fn new(items: &[BatchItem<'_>], windowed: bool, device: &Device) -> Result<Option<Self>> {
        let decoding: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].tokens.len() == 1)
            .collect();
        if decoding.is_empty() {
            return Ok(None);
        }
        let count = decoding.len();
        let longest = decoding
            .iter()
            .map(|&i| items[i].slots_for(windowed).len())
            .max()
            .unwrap_or(1);
        let mut slots = Vec::with_capacity(count * longest);
        let mut mask = Vec::with_capacity(count * longest);
        for &i in &decoding {
            let s = items[i].slots_for(windowed);
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
            lens: decoding
                .iter()
                .map(|&i| items[i].slots_for(windowed).len())
                .collect(),
            windowed: OnceCell::new(),
            order: order.transpose()?,
        }))
    }
}

fn prepared<'s>(step: &'s Step<'_>) -> Result<&'s StepTensors> {
    step.candle
        .as_ref()
        .ok_or_else(|| Error::Compute("a step not begun by candle's operations".into()))
}

impl Ops for CandleOps {
    fn backend(&self) -> Backend {
        Backend::Candle
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn weight(&self, t: Arc<QTensor>) -> Result<Weight> {
        // Candle widens 16-bit float weights to F32; on a GPU they stay 16-bit (half
        // the memory, and a decode step reads every weight once).
        if !self.device.is_cpu() && matches!(t.dtype(), GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(Weight::Candle(QMatMul::TensorF16(
                t.dequantize_f16(&self.device)?,
            )));
        }
        Ok(Weight::Candle(QMatMul::from_arc(t)?))
    }

    fn begin<'a>(
        &self,
        items: &'a [BatchItem<'a>],
        vocab_size: usize,
        max_positions: usize,
    ) -> Result<Step<'a>> {
        let mut step = Step::new(items, vocab_size, max_positions)?;
        let n = step.tokens();
        step.candle = Some(StepTensors {
            positions: Tensor::from_slice(&step.positions, n, &self.device)?,
            write: [OnceCell::new(), OnceCell::new()],
            decode: [OnceCell::new(), OnceCell::new()],
            rope_rows: RefCell::new(Vec::new()),
        });
        Ok(step)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let width = weight.dim(0)?;
        let rows = x.reshape(((), width))?;
        Ok(candle_nn::ops::rms_norm(&rows, weight, eps)?.reshape(x.shape())?)
    }

    fn add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok((x + y)?)
    }

    fn gated(&self, act: Activation, gate_up: &Tensor) -> Result<Tensor> {
        let width = gate_up.dim(1)? / 2;
        let (gate, up) = (
            gate_up.narrow(1, 0, width)?,
            gate_up.narrow(1, width, width)?,
        );
        let gate = match act {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            // As llama.cpp's table: GELU of the gate rounded to f16, rounded to f16
            // (it passes gates beyond ±10 unrounded; GELU is within f16's step there).
            Activation::GeluTanh => gate
                .to_dtype(DType::F16)?
                .to_dtype(DType::F32)?
                .gelu()?
                .to_dtype(DType::F16)?
                .to_dtype(DType::F32)?,
        };
        Ok((gate * up)?)
    }

    fn rope(&self, x: &Tensor, rope: &Rope, step: &Step<'_>) -> Result<Tensor> {
        let p = prepared(step)?;
        let key = std::ptr::from_ref(rope) as usize;
        let (cos, sin) = {
            let mut cache = p.rope_rows.borrow_mut();
            match cache.iter().find(|(k, _, _)| *k == key) {
                Some((_, c, s)) => (c.clone(), s.clone()),
                None => {
                    let c = rope.cos().index_select(&p.positions, 0)?;
                    let s = rope.sin().index_select(&p.positions, 0)?;
                    cache.push((key, c.clone(), s.clone()));
                    (c, s)
                }
            }
        };
        let (t, width) = x.dims2()?;
        let hd = rope.head_dim();
        let heads = width / hd;
        let x4 = x
            .reshape((t, heads, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let y = match rope.style() {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, &cos, &sin)?,
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x4, &cos, &sin)?,
        };
        Ok(y.squeeze(0)?.transpose(0, 1)?.reshape((t, width))?)
    }

    fn attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
        step: &Step<'_>,
        pool: &KvPool,
    ) -> Result<Tensor> {
        let p = prepared(step)?;
        let windowed = pool.is_windowed(layer);
        let (write, decode) = (&p.write[windowed as usize], &p.decode[windowed as usize]);
        // Set here, once: nothing else writes the cells.
        if write.get().is_none() {
            let _ = write.set(pool.prepare_write(step.new_slots_for(windowed))?);
        }
        if decode.get().is_none() {
            let _ = decode.set(DecodeBatch::new(step.items, windowed, &self.device)?);
        }
        let write = write
            .get()
            .ok_or_else(|| Error::Compute("slot indices".into()))?;
        let decode = decode.get().and_then(Option::as_ref);
        pool.write(layer, write, k, v)?;
        let (tokens, hd) = (step.tokens(), shape.head_dim);
        // [heads, tokens, head_dim]
        let q = q
            .reshape((tokens, shape.num_heads, hd))?
            .transpose(0, 1)?
            .contiguous()?;
        let mut outs = Vec::with_capacity(step.items.len() + 1);
        if let Some(d) = decode {
            outs.push(attend_decoding(layer, &q, d, shape, pool)?);
        }
        let mut off = 0;
        for it in step.items {
            let n = it.tokens.len();
            if decode.is_some() && n == 1 {
                off += n;
                continue;
            }
            let qi = q.narrow(1, off, n)?.contiguous()?;
            let slots = it.slots_for(windowed);
            let (kc, vc) = pool.gather(
                layer,
                &Tensor::from_slice(slots, slots.len(), &self.device)?,
            )?;
            // The cache may hold F16 (half the memory, llama.cpp's default);
            // attention itself computes in F32.
            let heads = |t: Tensor| -> Result<Tensor> {
                Ok(t.reshape((slots.len(), shape.num_kv_heads, hd))?
                    .transpose(0, 1)?
                    .to_dtype(DType::F32)?
                    .contiguous()?)
            };
            outs.push(causal(&qi, &heads(kc)?, &heads(vc)?, it.past, shape)?);
            off += n;
        }
        let out = Tensor::cat(&outs, 0)?;
        match decode.and_then(|d| d.order.as_ref()) {
            Some(order) => Ok(out.index_select(order, 0)?),
            None => Ok(out),
        }
    }
}

/// Attention of every one-token item of the batch at once, `[decoding, heads *
/// head_dim]`: keys and values gathered into `[decoding, kv_heads, longest,
/// head_dim]`, shorter sequences masked.
fn attend_decoding(
    layer: usize,
    q: &Tensor,
    d: &DecodeBatch,
    shape: AttentionShape,
    pool: &KvPool,
) -> Result<Tensor> {
    let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let (n, len) = (d.count, d.longest);
    let q = q
        .index_select(&d.rows, 1)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, nkv, nh / nkv, hd))?;
    let (kc, vc) = pool.gather(layer, &d.slots)?;
    let heads = |t: Tensor| -> Result<Tensor> {
        Ok(t.reshape((n, len, nkv, hd))?
            .transpose(1, 2)?
            .to_dtype(DType::F32)?
            .contiguous()?)
    };
    let (k, v) = (heads(kc)?, heads(vc)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&d.windowed_mask(shape.window)?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&v)?.reshape((n, nh * hd))?)
}

/// Causal attention of `q: [heads, n, d]` at positions `pos..pos + n` over the
/// cached `k, v: [kv_heads, pos + n, d]`; returns `[n, heads * d]`.
fn causal(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, shape: AttentionShape) -> Result<Tensor> {
    let (nh, n, d) = q.dims3()?;
    let nkv = shape.num_kv_heads;
    let groups = nh / nkv;
    let total = k.dim(1)?;
    // Query heads sharing a KV head are stacked along the row axis, so GQA needs
    // no copy of the cache: [kv_heads, groups * n, d] x [kv_heads, d, total].
    let q = q.reshape((nkv, groups * n, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    // Causal, and within the window where the layer has one.
    let first = |i: usize| shape.window.map_or(0, |w| (pos + i + 1).saturating_sub(w));
    let scores = if n > 1 || first(0) > 0 {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > pos + i || j < first(i) {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, total), q.device())?;
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

//! The operations on ZSE's CPU kernels: values read in place from candle's CPU
//! tensors, computed by `crate::kernels` (llama.cpp's arithmetic), and handed back
//! as new tensors without further copies.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::{Activation, AttentionShape, Backend, Ops, Step};
use crate::error::{Error, Result};
use crate::kernels::attention::{paged_attention, Heads, SeqAttn};
use crate::kernels::{elementwise, KernelPath, QWeight};
use crate::kv::KvPool;
use crate::model::rope::Rope;
use crate::model::weights::Weight;
use crate::model::BatchItem;

pub struct CpuOps {
    path: KernelPath,
    device: Device,
}

impl CpuOps {
    pub fn new(path: KernelPath) -> Self {
        Self {
            path,
            device: Device::Cpu,
        }
    }
}

/// Calls `f` with the values of `t` as f32, in place where `t` is a contiguous f32
/// tensor in CPU memory (as every activation here is), else from a copy.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end)), DType::F32) =
            (&*storage, layout.contiguous_offsets(), t.dtype())
        {
            return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
        }
    }
    Ok(f(&t
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?))
}

/// Below this many values a step's elementwise work stays on the calling thread
/// (a decode step's rows): handing it to the pool would cost more than it saves.
const PAR_VALUES: usize = 1 << 15;

/// Calls `f(first_row, block)` over blocks of `out`'s rows (`width` values each),
/// in parallel where there are values enough: a prefill's elementwise steps are
/// otherwise the time one thread works while the others wait. Each row is computed
/// on its own, so the blocks change no bits.
fn by_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let width = width.max(1);
    if out.len() < PAR_VALUES {
        return f(0, out);
    }
    let rows = out.len().div_ceil(width);
    let block = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    (out.par_chunks_mut(block * width).enumerate()).for_each(|(b, o)| f(b * block, o));
}

impl Ops for CpuOps {
    fn backend(&self) -> Backend {
        Backend::Kernels(self.path)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    /// ZSE's kernels where they handle the block type, candle's quantized matmul
    /// otherwise.
    fn weight(&self, t: Arc<QTensor>) -> Result<Weight> {
        match QWeight::from_qtensor(&t)? {
            Some(w) => Ok(Weight::Kernel(w, self.path)),
            None => Ok(Weight::Candle(QMatMul::from_arc(t)?)),
        }
    }

    fn begin<'a>(
        &self,
        items: &'a [BatchItem<'a>],
        vocab_size: usize,
        max_positions: usize,
    ) -> Result<Step<'a>> {
        Step::new(items, vocab_size, max_positions)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let mut y = vec![0f32; x.elem_count()];
        with_f32(x, |xs| {
            with_f32(weight, |w| {
                by_rows(&mut y, w.len(), |r, o| {
                    let first = r * w.len();
                    elementwise::rms_norm(&xs[first..first + o.len()], w, eps, o)
                })
            })
        })??;
        Ok(Tensor::from_vec(y, x.shape(), &self.device)?)
    }

    /// On the kernels' pool (`by_rows`), not candle's: candle sums large tensors
    /// on a pool of its own, whose worker then spins for a while, and on two cores,
    /// beside the kernels' workers, that took a core's share from the next matmul.
    fn add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if x.shape() != y.shape() {
            return Err(Error::Compute(format!(
                "adding {:?} to {:?}",
                y.shape(),
                x.shape()
            )));
        }
        let mut sum = vec![0f32; x.elem_count()];
        let width = x.dims().last().copied().unwrap_or(1);
        with_f32(x, |a| {
            with_f32(y, |b| {
                by_rows(&mut sum, width, |r, o| {
                    let at = r * width;
                    for ((o, a), b) in o.iter_mut().zip(&a[at..]).zip(&b[at..]) {
                        *o = a + b;
                    }
                })
            })
        })??;
        Ok(Tensor::from_vec(sum, x.shape(), &self.device)?)
    }

    fn gated(&self, act: Activation, gate_up: &Tensor) -> Result<Tensor> {
        let (tokens, both) = gate_up.dims2()?;
        let width = both / 2;
        let mut out = vec![0f32; tokens * width];
        with_f32(gate_up, |rows| {
            by_rows(&mut out, width, |r, block| {
                let rows = rows[r * both..].chunks_exact(both);
                for (row, o) in rows.zip(block.chunks_exact_mut(width)) {
                    let (gate, up) = row.split_at(width);
                    match act {
                        Activation::Silu => elementwise::swiglu(self.path, gate, up, o),
                        Activation::GeluTanh => elementwise::geglu(gate, up, o),
                    }
                }
            })
        })?;
        Ok(Tensor::from_vec(out, (tokens, width), &self.device)?)
    }

    fn rope(&self, x: &Tensor, rope: &Rope, step: &Step<'_>) -> Result<Tensor> {
        let (tokens, width) = x.dims2()?;
        let (hd, half) = (rope.head_dim(), rope.head_dim() / 2);
        let positions: &[u32] = &step.positions;
        let mut out = vec![0f32; tokens * width];
        with_f32(x, |rows| {
            with_f32(rope.cos(), |cos| {
                with_f32(rope.sin(), |sin| {
                    by_rows(&mut out, width, |r, block| {
                        for ((row, o), &pos) in rows[r * width..]
                            .chunks_exact(width)
                            .zip(block.chunks_exact_mut(width))
                            .zip(&positions[r..])
                        {
                            let at = pos as usize * half;
                            let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                            for (head, o) in row.chunks_exact(hd).zip(o.chunks_exact_mut(hd)) {
                                elementwise::rope_head(head, c, s, rope.style(), o);
                            }
                        }
                    })
                })
            })
        })???;
        Ok(Tensor::from_vec(out, (tokens, width), &self.device)?)
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
        let tokens = step.tokens();
        let windowed = pool.is_windowed(layer);
        let new_slots = step.new_slots_for(windowed);
        with_f32(k, |k| {
            with_f32(v, |v| pool.write_rows(layer, new_slots, k, v))
        })???;
        let (hd, nh) = (shape.head_dim, shape.num_heads);
        let mut seqs = Vec::with_capacity(step.items.len());
        let mut offset = 0;
        for it in step.items {
            seqs.push(SeqAttn {
                slots: it.slots_for(windowed),
                past: it.past,
                n: it.tokens.len(),
                offset,
            });
            offset += it.tokens.len();
        }
        let heads = Heads {
            num_heads: nh,
            num_kv_heads: shape.num_kv_heads,
            head_dim: hd,
            window: shape.window,
        };
        let out = with_f32(q, |q| {
            pool.with_rows(layer, |k, v| paged_attention(q, tokens, k, v, &seqs, heads))
        })??
        .ok_or_else(|| Error::Compute("the CPU kernels need the KV pool in CPU memory".into()))?;
        Ok(Tensor::from_vec(out, (tokens, nh * hd), &self.device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::elementwise::RopeStyle;
    use crate::model::Logits;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("f32 values")
    }

    /// `[tokens, width]` of varied values.
    fn rows(tokens: usize, width: usize, seed: usize) -> Tensor {
        let v = (0..tokens * width)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 400.0 - 2.5)
            .collect();
        Tensor::from_vec(v, (tokens, width), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn a_prefills_elementwise_steps_give_every_row_what_it_gets_alone() -> Result<()> {
        // Enough values for parallel blocks (PAR_VALUES), rows not a multiple of
        // any block.
        let ops = CpuOps::new(KernelPath::best());
        let (tokens, width, past) = (601, 64, 3);
        assert!(tokens * width >= PAR_VALUES);
        let (x, y, gate_up) = (
            rows(tokens, width, 1),
            rows(tokens, width, 2),
            rows(tokens, 2 * width, 3),
        );
        let w = rows(1, width, 4).flatten_all()?;
        let rope = Rope::new(
            16,
            10_000.0,
            None,
            RopeStyle::Neox,
            past + tokens,
            &Device::Cpu,
        )?;
        let ids = vec![1u32; tokens];
        let slots: Vec<u32> = (0..(past + tokens) as u32).collect();
        let item = |n: usize, past: usize| BatchItem {
            tokens: &ids[..n],
            past,
            slots: &slots[..past + n],
            window_slots: &slots[..past + n],
            logits: Logits::None,
        };
        let items = [item(tokens, past)];
        let step = ops.begin(&items, 2, past + tokens)?;
        let all = [
            ops.rms_norm(&x, &w, 1e-5)?,
            ops.add(&x, &y)?,
            ops.gated(Activation::Silu, &gate_up)?,
            ops.rope(&x, &rope, &step)?,
        ]
        .map(|t| values(&t));
        for t in (0..tokens).step_by(37).chain([tokens - 1]) {
            let row = |m: &Tensor| m.narrow(0, t, 1).and_then(|r| r.contiguous());
            let one = [item(1, past + t)];
            let one_step = ops.begin(&one, 2, past + tokens)?;
            let alone = [
                ops.rms_norm(&row(&x)?, &w, 1e-5)?,
                ops.add(&row(&x)?, &row(&y)?)?,
                ops.gated(Activation::Silu, &row(&gate_up)?)?,
                ops.rope(&row(&x)?, &rope, &one_step)?,
            ];
            for (k, (all, alone)) in all.iter().zip(&alone).enumerate() {
                assert_eq!(
                    &all[t * width..(t + 1) * width],
                    values(alone),
                    "step {k}, row {t}"
                );
            }
        }
        Ok(())
    }
}

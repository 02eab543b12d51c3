//! The operations on ZSE's CPU kernels: values read in place from candle's CPU
//! tensors, computed by `crate::kernels` (llama.cpp's arithmetic), and handed back
//! as new tensors without further copies.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Storage, Tensor};

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
        let y = with_f32(x, |xs| {
            with_f32(weight, |w| elementwise::rms_norm(xs, w, eps))
        })??;
        Ok(Tensor::from_vec(y, x.shape(), &self.device)?)
    }

    /// On this thread. Candle's own sum of large tensors runs on its pool, whose
    /// worker then spins for a while: on two cores, beside the kernels' workers, it
    /// took a core's share from the next matmul.
    fn add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if x.shape() != y.shape() {
            return Err(Error::Compute(format!(
                "adding {:?} to {:?}",
                y.shape(),
                x.shape()
            )));
        }
        let sum = with_f32(x, |a| {
            with_f32(y, |b| {
                a.iter().zip(b).map(|(a, b)| a + b).collect::<Vec<f32>>()
            })
        })??;
        Ok(Tensor::from_vec(sum, x.shape(), &self.device)?)
    }

    fn gated(&self, act: Activation, gate_up: &Tensor) -> Result<Tensor> {
        let (tokens, both) = gate_up.dims2()?;
        let width = both / 2;
        let mut out = vec![0f32; tokens * width];
        with_f32(gate_up, |rows| {
            for (row, o) in rows.chunks_exact(both).zip(out.chunks_exact_mut(width)) {
                let (gate, up) = row.split_at(width);
                match act {
                    Activation::Silu => elementwise::swiglu(self.path, gate, up, o),
                    Activation::GeluTanh => elementwise::geglu(gate, up, o),
                }
            }
        })?;
        Ok(Tensor::from_vec(out, (tokens, width), &self.device)?)
    }

    fn rope(&self, x: &Tensor, rope: &Rope, step: &Step<'_>) -> Result<Tensor> {
        let (tokens, width) = x.dims2()?;
        let (hd, half) = (rope.head_dim(), rope.head_dim() / 2);
        let mut out = vec![0f32; tokens * width];
        with_f32(x, |rows| {
            with_f32(rope.cos(), |cos| {
                with_f32(rope.sin(), |sin| {
                    for ((row, o), &pos) in rows
                        .chunks_exact(width)
                        .zip(out.chunks_exact_mut(width))
                        .zip(&step.positions)
                    {
                        let at = pos as usize * half;
                        let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                        for (head, o) in row.chunks_exact(hd).zip(o.chunks_exact_mut(hd)) {
                            elementwise::rope_head(head, c, s, rope.style(), o);
                        }
                    }
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
        // The kernel reads queries head by head: `[heads, tokens, head_dim]`.
        let (hd, nh) = (shape.head_dim, shape.num_heads);
        let mut by_head = vec![0f32; tokens * nh * hd];
        with_f32(q, |rows| {
            for (t, row) in rows.chunks_exact(nh * hd).enumerate() {
                for (head, x) in row.chunks_exact(hd).enumerate() {
                    by_head[(head * tokens + t) * hd..][..hd].copy_from_slice(x);
                }
            }
        })?;
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
        let out = pool
            .with_rows(layer, |k, v| {
                paged_attention(&by_head, tokens, k, v, &seqs, heads)
            })?
            .ok_or_else(|| {
                Error::Compute("the CPU kernels need the KV pool in CPU memory".into())
            })?;
        Ok(Tensor::from_vec(out, (tokens, nh * hd), &self.device)?)
    }
}

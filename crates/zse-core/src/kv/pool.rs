//! The KV cache's memory: per layer one key and one value tensor of
//! `[num_blocks * block_size, kv_heads * head_dim]` rows, one row per token
//! position ("slot"). Layers that attend within a sliding window have a pool of
//! their own (`window_blocks` blocks, numbered apart): a sequence keeps only its
//! window there. Which slots a sequence owns is the scheduler's business; this
//! module only writes rows at given slots and reads them back.

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};
use half::f16;

use crate::error::Result;
use crate::kernels::attention::KvRows;

#[derive(Debug)]
pub struct KvPool {
    layers: Vec<(Tensor, Tensor)>,
    /// Per layer: whether its rows are the windowed pool's.
    windowed: Vec<bool>,
    width: usize,
    block_size: usize,
    device: Device,
}

/// Slot indices prepared for one step, reused by every layer.
pub struct SlotWrite {
    /// `[n, width]`: each new row's slot, repeated across the row (scatter's layout).
    index: Tensor,
}

impl KvPool {
    /// Reserves the address space for `num_blocks` blocks for the layers not in
    /// `windowed`, and `window_blocks` for those in it (one flag per layer). The
    /// memory is not written here: pages are only touched as slots fill, so an idle
    /// budget costs no resident memory.
    pub fn new(
        windowed: &[bool],
        num_blocks: usize,
        window_blocks: usize,
        block_size: usize,
        width: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(windowed.len());
        for &w in windowed {
            let rows = if w { window_blocks } else { num_blocks } * block_size;
            // SAFETY: only slots written by `write` are ever read (`gather` reads the
            // slots of positions a sequence has computed), so uninitialised rows are
            // never observed.
            let k = unsafe { Tensor::empty((rows, width), dtype, device)? };
            let v = unsafe { Tensor::empty((rows, width), dtype, device)? };
            layers.push((k, v));
        }
        Ok(Self {
            layers,
            windowed: windowed.to_vec(),
            width,
            block_size,
            device: device.clone(),
        })
    }

    /// Whether `layer`'s slots are the windowed pool's.
    pub fn is_windowed(&self, layer: usize) -> bool {
        self.windowed.get(layer).copied().unwrap_or(false)
    }

    pub fn prepare_write(&self, slots: &[u32]) -> Result<SlotWrite> {
        let n = slots.len();
        let index = Tensor::from_slice(slots, (n, 1), &self.device)?
            .broadcast_as((n, self.width))?
            .contiguous()?;
        Ok(SlotWrite { index })
    }

    /// Stores the rows of `k` and `v` (`[n, width]`, any float dtype) at the slots.
    pub fn write(&self, layer: usize, at: &SlotWrite, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        kc.scatter_set(&at.index, &k.to_dtype(kc.dtype())?.contiguous()?, 0)?;
        vc.scatter_set(&at.index, &v.to_dtype(vc.dtype())?.contiguous()?, 0)?;
        Ok(())
    }

    /// Stores rows of `k` and `v` (`[slots.len(), width]`) at `slots`, in place,
    /// converting to the pool's dtype as `write` does: the CPU forward pass's write,
    /// without index tensors or copies. Errors on a pool outside CPU memory.
    pub fn write_rows(&self, layer: usize, slots: &[u32], k: &[f32], v: &[f32]) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        kc.inplace_op1(&WriteRows {
            slots,
            rows: k,
            width: self.width,
        })?;
        vc.inplace_op1(&WriteRows {
            slots,
            rows: v,
            width: self.width,
        })?;
        Ok(())
    }

    /// The rows at `slots` (a `[total]` u32 tensor), as `[total, width]` keys and values.
    pub fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kc, vc) = &self.layers[layer];
        Ok((kc.index_select(slots, 0)?, vc.index_select(slots, 0)?))
    }

    /// Calls `f` with one layer's key and value rows in place, when the pool lives in
    /// CPU memory (None elsewhere: the caller gathers instead).
    pub fn with_rows<R>(
        &self,
        layer: usize,
        f: impl FnOnce(KvRows<'_>, KvRows<'_>) -> R,
    ) -> Result<Option<R>> {
        let (k, v) = &self.layers[layer];
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
            return Ok(None);
        };
        // Pool tensors are created contiguous at offset 0 and never re-laid out.
        Ok(Some(match k.dtype() {
            DType::F16 => f(
                KvRows::F16(kc.as_slice::<f16>()?),
                KvRows::F16(vc.as_slice::<f16>()?),
            ),
            _ => f(
                KvRows::F32(kc.as_slice::<f32>()?),
                KvRows::F32(vc.as_slice::<f32>()?),
            ),
        }))
    }

    /// Copies the first `rows` slots of block `src` into block `dst` in every layer
    /// of one pool, the windowed layers' or the others' (copy-on-write of a shared,
    /// partly filled block).
    pub fn copy_block(&self, windowed: bool, src: u32, dst: u32, rows: usize) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let bs = self.block_size as u32;
        let from: Vec<u32> = (0..rows as u32).map(|i| src * bs + i).collect();
        let to: Vec<u32> = (0..rows as u32).map(|i| dst * bs + i).collect();
        let from = Tensor::from_vec(from, rows, &self.device)?;
        let to = self.prepare_write(&to)?;
        for layer in (0..self.layers.len()).filter(|&l| self.windowed[l] == windowed) {
            let (k, v) = self.gather(layer, &from)?;
            self.write(layer, &to, &k, &v)?;
        }
        Ok(())
    }
}

/// Rows of f32 stored at slots of a pool tensor (`KvPool::write_rows`).
struct WriteRows<'a> {
    slots: &'a [u32],
    rows: &'a [f32],
    width: usize,
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "zse-kv-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let w = self.width;
        if self.rows.len() != self.slots.len() * w {
            candle_core::bail!("{} values for {} slots", self.rows.len(), self.slots.len());
        }
        if layout.start_offset() != 0 {
            candle_core::bail!("a KV pool tensor not at the start of its storage");
        }
        let rows = self.rows.chunks_exact(w);
        match storage {
            // `from_f32` rounds to nearest even, as candle's `to_dtype` does.
            CpuStorage::F16(pool) => store(pool, self.slots, rows, w, |d, s| {
                d.iter_mut()
                    .zip(s)
                    .for_each(|(d, &s)| *d = f16::from_f32(s))
            }),
            CpuStorage::F32(pool) => store(pool, self.slots, rows, w, |d, s| d.copy_from_slice(s)),
            _ => candle_core::bail!("a KV pool of neither f16 nor f32"),
        }
    }
}

/// `put` of each row into its slot's row of `pool`; an error for a slot past its end.
fn store<T>(
    pool: &mut [T],
    slots: &[u32],
    rows: std::slice::ChunksExact<'_, f32>,
    width: usize,
    put: impl Fn(&mut [T], &[f32]),
) -> candle_core::Result<()> {
    let len = pool.len();
    for (&slot, row) in slots.iter().zip(rows) {
        let at = slot as usize * width;
        match pool.get_mut(at..at + width) {
            Some(dst) => put(dst, row),
            None => candle_core::bail!("KV slot {slot} past the pool's {} rows", len / width),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_at_slots_read_back_and_copy_between_blocks() -> Result<()> {
        let dev = Device::Cpu;
        let pool = KvPool::new(&[false, false], 4, 4, 2, 3, DType::F16, &dev)?;
        let k = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev)?;
        let v = (&k * 10.)?;
        let at = pool.prepare_write(&[5, 2])?;
        pool.write(1, &at, &k, &v)?;
        let (gk, gv) = pool.gather(1, &Tensor::new(&[2u32, 5], &dev)?)?;
        let gk = gk.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(gk, vec![vec![4., 5., 6.], vec![1., 2., 3.]]);
        assert_eq!(
            gv.to_dtype(DType::F32)?.to_vec2::<f32>()?[1],
            vec![10., 20., 30.]
        );
        // Block 1 holds slots 2 and 3; copy its first row into block 3 (slot 6).
        pool.copy_block(false, 1, 3, 1)?;
        let (ck, _) = pool.gather(1, &Tensor::new(&[6u32], &dev)?)?;
        assert_eq!(
            ck.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            vec![vec![4., 5., 6.]]
        );
        Ok(())
    }

    #[test]
    fn rows_written_in_place_are_the_rows_scatter_writes() -> Result<()> {
        let dev = Device::Cpu;
        // Values that f16 must round, in both dtypes.
        let k: Vec<f32> = (0..6).map(|i| 1.0 + i as f32 * 0.000_61 + 1e-4).collect();
        let v: Vec<f32> = k.iter().map(|x| -x * 1e3 - 0.5).collect();
        for dtype in [DType::F16, DType::F32] {
            let (a, b) = (
                KvPool::new(&[false], 4, 4, 2, 3, dtype, &dev)?,
                KvPool::new(&[false], 4, 4, 2, 3, dtype, &dev)?,
            );
            let slots = [5u32, 2];
            let (kt, vt) = (
                Tensor::from_slice(&k, (2, 3), &dev)?,
                Tensor::from_slice(&v, (2, 3), &dev)?,
            );
            a.write(0, &a.prepare_write(&slots)?, &kt, &vt)?;
            b.write_rows(0, &slots, &k, &v)?;
            let idx = Tensor::new(&slots, &dev)?;
            let ((ak, av), (bk, bv)) = (a.gather(0, &idx)?, b.gather(0, &idx)?);
            let bits = |t: Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            assert_eq!(bits(ak)?, bits(bk)?, "{dtype:?}");
            assert_eq!(bits(av)?, bits(bv)?, "{dtype:?}");
            // A slot past the pool (8 rows) is an error, not a panic.
            assert!(b.write_rows(0, &[8], &k[..3], &v[..3]).is_err());
            assert!(b.write_rows(0, &[1], &k, &v).is_err(), "rows for one slot");
        }
        Ok(())
    }
}

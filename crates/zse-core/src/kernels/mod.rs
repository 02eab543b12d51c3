//! CPU matrix multiplication for quantized weights (Q4_0, Q4_1, Q8_0), chosen at run
//! time among the paths this CPU supports, so one wheel is fast everywhere.
//!
//! Activations are quantized once per matmul to 8-bit blocks. Weight rows are split
//! across threads in tiles; inside a tile each weight block is unpacked once and
//! serves every activation row (a prefill chunk, or one row per sequence of a batched
//! decode), so weights stream from memory once per step, not once per row.
//! Every output element is one weight row times one activation row in a fixed order
//! (see `blocks`), so results do not depend on the batch, the tiling or the path.
//!
//! `ZSE_CPU_KERNELS=generic|avx2` picks a path (default: the best available).

pub mod blocks;

#[cfg(target_arch = "x86_64")]
mod avx2;

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

pub use blocks::WeightType;
use blocks::{quantize_row, ActBlock, QK};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    Generic,
    Avx2,
}

impl KernelPath {
    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            KernelPath::Generic => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 => false,
        }
    }

    /// Every path this CPU can run (for tests that compare them).
    pub fn all_supported() -> Vec<KernelPath> {
        [KernelPath::Generic, KernelPath::Avx2]
            .into_iter()
            .filter(|p| p.supported())
            .collect()
    }

    /// The best supported path, or the one `ZSE_CPU_KERNELS` names.
    pub fn select() -> Result<KernelPath> {
        match std::env::var("ZSE_CPU_KERNELS").ok().as_deref() {
            None | Some("") | Some("auto") => Ok(best()),
            Some(name) => {
                let path = match name {
                    "generic" => KernelPath::Generic,
                    "avx2" => KernelPath::Avx2,
                    other => {
                        return Err(Error::invalid_argument(
                            "ZSE_CPU_KERNELS",
                            format!("'{other}' (expected generic, avx2 or auto)"),
                        ))
                    }
                };
                if !path.supported() {
                    return Err(Error::Unsupported(format!(
                        "ZSE_CPU_KERNELS={name}: this CPU cannot run it"
                    )));
                }
                Ok(path)
            }
        }
    }
}

fn best() -> KernelPath {
    static BEST: OnceLock<KernelPath> = OnceLock::new();
    *BEST.get_or_init(|| {
        if KernelPath::Avx2.supported() {
            KernelPath::Avx2
        } else {
            KernelPath::Generic
        }
    })
}

/// A quantized weight matrix `[rows, cols]` in GGML block layout, row-major.
#[derive(Debug)]
pub struct QWeight {
    pub kind: WeightType,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
}

/// Weight rows per task: small enough to spread over threads, large enough that a
/// task's scheduling cost is noise.
const ROWS_PER_TASK: usize = 16;

impl QWeight {
    /// The weights of `t` if a kernel here handles its type (else None: candle's own
    /// matmul runs it).
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => WeightType::Q4_0,
            GgmlDType::Q4_1 => WeightType::Q4_1,
            GgmlDType::Q8_0 => WeightType::Q8_0,
            _ => return Ok(None),
        };
        let (rows, cols) = t.shape().dims2()?;
        if cols % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?.into_owned();
        Self::new(kind, rows, cols, data).map(Some)
    }

    pub fn new(kind: WeightType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if cols % QK != 0 || data.len() != rows * cols / QK * kind.block_bytes() {
            return Err(Error::Compute(format!(
                "{kind:?} weights of {rows}x{cols} need {} bytes, got {}",
                rows * cols / QK * kind.block_bytes(),
                data.len()
            )));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    fn row(&self, r: usize) -> &[u8] {
        let bytes = self.cols / QK * self.kind.block_bytes();
        &self.data[r * bytes..(r + 1) * bytes]
    }

    /// `x: [m, cols]` (row-major) times the transposed weights: `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize, path: KernelPath) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.cols);
        let mut act = Vec::with_capacity(m * self.cols / QK);
        for row in x.chunks_exact(self.cols) {
            quantize_row(row, &mut act);
        }
        let per_row = self.cols / QK;
        let xs: Vec<&[ActBlock]> = act.chunks_exact(per_row).collect();
        // Each task: a tile of weight rows against every activation row, giving
        // `[tile rows][m]`; scattered into `[m, rows]` at the end.
        let tiles: Vec<Vec<f32>> = (0..self.rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|tile| {
                let first = tile * ROWS_PER_TASK;
                let last = (first + ROWS_PER_TASK).min(self.rows);
                let mut out = vec![0f32; (last - first) * m];
                self.tile(first..last, &xs, path, &mut out);
                out
            })
            .collect();
        let mut y = vec![0f32; m * self.rows];
        for (tile, out) in tiles.iter().enumerate() {
            let first = tile * ROWS_PER_TASK;
            for (k, col) in out.chunks_exact(m).enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    y[r * self.rows + first + k] = v;
                }
            }
        }
        y
    }

    fn tile(
        &self,
        rows: std::ops::Range<usize>,
        xs: &[&[ActBlock]],
        path: KernelPath,
        out: &mut [f32],
    ) {
        let m = xs.len();
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 if path.supported() => {
                let ws: Vec<&[u8]> = rows.map(|r| self.row(r)).collect();
                // SAFETY: `supported()` checked AVX2 and FMA at run time.
                unsafe { avx2::tile(self.kind, &ws, xs, out) };
            }
            _ => {
                for (k, r) in rows.enumerate() {
                    let w = self.row(r);
                    for (i, x) in xs.iter().enumerate() {
                        out[k * m + i] = blocks::dot_generic(self.kind, w, x);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A pseudo-random matrix with a few large values, quantized by candle.
    fn weights(kind: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<f32>) {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                let v = (h % 2000) as f32 / 1000.0 - 1.0;
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, kind).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        (q, deq.to_vec1().unwrap())
    }

    fn activations(m: usize, cols: usize) -> Vec<f32> {
        (0..m * cols)
            .map(|i| ((i * 31 % 200) as f32 - 100.0) / 37.0)
            .collect()
    }

    #[test]
    fn every_path_and_type_matches_the_float_reference_on_awkward_shapes() {
        for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            // Rows not a multiple of the tile, one and many activation rows.
            for (rows, cols, m) in [(1, 32, 1), (17, 64, 3), (37, 576, 5), (5, 1536, 70)] {
                let (q, deq) = weights(kind, rows, cols, rows as u64);
                let w = QWeight::from_qtensor(&q).unwrap().unwrap();
                let x = activations(m, cols);
                let mut results = Vec::new();
                for path in KernelPath::all_supported() {
                    let y = w.matmul(&x, m, path);
                    for i in 0..m {
                        for r in 0..rows {
                            let exact: f32 =
                                (0..cols).map(|c| x[i * cols + c] * deq[r * cols + c]).sum();
                            let scale: f32 = (0..cols)
                                .map(|c| (x[i * cols + c] * deq[r * cols + c]).abs())
                                .sum();
                            // The error of 8-bit activations: well under 2% of the
                            // magnitude of the terms.
                            let got = y[i * rows + r];
                            assert!(
                                (got - exact).abs() <= 0.02 * scale + 1e-4,
                                "{kind:?} {path:?} {rows}x{cols} m={m}: {got} vs {exact}"
                            );
                        }
                    }
                    results.push(y);
                }
                // Every path gives the same bits.
                assert!(
                    results.windows(2).all(|p| p[0] == p[1]),
                    "{kind:?} paths differ"
                );
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        let (q, _) = weights(GgmlDType::Q4_1, 40, 576, 3);
        let w = QWeight::from_qtensor(&q).unwrap().unwrap();
        let x = activations(9, 576);
        for path in KernelPath::all_supported() {
            let batch = w.matmul(&x, 9, path);
            let alone = w.matmul(&x[4 * 576..5 * 576], 1, path);
            assert_eq!(alone, batch[4 * 40..5 * 40].to_vec());
        }
    }

    #[test]
    fn unknown_override_is_an_error() {
        std::env::set_var("ZSE_CPU_KERNELS", "sse9");
        assert!(KernelPath::select().is_err());
        std::env::remove_var("ZSE_CPU_KERNELS");
        assert!(KernelPath::select().unwrap().supported());
    }
}

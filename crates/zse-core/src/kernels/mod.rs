//! ZSE's CPU arithmetic, all of its SIMD in this one tree: matrix multiplication for
//! quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
//! IQ4_NL, IQ4_XS) and
//! float ones (F32, F16, BF16), chosen at run time among the paths this CPU supports,
//! so one wheel is fast everywhere, and the steps around it.
//!
//! - `weights`: GGML blocks repacked at load (rows interleaved in groups of sixteen,
//!   planes of 2, 4 or 8 bits and a plane of high bits, scales apart).
//! - `acts`: activations quantized once per matmul to 8-bit blocks.
//! - `generic`: the portable dot product, which defines the arithmetic.
//! - `x86`: the AVX2 and AVX-512 VNNI micro-kernels.
//! - `attention`: causal attention over the KV pool's rows where they lie.
//! - `elementwise`: RMSNorm, the gated activations, RoPE.
//!
//! Weight rows are split across the threads of the one rayon pool in tiles; inside a
//! tile each weight block is unpacked once and serves up to eight activation rows
//! (a prefill chunk, or one row per sequence of a batched decode), so weights stream
//! from memory once per step, not once per row. Every output element is one weight
//! row times one activation row in a fixed order (see `generic`), so results do not
//! depend on the batch, the tiling or the path.
//!
//! `ZSE_CPU_KERNELS=generic|avx2|avx512` (or the engine's `cpu_kernels` option) picks a
//! path (default: the best available); `candle` runs candle's own operations instead
//! (`model::Backend`).

pub mod acts;
pub mod attention;
pub mod elementwise;
pub mod generic;
pub mod weights;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use rayon::prelude::*;

pub use acts::Acts;
pub use weights::{Layout, QWeight, QK};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    Generic,
    Avx2,
    Avx512,
}

impl KernelPath {
    pub(crate) const ALL: [KernelPath; 3] =
        [KernelPath::Generic, KernelPath::Avx2, KernelPath::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Generic => "generic",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            KernelPath::Generic => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => {
                KernelPath::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU can run (for tests that compare them).
    pub fn all_supported() -> Vec<KernelPath> {
        Self::ALL.into_iter().filter(|p| p.supported()).collect()
    }

    /// The path `name` picks: `generic`, `avx2` or `avx512`, or the best this CPU
    /// runs for `auto` (or nothing). A path this CPU cannot run is an error.
    pub fn parse(name: &str) -> Result<KernelPath> {
        if name.is_empty() || name == "auto" {
            return Ok(Self::best());
        }
        let path = Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::invalid_argument(
                    "cpu_kernels",
                    format!("'{name}' (expected generic, avx2, avx512, candle or auto)"),
                )
            })?;
        if !path.supported() {
            return Err(Error::Unsupported(format!(
                "the {name} CPU kernels: this CPU cannot run them"
            )));
        }
        Ok(path)
    }

    /// The fastest path this CPU supports.
    pub fn best() -> KernelPath {
        static BEST: OnceLock<KernelPath> = OnceLock::new();
        *BEST.get_or_init(|| {
            KernelPath::ALL
                .into_iter()
                .rev()
                .find(|p| p.supported())
                .unwrap_or(KernelPath::Generic)
        })
    }
}

/// Weight rows per task: small enough to spread over threads, large enough that a
/// task's scheduling cost is noise, and one group of the kernels' interleaved rows.
const ROWS_PER_TASK: usize = 16;

/// Where a tile writes its results: element (activation row `i`, weight row `k`) of
/// a row-major `[m, ld]` output. Tiles run in parallel and write disjoint sets of
/// weight rows (columns), so they share the buffer through a raw pointer.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    ptr: *mut f32,
    ld: usize,
}

// SAFETY: an `Out` is only used by tiles that write disjoint elements, while the
// buffer it points into is borrowed mutably by `matmul`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `(i, k)` must lie in the buffer, and no other thread may write it.
    #[inline]
    pub(crate) unsafe fn set(self, i: usize, k: usize, v: f32) {
        *self.ptr.add(i * self.ld + k) = v;
    }
}

impl QWeight {
    /// `x: [m, cols]` (row-major) times the transposed weights: `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize, path: KernelPath) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "matmul input of the wrong size");
        // Quantized weights meet quantized activations; float weights the floats.
        let input = match self.layout.is_float() {
            true => Input::Floats(x, m),
            false => Input::Quantized(Acts::quantize(x, m)),
        };
        // Not zeroed first: the tiles write every element (a prefill's outputs are
        // megabytes, and filling them cost more than the elementwise steps).
        let mut y: Vec<f32> = Vec::with_capacity(m * self.rows);
        let out = Out {
            ptr: y.as_mut_ptr(),
            ld: self.rows,
        };
        (0..self.rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|tile| {
                let first = tile * ROWS_PER_TASK;
                let rows = first..(first + ROWS_PER_TASK).min(self.rows);
                // SAFETY: tiles cover disjoint weight rows of `y`'s capacity, which
                // outlives them.
                unsafe { self.tile(rows, &input, path, out) };
            });
        // SAFETY: the tiles cover every weight row, and each writes its rows for
        // every activation row (`tile`'s contract): all `m * rows` elements.
        unsafe { y.set_len(m * self.rows) };
        y
    }

    /// Writes `(i, k)` for every activation row `i` and every weight row `k` in
    /// `rows`: `matmul` relies on it to leave no element of its output unwritten.
    ///
    /// # Safety
    /// As `Out::set` for every `(i, k)` of the tile.
    unsafe fn tile(&self, rows: std::ops::Range<usize>, input: &Input, path: KernelPath, out: Out) {
        #[cfg(target_arch = "x86_64")]
        if path.supported() {
            // SAFETY: `supported()` checked the path's features at run time.
            let done = match (path, input) {
                (KernelPath::Avx2, Input::Quantized(a)) => {
                    x86::avx2::tile(self, rows.clone(), a, out)
                }
                (KernelPath::Avx512, Input::Quantized(a)) => {
                    x86::avx512::tile(self, rows.clone(), a, out)
                }
                (KernelPath::Avx2, &Input::Floats(x, m)) => {
                    x86::avx2::float_tile(self, rows.clone(), x, m, out)
                }
                (KernelPath::Avx512, &Input::Floats(x, m)) => {
                    x86::avx512::float_tile(self, rows.clone(), x, m, out)
                }
                (KernelPath::Generic, _) => false,
            };
            if done {
                return;
            }
        }
        for k in rows {
            match *input {
                Input::Quantized(ref a) => {
                    for i in 0..a.m {
                        out.set(i, k, generic::dot(self, k, a, i));
                    }
                }
                Input::Floats(x, m) => {
                    for (i, v) in generic::float_dots(self, k, x, m).into_iter().enumerate() {
                        out.set(i, k, v);
                    }
                }
            }
        }
    }
}

/// A matmul's activations as its weights' kernels take them.
enum Input<'a> {
    Quantized(Acts),
    /// `m` rows, unquantized.
    Floats(&'a [f32], usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BlockType;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn hash(i: usize, seed: u64) -> u64 {
        (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40
    }

    /// A pseudo-random matrix with a few large values, repacked, and its values as
    /// GGML dequantizes them: quantized by candle, or for the IQ4 types (which
    /// candle cannot quantize) random blocks, every index and sub-block scale.
    fn weights(kind: BlockType, rows: usize, cols: usize, seed: u64) -> (QWeight, Vec<f32>) {
        let Some(dtype) = kind.candle() else {
            let mut bytes: Vec<u8> = (0..rows * cols / kind.block_size() * kind.type_size())
                .map(|i| hash(i, seed) as u8)
                .collect();
            // Each block's f16 scale a modest one (bytes 0..2 of every block).
            for blk in bytes.chunks_exact_mut(kind.type_size()) {
                let d = half::f16::from_f32(0.002 + (blk[2] % 50) as f32 * 1e-4);
                blk[..2].copy_from_slice(&d.to_le_bytes());
            }
            let deq = weights::dequantize(kind, &[rows, cols], &bytes).unwrap();
            return (QWeight::from_ggml(kind, rows, cols, &bytes).unwrap(), deq);
        };
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let v = (hash(i, seed) % 2000) as f32 / 1000.0 - 1.0;
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        (
            QWeight::from_qtensor(&q).unwrap().unwrap(),
            deq.to_vec1().unwrap(),
        )
    }

    fn activations(m: usize, cols: usize) -> Vec<f32> {
        (0..m * cols)
            .map(|i| ((i * 31 % 200) as f32 - 100.0) / 37.0)
            .collect()
    }

    #[test]
    fn every_path_and_type_matches_the_float_reference_on_awkward_shapes() {
        for kind in [
            GgmlDType::Q4_0.into(),
            GgmlDType::Q4_1.into(),
            GgmlDType::Q5_0.into(),
            GgmlDType::Q5_1.into(),
            GgmlDType::Q8_0.into(),
            GgmlDType::Q2K.into(),
            GgmlDType::Q3K.into(),
            GgmlDType::Q4K.into(),
            GgmlDType::Q5K.into(),
            GgmlDType::Q6K.into(),
            BlockType::IQ4NL,
            BlockType::IQ4XS,
            GgmlDType::F32.into(),
            GgmlDType::F16.into(),
            GgmlDType::BF16.into(),
        ] {
            // Rows not a multiple of the tile or of four; an odd number of blocks;
            // activation rows below, at and beyond eight (and for floats, rows of
            // sixteen lanes but not of a block; batches of one to five, and every
            // count of rows left over past blocks of six).
            let shapes: &[(usize, usize, usize)] = if kind.block_size() == 256 {
                &[(1, 256, 1), (19, 512, 9), (6, 1536, 70)]
            } else if kind.block_size() == 1 {
                &[
                    (1, 16, 1),
                    (4, 16, 2),
                    (17, 48, 3),
                    (3, 32, 4),
                    (2, 16, 5),
                    (37, 576, 8),
                    (7, 48, 9),
                    (6, 32, 10),
                    (9, 64, 11),
                    (5, 208, 13),
                ]
            } else {
                &[(1, 32, 1), (17, 96, 3), (37, 576, 8), (5, 1536, 70)]
            };
            for &(rows, cols, m) in shapes {
                let (w, deq) = weights(kind, rows, cols, rows as u64);
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
                            // magnitude of the terms; float weights meet the floats
                            // themselves, so only rounding remains.
                            let tol = if kind.block_size() == 1 { 1e-5 } else { 0.02 };
                            let got = y[i * rows + r];
                            assert!(
                                (got - exact).abs() <= tol * scale + 1e-4,
                                "{kind} {path:?} {rows}x{cols} m={m}: {got} vs {exact}"
                            );
                        }
                    }
                    results.push(y);
                }
                // Every path gives the portable path's bits (generic comes first).
                for (path, y) in KernelPath::all_supported().iter().zip(&results).skip(1) {
                    assert!(y == &results[0], "{kind}: {path:?} differs from generic");
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        for kind in [
            GgmlDType::Q4_1.into(),
            BlockType::IQ4NL,
            GgmlDType::F16.into(),
        ] {
            let (w, _) = weights(kind, 40, 576, 3);
            let x = activations(9, 576);
            for path in KernelPath::all_supported() {
                let batch = w.matmul(&x, 9, path);
                let alone = w.matmul(&x[4 * 576..5 * 576], 1, path);
                assert_eq!(alone, batch[4 * 40..5 * 40].to_vec(), "{kind} {path:?}");
            }
        }
    }

    #[test]
    fn paths_are_chosen_by_name() {
        assert!(KernelPath::parse("sse9").is_err());
        for path in KernelPath::ALL {
            assert_eq!(
                KernelPath::parse(path.name()).ok(),
                path.supported().then_some(path)
            );
        }
        for best in ["auto", ""] {
            let p = KernelPath::parse(best).unwrap();
            assert!(p.supported() && p == KernelPath::best());
        }
    }
}

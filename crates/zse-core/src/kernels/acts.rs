//! Activations quantized to 8 bits once per matmul (llama.cpp's Q8_0/Q8_1 form), laid
//! out for the kernels: each row's blocks of 32 values contiguous (a kernel
//! broadcasts four values at a time from them), and per row and block the scale, the
//! scaled sum (the correction term of weights with a minimum) and the exact integer
//! sums of the block and of its two halves (the correction of weights stored
//! unsigned, `q - offset`).

use half::f16;
use rayon::prelude::*;

use super::weights::QK;

/// Rows per parallel task: below this, a row is cheaper than the dispatch.
const PAR_MIN_ROWS: usize = 16;

/// One block of 32 quantized values, aligned for a vector load.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct QBlock(pub [i8; QK]);

/// What a kernel needs of one block besides its values.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockSums {
    /// The scale, rounded through f16.
    pub d: f32,
    /// The scale times the sum of the values, rounded through f16 (llama.cpp's Q8_1
    /// form: the correction for Q4_1 and Q5_1's minimums).
    pub s: f32,
    /// The same product in f32 (the correction for Q4_K and Q5_K's minimums, which
    /// llama.cpp takes from exact sums; through f16 it costs them visible quality).
    pub s_exact: f32,
    /// The sum of the values.
    pub sum: i32,
    /// The sums of values 0..16 and 16..32.
    pub halves: [i32; 2],
}

/// `m` rows of `nb` blocks.
#[derive(Debug)]
pub struct Acts {
    pub m: usize,
    pub nb: usize,
    /// `[row][block]`.
    qs: Vec<QBlock>,
    /// `[row][block]`.
    sums: Vec<BlockSums>,
}

impl Acts {
    /// Quantizes `x: [m, nb * 32]` (rows in parallel when there are many).
    pub fn quantize(x: &[f32], m: usize) -> Self {
        let cols = x.len() / m.max(1);
        let nb = cols / QK;
        let mut qs = vec![QBlock([0; QK]); m * nb];
        let mut sums = vec![BlockSums::default(); m * nb];
        let rows = qs
            .par_chunks_mut(nb.max(1))
            .zip(sums.par_chunks_mut(nb.max(1)))
            .zip(x.par_chunks(cols.max(1)));
        rows.with_min_len(PAR_MIN_ROWS)
            .for_each(|((qs, sums), row)| quantize_row(row, qs, sums));
        Acts { m, nb, qs, sums }
    }

    /// The blocks of row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> &[QBlock] {
        &self.qs[i * self.nb..(i + 1) * self.nb]
    }

    /// The sums of row `i`'s blocks.
    #[inline]
    pub fn row_sums(&self, i: usize) -> &[BlockSums] {
        &self.sums[i * self.nb..(i + 1) * self.nb]
    }
}

/// One row: llama.cpp's x86 rounding (scale by 127 / max, round half to even), the
/// scale and the scaled sum rounded through f16.
fn quantize_row(row: &[f32], qs: &mut [QBlock], sums: &mut [BlockSums]) {
    // Written so that the compiler vectorises it (eight lanes of maxima; each half's
    // values and sum in one loop without a data-dependent index): a prefill's
    // activations are millions of values, and the scalar loop cost a fifth of it.
    for ((chunk, q), out) in row.chunks_exact(QK).zip(qs).zip(sums) {
        let mut lanes = [0f32; 8];
        for c in chunk.chunks_exact(8) {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = m.max(v.abs());
            }
        }
        // The largest magnitude, whatever the order it is found in.
        let amax = lanes.iter().fold(0f32, |acc, &v| acc.max(v));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut halves = [0i32; 2];
        for ((qh, xh), sum) in
            q.0.chunks_exact_mut(16)
                .zip(chunk.chunks_exact(16))
                .zip(&mut halves)
        {
            for (q, &v) in qh.iter_mut().zip(xh) {
                *q = (v * id).round_ties_even() as i8;
                *sum += *q as i32;
            }
        }
        let sum = halves[0] + halves[1];
        let d16 = f16::from_f32(d).to_f32();
        *out = BlockSums {
            d: d16,
            s: f16::from_f32(d * sum as f32).to_f32(),
            s_exact: d16 * sum as f32,
            sum,
            halves,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_the_scaled_values_rounded_half_to_even() {
        // Against the plain definition, on values with exact halves after scaling
        // (127 / 63.5 = 2: 0.25 -> 0.5 -> 0, 0.75 -> 1.5 -> 2) and both signs.
        let x: Vec<f32> = (0..64)
            .map(|i| match i % 5 {
                0 => 63.5,
                1 => 0.25,
                2 => -0.75,
                3 => -(i as f32) / 3.0,
                _ => i as f32 * 0.37,
            })
            .collect();
        let a = Acts::quantize(&x, 1);
        for (b, blk) in a.row(0).iter().enumerate() {
            let chunk = &x[32 * b..32 * b + 32];
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, &q) in blk.0.iter().enumerate() {
                let want = (chunk[j] * (127.0 / amax)).round_ties_even() as i8;
                assert_eq!(q, want, "block {b} value {j}");
            }
        }
        assert_eq!(a.row(0)[0].0[1], 0);
        assert_eq!(a.row(0)[0].0[2], -2);
    }

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) / 7.0).collect();
        let a = Acts::quantize(&x, 2);
        assert_eq!((a.m, a.nb), (2, 2));
        for i in 0..2 {
            for (b, (blk, sums)) in a.row(i).iter().zip(a.row_sums(i)).enumerate() {
                let q = &blk.0;
                let halves = [0, 1].map(|h| q[16 * h..16 * h + 16].iter().map(|&v| v as i32).sum());
                assert_eq!((sums.halves, sums.sum), (halves, halves[0] + halves[1]));
                let exact = sums.d * sums.sum as f32;
                assert!((sums.s - exact).abs() <= 1e-2 * exact.abs() + 1e-3);
                for (j, &v) in q.iter().enumerate() {
                    let orig = x[i * 64 + b * 32 + j];
                    assert!((v as f32 * sums.d - orig).abs() <= sums.d * 0.51 + 1e-3);
                }
            }
        }
    }
}

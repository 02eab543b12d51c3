//! Activations quantized to 8 bits once per matmul (llama.cpp's Q8_0/Q8_1 form), laid
//! out for the kernels: each row's blocks of 32 values contiguous, and the per-block
//! scales twice, by row (eight consecutive blocks of a row are one vector load) and
//! transposed (`[block][row]`: the portable code's order, and the sums of one block of
//! eight consecutive rows in one load); and each whole group of eight rows again,
//! interleaved block by block with its scales splatted, for the kernels' batched form.

use half::f16;
use rayon::prelude::*;

use super::weights::QK;

/// Rows per parallel task: below this, a row is cheaper than the dispatch.
const PAR_MIN_ROWS: usize = 16;

/// One block of 32 quantized values, aligned for a vector load.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct QBlock(pub [i8; QK]);

/// Rows the kernels take at once in their batched form.
pub const GROUP: usize = 8;

/// One block of a group of `GROUP` consecutive rows: the rows' blocks, then their
/// scales, each repeated in eight lanes. A kernel serving the group finds row `r`'s
/// block and scale at fixed offsets (no address arithmetic per row) and loads the
/// scale as a vector (no shuffle to broadcast it).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct GroupBlock {
    pub qs: [QBlock; GROUP],
    pub d: [[f32; 8]; GROUP],
}

/// `m` rows of `nb` blocks.
#[derive(Debug)]
pub struct Acts {
    pub m: usize,
    pub nb: usize,
    /// `nb` rounded up to a multiple of 8.
    pub nbp: usize,
    /// `[row][block]`.
    qs: Vec<QBlock>,
    /// `[row][nbp]` (zero padded): the scales by row.
    pub d_rows: Vec<f32>,
    /// `[row][nbp]` (zero padded): the scaled sums by row.
    pub s_rows: Vec<f32>,
    /// `[block][row]`: the scale, rounded through f16.
    pub d: Vec<f32>,
    /// `[block][row]`: the scale times the sum of the block's values, rounded through
    /// f16 (the correction term of weights with a minimum).
    pub s: Vec<f32>,
    /// `[group][block]`: the rows of each whole group of `GROUP` (`m / GROUP`
    /// groups), again, block by block.
    pub groups: Vec<GroupBlock>,
}

impl Acts {
    /// Quantizes `x: [m, nb * 32]` (rows in parallel when there are many).
    pub fn quantize(x: &[f32], m: usize) -> Self {
        let cols = x.len() / m.max(1);
        let nb = cols / QK;
        let mut qs = vec![QBlock([0; QK]); m * nb];
        // Per row and block: (scale, scaled sum), transposed below.
        let mut ds = vec![(0f32, 0f32); m * nb];
        let rows = qs
            .par_chunks_mut(nb.max(1))
            .zip(ds.par_chunks_mut(nb.max(1)))
            .zip(x.par_chunks(cols.max(1)));
        rows.with_min_len(PAR_MIN_ROWS)
            .for_each(|((qs, ds), row)| quantize_row(row, qs, ds));
        let nbp = nb.next_multiple_of(8);
        let (mut d, mut s) = (vec![0.0; m * nb], vec![0.0; m * nb]);
        let (mut d_rows, mut s_rows) = (vec![0.0; m * nbp], vec![0.0; m * nbp]);
        for (i, row) in ds.chunks_exact(nb.max(1)).enumerate() {
            for (b, &(db, sb)) in row.iter().enumerate() {
                d[b * m + i] = db;
                s[b * m + i] = sb;
                d_rows[i * nbp + b] = db;
                s_rows[i * nbp + b] = sb;
            }
        }
        let mut groups = Vec::with_capacity(m / GROUP * nb);
        for g in 0..m / GROUP {
            for b in 0..nb {
                let row = |r: usize| (g * GROUP + r) * nb + b;
                groups.push(GroupBlock {
                    qs: std::array::from_fn(|r| qs[row(r)]),
                    d: std::array::from_fn(|r| [ds[row(r)].0; 8]),
                });
            }
        }
        Acts {
            m,
            nb,
            nbp,
            qs,
            d_rows,
            s_rows,
            d,
            s,
            groups,
        }
    }

    /// The blocks of row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> &[QBlock] {
        &self.qs[i * self.nb..(i + 1) * self.nb]
    }

    /// Block `b` of row `i`.
    #[inline]
    pub fn block(&self, i: usize, b: usize) -> &QBlock {
        &self.qs[i * self.nb + b]
    }
}

/// One row: llama.cpp's x86 rounding (scale by 127 / max, round half to even), the
/// scale and the scaled sum rounded through f16.
fn quantize_row(row: &[f32], qs: &mut [QBlock], ds: &mut [(f32, f32)]) {
    for ((chunk, q), ds) in row.chunks_exact(QK).zip(qs).zip(ds) {
        let amax = chunk.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in q.0.iter_mut().zip(chunk) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        *ds = (
            f16::from_f32(d).to_f32(),
            f16::from_f32(d * sum as f32).to_f32(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) / 7.0).collect();
        let a = Acts::quantize(&x, 2);
        assert_eq!((a.m, a.nb), (2, 2));
        for i in 0..2 {
            for b in 0..2 {
                let (d, s) = (a.d[b * 2 + i], a.s[b * 2 + i]);
                let q = &a.block(i, b).0;
                let sum: i32 = q.iter().map(|&v| v as i32).sum();
                assert!((s - d * sum as f32).abs() <= 1e-2 * (d * sum as f32).abs() + 1e-3);
                for (j, &v) in q.iter().enumerate() {
                    let orig = x[i * 64 + b * 32 + j];
                    assert!((v as f32 * d - orig).abs() <= d * 0.51 + 1e-3);
                }
            }
        }
    }
}

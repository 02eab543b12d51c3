//! The portable dot product, and the definition of the arithmetic every path follows.
//!
//! One weight row times one activation row is computed the way llama.cpp's AVX2 code
//! computes it: per 32-value block an exact integer dot split into 8 lanes of 4
//! values (each lane's integer times its half block's 8-bit factor, for Q6_K), each
//! lane scaled (`weight scale * activation scale`) and fused-multiply-added into its
//! own f32 accumulator; for weights with a minimum, `minimum *
//! activation sum` added to a separate running sum; the 8 accumulators summed in a
//! fixed tree at the end. The vector paths take these exact steps, so every path gives
//! the same bits, and the order never depends on how many rows are multiplied at once.
//!
//! Float weights meet the activations unquantized: value `j` is fused-multiply-added
//! into lane `j % 8`, in order, and the lanes summed as above.

use super::acts::Acts;
use super::weights::QWeight;

/// Sums 8 f32 lanes in the order of llama.cpp's `hsum_float_8`.
#[inline]
pub fn hsum8(a: &[f32; 8]) -> f32 {
    let x = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (x[0] + x[2]) + (x[1] + x[3])
}

/// Weight row `r` times activation row `i`.
pub fn dot(w: &QWeight, r: usize, a: &Acts, i: usize) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for b in 0..w.nb {
        let wq = w.block(r, b);
        let xq = &a.block(i, b).0;
        let dd = w.d.get(r * w.nbp + b) * a.d[b * a.m + i];
        let halves = w.halves(r, b);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * lane..4 * lane + 4)
                .map(|j| wq[j] as i32 * xq[j] as i32)
                .sum();
            let s = s * halves[lane / 4] as i32;
            *acc = dd.mul_add(s as f32, *acc);
        }
        if w.layout.has_min() {
            summs += w.m.get(r * w.nbp + b) * a.s[b * a.m + i];
        }
    }
    hsum8(&acc) + summs
}

/// Row `r` of float weights times each of the `m` activation rows of `x`
/// (unquantized, `[m, cols]`).
///
/// The fused multiply-adds are correctly rounded whether or not the CPU has them, so
/// where it does this same code is compiled with them (else `mul_add` is a slow
/// library call): the bits are the same, only the speed differs.
pub fn float_dots(w: &QWeight, r: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut row = vec![0f32; w.cols];
    w.dequantize_row(r, &mut row);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the feature, checked just above.
        return unsafe { float_dots_fma(&row, x, m) };
    }
    dots(&row, x, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn float_dots_fma(row: &[f32], x: &[f32], m: usize) -> Vec<f32> {
    dots(row, x, m)
}

#[inline(always)]
fn dots(row: &[f32], x: &[f32], m: usize) -> Vec<f32> {
    x.chunks_exact(row.len())
        .take(m)
        .map(|x| {
            let mut acc = [0f32; 8];
            for (w, x) in row.chunks_exact(8).zip(x.chunks_exact(8)) {
                for lane in 0..8 {
                    acc[lane] = w[lane].mul_add(x[lane], acc[lane]);
                }
            }
            hsum8(&acc)
        })
        .collect()
}

//! The portable dot products, and the definition of the arithmetic every path follows.
//!
//! One weight row times one activation row: per 32-value block the exact integer dot of
//! the weights' integers and the activations' (for Q2_K, Q3_K and Q6_K, each half's dot
//! times its 8-bit factor), converted to f32 (exactly: it stays under 2^24) and
//! fused-multiply-added, scaled by `weight scale * activation scale`, into one f32
//! accumulator, block after block; for weights with a minimum, `minimum * activation
//! sum` added to a separate running sum (the sum rounded through f16 where the minimums
//! are f16, as llama.cpp's Q8_1; in f32 for Q4_K and Q5_K; for Q2_K, whose halves scale
//! the minimum by factors of their own, the activations' scale times the halves' exact
//! sums weighted by those factors), and the two sums added at the end. The vector paths
//! take these exact steps for a group of weight rows at once, so every path gives the
//! same bits, and the order never depends on how many rows are multiplied at once.
//!
//! Float weights meet the activations unquantized: value `j` is fused-multiply-added
//! into lane `j % 16`, in order; lanes `l` and `l + 8` are added, and those eight
//! summed as `hsum8` does.

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
    let mut acc = 0f32;
    let mut summs = 0f32;
    for (b, (xq, xs)) in a.row(i).iter().zip(a.row_sums(i)).enumerate().take(w.nb) {
        let wq = w.block(r, b);
        let halves = w.halves(r, b);
        let mut isum = 0i32;
        for (h, &f) in halves.iter().enumerate() {
            let s: i32 = (16 * h..16 * h + 16)
                .map(|j| wq[j] as i32 * xq.0[j] as i32)
                .sum();
            isum += s * f as i32;
        }
        acc = (w.scale(r, b) * xs.d).mul_add(isum as f32, acc);
        if w.layout.has_min() {
            // f16 minimums (Q4_1, Q5_1) take the f16 sum, f32 ones (Q4_K, Q5_K) the
            // f32; Q2_K's, a factor per half, the halves' exact sums weighted by
            // their factors, times the activations' scale.
            let s = match w.min_halves(r, b) {
                Some(t) => xs.d * (t[0] as i32 * xs.halves[0] + t[1] as i32 * xs.halves[1]) as f32,
                None if w.m.is_half() => xs.s,
                None => xs.s_exact,
            };
            summs += w.min(r, b) * s;
        }
    }
    acc + summs
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
            let mut acc = [0f32; 16];
            for (w, x) in row.chunks_exact(16).zip(x.chunks_exact(16)) {
                for lane in 0..16 {
                    acc[lane] = w[lane].mul_add(x[lane], acc[lane]);
                }
            }
            hsum8(&std::array::from_fn(|l| acc[l] + acc[l + 8]))
        })
        .collect()
}

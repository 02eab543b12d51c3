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

//! The AVX2 path: the same arithmetic as `blocks::dot_generic`, eight lanes at a
//! time, with the accumulator in a register. A tile's weight rows stay in L1 while
//! every activation row passes over them, so each weight byte comes from memory once
//! per matmul, not once per row.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blocks::{f16_at, hsum8, ActBlock, WeightType};

/// `out[k * m + i] = dot(weight row k of the tile, activation row i)`.
///
/// # Safety
/// The CPU must support AVX2 and FMA (checked by the caller at run time).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile(t: WeightType, rows: &[&[u8]], xs: &[&[ActBlock]], out: &mut [f32]) {
    let m = xs.len();
    for (i, x) in xs.iter().enumerate() {
        for (k, w) in rows.iter().enumerate() {
            out[k * m + i] = dot(t, w, x);
        }
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot(t: WeightType, w: &[u8], x: &[ActBlock]) -> f32 {
    let bb = t.block_bytes();
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (blk, xb) in w.chunks_exact(bb).zip(x) {
        // The block's 32 values as bytes, in element order.
        let wv = match t {
            WeightType::Q4_0 | WeightType::Q4_1 => {
                let qs = _mm_loadu_si128(blk[bb - 16..].as_ptr() as *const __m128i);
                let lo = _mm_and_si128(qs, low);
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low);
                let v = _mm256_set_m128i(hi, lo);
                if t == WeightType::Q4_0 {
                    _mm256_sub_epi8(v, _mm256_set1_epi8(8))
                } else {
                    v
                }
            }
            WeightType::Q8_0 => _mm256_loadu_si256(blk[2..].as_ptr() as *const __m256i),
        };
        let xv = _mm256_load_si256(xb.qs.as_ptr() as *const __m256i);
        // Signed times signed through the unsigned-by-signed multiply:
        // |w| * (x * sign(w)), pairs summed to i16, then fours to i32 lanes.
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        let p32 = _mm256_madd_epi16(p16, ones);
        let dd = _mm256_set1_ps(f16_at(blk, 0) * xb.d);
        acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p32), acc);
        if t == WeightType::Q4_1 {
            summs += f16_at(blk, 2) * xb.s;
        }
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    hsum8(&lanes) + summs
}

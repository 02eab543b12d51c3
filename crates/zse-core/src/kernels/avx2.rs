//! The AVX2 path: the same arithmetic as `blocks::dot_generic`, eight lanes at a
//! time, with the accumulators in registers. Activation rows go eight (then four, then
//! one) at a time: each weight block is unpacked once for all of them. A tile's weight rows stay in L1 while
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
    let mut i = 0;
    while i + 8 <= m {
        let group: [&[ActBlock]; 8] = std::array::from_fn(|r| xs[i + r]);
        for (k, w) in rows.iter().enumerate() {
            out[k * m + i..k * m + i + 8].copy_from_slice(&dot::<8>(t, w, &group));
        }
        i += 8;
    }
    while i + 4 <= m {
        let group: [&[ActBlock]; 4] = std::array::from_fn(|r| xs[i + r]);
        for (k, w) in rows.iter().enumerate() {
            out[k * m + i..k * m + i + 4].copy_from_slice(&dot::<4>(t, w, &group));
        }
        i += 4;
    }
    for (i, x) in xs.iter().enumerate().skip(i) {
        for (k, w) in rows.iter().enumerate() {
            out[k * m + i] = dot::<1>(t, w, &[x])[0];
        }
    }
}

/// One weight row against `R` activation rows.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot<const R: usize>(t: WeightType, w: &[u8], xs: &[&[ActBlock]; R]) -> [f32; R] {
    let bb = t.block_bytes();
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut summs = [0f32; R];
    for (b, blk) in w.chunks_exact(bb).enumerate() {
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
        // Signed times signed through the unsigned-by-signed multiply:
        // |w| * (x * sign(w)), pairs summed to i16, then fours to i32 lanes.
        let wabs = _mm256_sign_epi8(wv, wv);
        let d = f16_at(blk, 0);
        let m = if t == WeightType::Q4_1 {
            f16_at(blk, 2)
        } else {
            0.0
        };
        for r in 0..R {
            let xb = &xs[r][b];
            let xv = _mm256_load_si256(xb.qs.as_ptr() as *const __m256i);
            let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
            let p32 = _mm256_madd_epi16(p16, ones);
            let dd = _mm256_set1_ps(d * xb.d);
            acc[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p32), acc[r]);
            if t == WeightType::Q4_1 {
                summs[r] += m * xb.s;
            }
        }
    }
    let mut y = [0f32; R];
    for r in 0..R {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
        y[r] = hsum8(&lanes) + summs[r];
    }
    y
}

//! GGML block formats for the CPU kernels, the 8-bit quantization of activations,
//! and the portable (generic) dot products.
//!
//! A dot product of one weight row with one activation row is computed the way
//! llama.cpp's AVX2 code computes it: per 32-value block an exact integer dot split
//! into 8 lanes of 4 values, each lane scaled and fused-multiply-added into its own
//! f32 accumulator, the 8 accumulators summed in a fixed tree at the end. The generic
//! code below follows those exact steps, so every kernel path gives the same bits,
//! and the order never depends on how many rows are multiplied at once.

use half::f16;

/// Values per block for every type here.
pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl WeightType {
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::Q4_0 => 18,
            WeightType::Q4_1 => 20,
            WeightType::Q8_0 => 34,
        }
    }
}

/// One block of an activation row, quantized to 8 bits (llama.cpp's Q8_0/Q8_1: the
/// scale, and the scale times the sum of the values, both rounded through f16).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct ActBlock {
    pub qs: [i8; QK],
    pub d: f32,
    pub s: f32,
}

/// Quantizes `x` (a multiple of 32 values) into blocks.
pub fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        // As llama.cpp's x86 code: scale by 127 / max, round half to even.
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(chunk) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        out.push(ActBlock {
            qs,
            d: f16::from_f32(d).to_f32(),
            s: f16::from_f32(d * sum as f32).to_f32(),
        });
    }
}

#[inline]
pub fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 signed or unsigned weight values of a block, in element order, with the
/// block's scale and (Q4_1) minimum. Q4_0 values are already shifted by -8.
#[inline]
pub fn unpack(t: WeightType, b: &[u8]) -> ([i16; QK], f32, f32) {
    let mut w = [0i16; QK];
    match t {
        WeightType::Q4_0 | WeightType::Q4_1 => {
            let (qs, off) = if t == WeightType::Q4_0 {
                (&b[2..18], 8)
            } else {
                (&b[4..20], 0)
            };
            for j in 0..16 {
                w[j] = (qs[j] & 0x0F) as i16 - off;
                w[j + 16] = (qs[j] >> 4) as i16 - off;
            }
        }
        WeightType::Q8_0 => {
            for (j, v) in w.iter_mut().enumerate() {
                *v = b[2 + j] as i8 as i16;
            }
        }
    }
    let m = if t == WeightType::Q4_1 {
        f16_at(b, 2)
    } else {
        0.0
    };
    (w, f16_at(b, 0), m)
}

/// Sums 8 f32 lanes in the order of llama.cpp's `hsum_float_8`.
#[inline]
pub fn hsum8(a: &[f32; 8]) -> f32 {
    let x = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (x[0] + x[2]) + (x[1] + x[3])
}

/// Weight row `w` (blocks of type `t`) times activation row `x`, portable code.
pub fn dot_generic(t: WeightType, w: &[u8], x: &[ActBlock]) -> f32 {
    let bb = t.block_bytes();
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (blk, xb) in w.chunks_exact(bb).zip(x) {
        let (wv, d, m) = unpack(t, blk);
        let dd = d * xb.d;
        for (lane, a) in acc.iter_mut().enumerate() {
            let span = 4 * lane..4 * lane + 4;
            let s: i32 = wv[span.clone()]
                .iter()
                .zip(&xb.qs[span])
                .map(|(&w, &x)| w as i32 * x as i32)
                .sum();
            *a = dd.mul_add(s as f32, *a);
        }
        if t == WeightType::Q4_1 {
            summs += m * xb.s;
        }
    }
    hsum8(&acc) + summs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let mut q = Vec::new();
        quantize_row(&x, &mut q);
        assert_eq!(q.len(), 2);
        for (b, chunk) in q.iter().zip(x.chunks(32)) {
            let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
            assert!((b.s - b.d * sum as f32).abs() <= 1e-2 * b.d.abs() * sum.abs() as f32 + 1e-3);
            for (v, &orig) in b.qs.iter().zip(chunk) {
                assert!((*v as f32 * b.d - orig).abs() <= b.d * 0.51 + 1e-3);
            }
        }
    }

    #[test]
    fn q4_1_block_unpacks_low_then_high_nibbles() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // element 0 = 0xA, element 16 = 0x3
        let (w, d, m) = unpack(WeightType::Q4_1, &b);
        assert_eq!((w[0], w[16], w[1], d, m), (10, 3, 0, 0.5, -1.0));
    }
}

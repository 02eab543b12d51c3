//! Two elementwise steps of the forward pass on the CPU, in llama.cpp's arithmetic:
//! RMSNorm, and the feed-forward activation of the Llama family, SwiGLU
//! (`silu(gate) * up`) fused into one pass over the two projections.
//!
//! Done with candle's operations, SwiGLU is two new tensors and a call to the C
//! library's `expf` per value: at eight decoding sequences, 12,288 calls a layer and 5%
//! of a step. Here `exp` is the algorithm of Arm's optimized-routines `expf` (a
//! degree-5 polynomial after reduction by powers of two, within 2 ulp), which is what
//! llama.cpp's vector code computes SwiGLU with on x86 and Arm; the compiler
//! vectorises it eight values at a time. Each value goes through the same operations
//! whether it sits in a full group of eight or in the remainder, and each row is
//! normalised on its own, so a token's result does not depend on how many tokens
//! share the step.
//!
//! Why llama.cpp's arithmetic: the activations are quantized to 8 bits before every
//! matmul, so a 1-ulp difference anywhere can flip a rounding and move the output;
//! the closer each step is to the reference's, the closer the whole forward pass.

/// RMSNorm of each row of `x` (rows of `weight.len()`), in llama.cpp's order: the
/// squares summed in f64, the row scaled by `1 / sqrt(mean + eps)`, then by the
/// weight.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let n = weight.len().max(1);
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
    out
}

/// `out[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "swiglu lengths"
    );
    let mut outs = out.chunks_exact_mut(8);
    let (mut gates, mut ups) = (gate.chunks_exact(8), up.chunks_exact(8));
    for ((o, g), u) in (&mut outs).zip(&mut gates).zip(&mut ups) {
        for l in 0..8 {
            o[l] = silu(g[l]) * u[l];
        }
    }
    let rest = outs.into_remainder().iter_mut();
    for ((o, &g), &u) in rest.zip(gates.remainder()).zip(ups.remainder()) {
        *o = silu(g) * u;
    }
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(0.0 - x))
}

/// e^x, to within 2 ulp; beyond f32's range, 0 or infinity.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // x = n ln 2 + b, |b| <= ln 2 / 2, with n rounded to an integer by adding 1.5 * 2^23
    // (which leaves n in the low bits of z) and ln 2 in two parts, so that b is exact.
    const SHIFT: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75; // 0x1.62e4p-1
    const LN2_LO: f32 = 1.428_606_8e-6; // 0x1.7f7d1cp-20 (hex floats: the exact values)
                                        // e^b - 1 ~ b (C4 + C3 b + b^2 (C2 + C1 b + b^2 C0)).
    const C: [f32; 5] = [
        0.008_247_39,  // 0x1.0e4020p-7
        0.041_899_767, // 0x1.573e2ep-5
        0.166_683_96,  // 0x1.555e66p-3
        0.499_991_27,  // 0x1.fffdb6p-2
        0.999_999_4,   // 0x1.ffffecp-1
    ];
    let z = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let e = z.to_bits() << 23;
    let u = b * b;
    let j = C[0]
        .mul_add(b, C[1])
        .mul_add(u, C[2].mul_add(b, C[3]))
        .mul_add(u, C[4] * b);
    if n.abs() <= 126.0 {
        // 2^n from n's bits in z.
        let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
        return j.mul_add(k, k);
    }
    // 2^n in two factors, each in range; past 192, the square of one (0 or inf).
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    if n.abs() > 192.0 {
        return s1 * s1;
    }
    let s2 = f32::from_bits(e.wrapping_sub(g));
    s2.mul_add(j, s2) * s1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_normalises_each_row_on_its_own() {
        let w: Vec<f32> = (0..48).map(|i| 0.5 + i as f32 / 48.0).collect();
        let x: Vec<f32> = (0..3 * 48)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let y = rms_norm(&x, &w, 1e-5);
        for (r, (row, out)) in x.chunks(48).zip(y.chunks(48)).enumerate() {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 48.0;
            for ((&v, &o), &w) in row.iter().zip(out).zip(&w) {
                let want = v as f64 / (ms + 1e-5).sqrt() * w as f64;
                assert!(
                    (o as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "row {r}"
                );
            }
            assert_eq!(rms_norm(row, &w, 1e-5), out, "row {r} alone");
        }
    }

    #[test]
    fn exp_constants_are_the_exact_values_named() {
        // The bits of the hex floats in the comments above.
        let bits = [
            0x3f31_7200,
            0x35bf_be8e,
            0x3c07_2010,
            0x3d2b_9f17,
            0x3e2a_af33,
            0x3eff_fedb,
            0x3f7f_fff6,
        ];
        let f = [
            0.693_145_75f32,
            1.428_606_8e-6,
            0.008_247_39,
            0.041_899_767,
            0.166_683_96,
            0.499_991_27,
            0.999_999_4,
        ];
        for (b, f) in bits.iter().zip(f) {
            assert_eq!(f.to_bits(), *b);
        }
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_range_silu_uses() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = f32::EPSILON as f64 * want;
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        // Past the range: 0 and infinity; on its edges, the reduction in two steps.
        assert_eq!((exp(-1000.0), exp(1000.0)), (0.0, f32::INFINITY));
        for x in [-103.0f32, -95.5, -88.0, 88.5] {
            let want = (x as f64).exp();
            assert!(
                ((exp(x) as f64) - want).abs() <= 4e-7 * want + 1e-45,
                "exp({x})"
            );
        }
    }

    #[test]
    fn swiglu_matches_the_definition_and_any_value_alone() {
        let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.77).collect();
        let up: Vec<f32> = (0..37).map(|i| (i as f32 * 0.31).sin()).collect();
        let mut out = vec![0f32; 37];
        swiglu(&gate, &up, &mut out);
        for i in 0..37 {
            let g = gate[i] as f64;
            let want = g / (1.0 + (-g).exp()) * up[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{i}"
            );
            // A value alone (the remainder path) gets the bits it got in a group.
            let mut one = [0f32];
            swiglu(&gate[i..=i], &up[i..=i], &mut one);
            assert_eq!(one[0].to_bits(), out[i].to_bits(), "{i}");
        }
        // Saturation: silu(-100) is -0 times up, silu(100) is 100.
        let mut ends = [0f32; 2];
        swiglu(&[-100.0, 100.0], &[1.0, 1.0], &mut ends);
        assert!(ends[0].abs() < 1e-30 && ends[1] == 100.0);
    }
}

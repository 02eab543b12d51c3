//! Elementwise steps of the forward pass on the CPU, in llama.cpp's arithmetic:
//! RMSNorm, and the gated feed-forward activations, SwiGLU (`silu(gate) * up`, the
//! Llama family) and GeGLU (Gemma), each fused into one pass over the two
//! projections; and RoPE on plain slices, as candle computes it.
//!
//! Done with candle's operations, SwiGLU is two new tensors and a call to the C
//! library's `expf` per value. Here `exp` is the algorithm of Arm's
//! optimized-routines `expf` (a degree-5 polynomial after reduction by powers of two,
//! within 2 ulp), which is what llama.cpp's vector code computes SwiGLU with on x86
//! and Arm; with AVX2 and FMA, eight values at a time, in the same operations as the
//! portable loop, value by value. Each value's result is its own and each row is
//! normalised on its own, so a token's result does not depend on how many tokens
//! share the step.
//!
//! RoPE here rotates the rows of queries and keys as the projections give them,
//! where candle's operation needs them transposed into heads first and back after.
//!
//! Why llama.cpp's arithmetic: the activations are quantized to 8 bits before every
//! matmul, so a 1-ulp difference anywhere can flip a rounding and move the output;
//! the closer each step is to the reference's, the closer the whole forward pass.

use serde::{Deserialize, Serialize};

use super::KernelPath;

/// How rotary embeddings pair up the dimensions of a head. GGUF Llama files store
/// q/k weights permuted so that pairs are adjacent (llama.cpp's "normal" rope);
/// Qwen2 (and HF checkpoints as such) pair dimension i with i + d/2 ("neox").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    Interleaved,
    Neox,
}

/// RMSNorm of each row of `x` (rows of `weight.len()`) into `out`, in llama.cpp's
/// order: the squares summed in f64, the row scaled by `1 / sqrt(mean + eps)`,
/// then by the weight.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "rms_norm lengths");
    let n = weight.len().max(1);
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

/// `out[i] = silu(gate[i]) * up[i]`. Every path gives the same bits; on AVX2 with
/// FMA, eight values at a time (the portable loop's `mul_add` is a libm call where
/// the build does not assume FMA, 4 ns a value).
pub fn swiglu(path: KernelPath, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "swiglu lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Generic && path.supported() {
        // SAFETY: `supported()` checked AVX2 and FMA at run time.
        return unsafe { x86::swiglu(gate, up, out) };
    }
    let _ = path;
    swiglu_portable(gate, up, out);
}

/// `out[i] = gelu(gate[i]) * up[i]` (GELU's tanh form), in llama.cpp's CPU arithmetic:
/// 0 below -10, the gate itself above 10, and between them GELU of the gate rounded
/// to f16, computed in f32 and rounded to f16 again, read (as llama.cpp reads it) from
/// a table of every f16 value's: a lookup instead of a `tanhf` per value, the same bits.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == out.len() && up.len() == out.len(),
        "geglu lengths"
    );
    let table = gelu_table();
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = if g <= -10.0 {
            0.0
        } else if g >= 10.0 {
            g * u
        } else {
            let gelu = table[usize::from(half::f16::from_f32(g).to_bits())];
            half::f16::from_bits(gelu).to_f32() * u
        };
    }
}

/// GELU of every f16 value, rounded to f16 (as bits), built on first use.
fn gelu_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| half::f16::from_f32(gelu(half::f16::from_bits(bits).to_f32())).to_bits())
            .collect()
    })
}

/// GELU's tanh form, as llama.cpp computes it in f32.
fn gelu(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044_715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

/// `swiglu` value by value: the bits every path gives.
fn swiglu_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// Rotates one head's `x` (`head_dim` values) for one position (`cos` and `sin`,
/// `head_dim / 2` each) into `out`: pairs `(2i, 2i + 1)` in the interleaved style,
/// `(i, i + head_dim / 2)` in NeoX's, each as `(a cos - b sin, a sin + b cos)`, the
/// arithmetic of candle's `rope_i` and `rope` and of llama.cpp.
pub fn rope_head(x: &[f32], cos: &[f32], sin: &[f32], style: RopeStyle, out: &mut [f32]) {
    let half = cos.len();
    assert!(
        x.len() == 2 * half && out.len() == x.len() && sin.len() == half,
        "rope lengths"
    );
    let (lo, hi) = match style {
        RopeStyle::Interleaved => (2, 1),
        RopeStyle::Neox => (1, half),
    };
    for i in 0..half {
        let (i1, i2) = (i * lo, i * lo + hi);
        let (a, b) = (x[i1], x[i2]);
        out[i1] = a * cos[i] - b * sin[i];
        out[i2] = a * sin[i] + b * cos[i];
    }
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(0.0 - x))
}

// e^x's constants (see `exp`).
const SHIFT: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_145_75; // 0x1.62e4p-1
const LN2_LO: f32 = 1.428_606_8e-6; // 0x1.7f7d1cp-20 (hex floats: the exact values)
/// e^b - 1 ~ b (C4 + C3 b + b^2 (C2 + C1 b + b^2 C0)).
const C: [f32; 5] = [
    0.008_247_39,  // 0x1.0e4020p-7
    0.041_899_767, // 0x1.573e2ep-5
    0.166_683_96,  // 0x1.555e66p-3
    0.499_991_27,  // 0x1.fffdb6p-2
    0.999_999_4,   // 0x1.ffffecp-1
];

/// e^x, to within 2 ulp; beyond f32's range, 0 or infinity (the softmax of
/// attention takes it too: inlined, it is several times cheaper than libm's call).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let Reduced { n, e, j } = reduce(x);
    if n.abs() <= 126.0 {
        // 2^n from n's bits in z.
        let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
        return j.mul_add(k, k);
    }
    // Past 192, the square of one factor (0 or inf).
    let (s1, s2) = two_factors(n, e);
    if n.abs() > 192.0 {
        return s1 * s1;
    }
    s2.mul_add(j, s2) * s1
}

/// 2^n as two factors `(s1, s2)`, each in f32's range, for |n| past 126.
#[inline(always)]
fn two_factors(n: f32, e: u32) -> (f32, f32) {
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    (
        f32::from_bits(g.wrapping_add(0x7f00_0000)),
        f32::from_bits(e.wrapping_sub(g)),
    )
}

/// `exp`'s argument reduction and polynomial, before 2^n scales it.
struct Reduced {
    /// n, an integer.
    n: f32,
    /// n's bits shifted into an f32's exponent field.
    e: u32,
    /// e^b - 1.
    j: f32,
}

#[inline(always)]
fn reduce(x: f32) -> Reduced {
    // x = n ln 2 + b, |b| <= ln 2 / 2, with n rounded to an integer by adding 1.5 * 2^23
    // (which leaves n in the low bits of z) and ln 2 in two parts, so that b is exact.
    let z = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = C[0]
        .mul_add(b, C[1])
        .mul_add(u, C[2].mul_add(b, C[3]))
        .mul_add(u, C[4] * b);
    Reduced {
        n,
        e: z.to_bits() << 23,
        j,
    }
}

/// Values per step of [`exp_lanes`] and of the attention softmax's sums.
pub(crate) const LANES: usize = 16;

/// `exp` of each of [`LANES`] values in place, the bits `exp` gives value by
/// value: every lane takes all of `exp`'s branches and keeps its own, so the
/// loop is straight-line code that the compiler vectorises. (Attention's scores
/// after a sharp peak lie far below it, outside the fast range, often enough
/// that a whole run falling back to `exp` one value at a time cost more than the
/// vectors saved.)
#[inline(always)]
pub(crate) fn exp_lanes(x: &mut [f32; LANES]) {
    for v in x.iter_mut() {
        let Reduced { n, e, j } = reduce(*v);
        let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
        let fast = j.mul_add(k, k);
        let (s1, s2) = two_factors(n, e);
        let scaled = s2.mul_add(j, s2) * s1;
        let far = s1 * s1;
        // `exp`'s tests on |n|, in its order (NaN fails both, as there).
        *v = if n.abs() <= 126.0 {
            fast
        } else if n.abs() > 192.0 {
            far
        } else {
            scaled
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::swiglu_portable;
    use std::arch::x86_64::*;

    /// `super::swiglu`, eight values a step: `exp` as in the portable code, the same
    /// operations in the same order, lane by lane; a group with a lane outside
    /// `exp`'s fast range (|n| > 126, or NaN) goes through the portable code.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let set = |v: f32| _mm256_set1_ps(v);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, the length of all three slices.
            let (g, u) = unsafe {
                (
                    _mm256_loadu_ps(gate.as_ptr().add(i)),
                    _mm256_loadu_ps(up.as_ptr().add(i)),
                )
            };
            let x = _mm256_sub_ps(_mm256_setzero_ps(), g);
            let z = _mm256_fmadd_ps(x, set(std::f32::consts::LOG2_E), set(super::SHIFT));
            let nn = _mm256_sub_ps(z, set(super::SHIFT));
            let in_range = _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_andnot_ps(set(-0.0), nn), set(126.0));
            if _mm256_movemask_ps(in_range) != 0xff {
                let group = i..i + 8;
                swiglu_portable(&gate[group.clone()], &up[group.clone()], &mut out[group]);
                i += 8;
                continue;
            }
            let b = _mm256_fnmadd_ps(
                nn,
                set(super::LN2_LO),
                _mm256_fnmadd_ps(nn, set(super::LN2_HI), x),
            );
            let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
            let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32(0x3f80_0000)));
            let bb = _mm256_mul_ps(b, b);
            let c = super::C;
            let j = _mm256_fmadd_ps(
                _mm256_fmadd_ps(
                    _mm256_fmadd_ps(set(c[0]), b, set(c[1])),
                    bb,
                    _mm256_fmadd_ps(set(c[2]), b, set(c[3])),
                ),
                bb,
                _mm256_mul_ps(set(c[4]), b),
            );
            let ex = _mm256_fmadd_ps(j, k, k);
            let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(set(1.0), ex)), u);
            // SAFETY: as the loads.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), y) };
            i += 8;
        }
        swiglu_portable(&gate[i..], &up[i..], &mut out[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gelu_table_holds_gelu_of_each_f16_rounded_to_f16() {
        let table = gelu_table();
        assert_eq!(table.len(), 1 << 16);
        for x in [-9.5f32, -1.0, -0.001, 0.0, 0.25, 1.0, 2.5, 9.75] {
            let bits = half::f16::from_f32(x).to_bits();
            let want = half::f16::from_f32(gelu(half::f16::from_f32(x).to_f32()));
            assert_eq!(table[usize::from(bits)], want.to_bits(), "{x}");
        }
    }

    #[test]
    fn geglu_is_gelu_of_the_f16_gate_in_f16_times_up() {
        let gate = [-12.0f32, -1.0, 0.0, 0.5, 1.0, 3.0, 11.0];
        let up = [2.0f32; 7];
        let mut out = [0f32; 7];
        geglu(&gate, &up, &mut out);
        // Beyond +-10: 0 and the gate itself.
        assert_eq!((out[0], out[6]), (0.0, 22.0));
        assert_eq!(out[2], 0.0);
        for (&g, &o) in gate[1..6].iter().zip(&out[1..6]) {
            // GELU's tanh form in f64, to within f16's rounding of input and output.
            let x = f64::from(g);
            let exact = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!(
                (f64::from(o) / 2.0 - exact).abs() <= 2e-3 * exact.abs().max(1.0),
                "{g}: {o}"
            );
            let y = half::f16::from_f32(o / 2.0);
            assert_eq!(y.to_f32(), o / 2.0, "{g}: GELU rounded to f16");
        }
    }

    #[test]
    fn rms_norm_normalises_each_row_on_its_own() {
        let w: Vec<f32> = (0..48).map(|i| 0.5 + i as f32 / 48.0).collect();
        let x: Vec<f32> = (0..3 * 48)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let mut y = vec![0f32; x.len()];
        rms_norm(&x, &w, 1e-5, &mut y);
        for (r, (row, out)) in x.chunks(48).zip(y.chunks(48)).enumerate() {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 48.0;
            for ((&v, &o), &w) in row.iter().zip(out).zip(&w) {
                let want = v as f64 / (ms + 1e-5).sqrt() * w as f64;
                assert!(
                    (o as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "row {r}"
                );
            }
            let mut alone = vec![0f32; 48];
            rms_norm(row, &w, 1e-5, &mut alone);
            assert_eq!(alone, out, "row {r} alone");
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
    fn exp_lanes_gives_exp_of_each_value() {
        // All lanes in range, then one lane past it in turn: into the two-factor
        // range, beyond it (0 or inf), infinities (-inf: a masked score) and NaN.
        let base: [f32; LANES] = std::array::from_fn(|i| -20.0 + 1.37 * i as f32);
        let odd = [
            -120.0,
            -95.0,
            100.0,
            200.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
        ];
        for odd in std::iter::once(None).chain(odd.map(Some)) {
            let mut x = base;
            if let Some(v) = odd {
                x[5] = v;
            }
            let want = x.map(exp);
            exp_lanes(&mut x);
            assert_eq!(x.map(f32::to_bits), want.map(f32::to_bits), "{odd:?}");
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
        swiglu(KernelPath::Generic, &gate, &up, &mut out);
        for i in 0..37 {
            let g = gate[i] as f64;
            let want = g / (1.0 + (-g).exp()) * up[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{i}"
            );
        }
        // Saturation: silu(-100) is -0 times up, silu(100) is 100.
        let mut ends = [0f32; 2];
        swiglu(
            KernelPath::Generic,
            &[-100.0, 100.0],
            &[1.0, 1.0],
            &mut ends,
        );
        assert!(ends[0].abs() < 1e-30 && ends[1] == 100.0);
    }

    #[test]
    fn every_swiglu_path_gives_the_portable_bits_in_and_out_of_groups() {
        // Values across exp's fast range and past it (groups that take the portable
        // code), infinities and NaN, at every offset within a group of eight.
        let mut gate: Vec<f32> = (0..4000)
            .map(|i| (i as f32 * 0.7331).sin() * 30.0)
            .collect();
        gate.extend([
            -130.0,
            95.0,
            200.0,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        gate.extend((0..21).map(|i| i as f32 * 0.01));
        let up: Vec<f32> = (0..gate.len())
            .map(|i| (i as f32 * 0.113).cos() * 3.0)
            .collect();
        let mut want = vec![0f32; gate.len()];
        swiglu(KernelPath::Generic, &gate, &up, &mut want);
        for path in KernelPath::ALL.into_iter().filter(|p| p.supported()) {
            for start in 0..8 {
                let mut got = vec![0f32; gate.len() - start];
                swiglu(path, &gate[start..], &up[start..], &mut got);
                for (k, (g, w)) in got.iter().zip(&want[start..]).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{path:?}, value {}", start + k);
                }
            }
        }
    }

    #[test]
    fn rope_head_gives_candles_bits_in_both_styles() {
        use candle_core::{Device, Tensor};
        let (heads, tokens, hd) = (3, 5, 16);
        let x: Vec<f32> = (0..heads * tokens * hd)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let angles: Vec<f32> = (0..tokens * hd / 2)
            .map(|i| (i / (hd / 2)) as f32 * 0.9f32.powi((i % (hd / 2)) as i32))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let dev = &Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (1, heads, tokens, hd), dev).unwrap();
        let ct = Tensor::from_vec(cos.clone(), (tokens, hd / 2), dev).unwrap();
        let st = Tensor::from_vec(sin.clone(), (tokens, hd / 2), dev).unwrap();
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let want = match style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&xt, &ct, &st),
                RopeStyle::Neox => candle_nn::rotary_emb::rope(&xt, &ct, &st),
            }
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let mut got = vec![0f32; x.len()];
            for (at, (row, out)) in x.chunks(hd).zip(got.chunks_mut(hd)).enumerate() {
                let t = at % tokens;
                let cs = t * hd / 2..(t + 1) * hd / 2;
                rope_head(row, &cos[cs.clone()], &sin[cs], style, out);
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{style:?}");
        }
    }
}

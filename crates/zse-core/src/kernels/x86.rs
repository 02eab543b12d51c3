//! The x86 paths: the arithmetic of `generic::dot` for a group of weight rows at a
//! time, each row in its own lane, with the accumulators in registers.
//!
//! Per block, the eight quads of the rows' integers are unpacked once (a mask or a
//! shift of the 2- or 4-bit planes, an OR of the high bits where the layout has them)
//! and serve several activation rows (eight on AVX-512, four on AVX2): for each, four
//! of its values are broadcast and multiplied into every row's integer sum at once,
//! then the block's correction, conversion and one fused multiply-add finish the block
//! for all the rows. That is llama.cpp's repacked GEMM, for every block type. AVX2
//! takes a group's sixteen rows as two halves in 256-bit vectors; AVX-512 all sixteen
//! in 512-bit ones.
//!
//! Weights multiply unsigned: two- to six-bit integers as stored (`q - offset`
//! becomes `q * x - offset * sum(x)`, with the activations' exact block sums), Q8_0's
//! signed ones, and IQ4's levels (looked up from their 4-bit indices by a byte
//! shuffle), as `|w| * (x * sign(w))` (on AVX-512, IQ4's levels 128 up, taken off as
//! an offset is: the same integers). The two paths differ only in the integer
//! dot of 4-value lanes: AVX2 multiplies to 16-bit pairs and adds those (`maddubs` +
//! `madd`); AVX-512 VNNI does it in one instruction. The pairs never saturate
//! (|w| <= 128, |x| <= 127, two products), so both give the same integers.
//!
//! Float weights are fused-multiply-added sixteen lanes wide: one 512-bit vector
//! per row pair on AVX-512, two 256-bit ones on AVX2 (`float_tile`).

macro_rules! x86_path {
    ($features:literal) => {
        use std::arch::x86_64::*;
        use std::ops::Range;

        use crate::kernels::acts::Acts;
        use crate::kernels::weights::{Layout, QWeight, GROUP, IQ4_LEVELS};
        use crate::kernels::Out;

        /// `out(i, k)` = weight row `k` times activation row `i`, for the tile's
        /// weight rows (whole groups of sixteen but at the matrix's end) and every
        /// activation row. False (nothing written) for a layout and scale precision
        /// that loading never produces.
        ///
        /// # Safety
        /// The CPU must support the path's features (checked by the caller at run
        /// time), and `out` must hold every `(i, k)` of the tile.
        #[target_feature(enable = $features)]
        pub unsafe fn tile(w: &QWeight, rows: Range<usize>, a: &Acts, out: Out) -> bool {
            match (w.layout, w.d.is_half()) {
                (Layout::Q4Offset, true) => tile_of::<Q4_OFFSET, true>(w, rows, a, out),
                (Layout::Q4Min, true) => tile_of::<Q4_MIN, true>(w, rows, a, out),
                (Layout::Q4Min, false) => tile_of::<Q4_MIN, false>(w, rows, a, out),
                (Layout::Q5Offset, true) => tile_of::<Q5_OFFSET, true>(w, rows, a, out),
                (Layout::Q5Min, true) => tile_of::<Q5_MIN, true>(w, rows, a, out),
                (Layout::Q5Min, false) => tile_of::<Q5_MIN, false>(w, rows, a, out),
                (Layout::Q2Halves, true) => tile_of::<Q2_HALVES, true>(w, rows, a, out),
                (Layout::Q3Halves, true) => tile_of::<Q3_HALVES, true>(w, rows, a, out),
                (Layout::Q6Halves, true) => tile_of::<Q6_HALVES, true>(w, rows, a, out),
                (Layout::Q8, true) => tile_of::<SIGNED8, true>(w, rows, a, out),
                (Layout::Q4Table, true) => tile_of::<TABLE4, true>(w, rows, a, out),
                (Layout::Q4Table, false) => tile_of::<TABLE4, false>(w, rows, a, out),
                _ => return false,
            }
            true
        }

        // The layouts as constants (`Layout` cannot be a const parameter), and what
        // each implies.
        const Q4_OFFSET: u8 = 0;
        const Q4_MIN: u8 = 1;
        const Q5_OFFSET: u8 = 2;
        const Q5_MIN: u8 = 3;
        const Q6_HALVES: u8 = 4;
        const SIGNED8: u8 = 5;
        const Q2_HALVES: u8 = 6;
        const Q3_HALVES: u8 = 7;
        const TABLE4: u8 = 8;

        /// IQ4's sixteen levels, the table a byte shuffle looks the indices up in.
        #[inline]
        unsafe fn iq4_levels() -> __m128i {
            _mm_loadu_si128(IQ4_LEVELS.as_ptr() as *const __m128i)
        }

        const fn layout(l: u8) -> Layout {
            match l {
                Q4_OFFSET => Layout::Q4Offset,
                Q4_MIN => Layout::Q4Min,
                Q5_OFFSET => Layout::Q5Offset,
                Q5_MIN => Layout::Q5Min,
                Q6_HALVES => Layout::Q6Halves,
                Q2_HALVES => Layout::Q2Halves,
                Q3_HALVES => Layout::Q3Halves,
                TABLE4 => Layout::Q4Table,
                _ => Layout::Q8,
            }
        }

        /// Group by group: `group` (each path's own) takes the activation rows.
        #[target_feature(enable = $features)]
        unsafe fn tile_of<const L: u8, const H: bool>(
            w: &QWeight,
            rows: Range<usize>,
            a: &Acts,
            out: Out,
        ) {
            assert!(
                rows.start % GROUP == 0
                    && rows.end <= w.rows
                    && w.nb == a.nb
                    && w.layout == layout(L)
            );
            for g in rows.start / GROUP..rows.end.div_ceil(GROUP) {
                group::<L, H>(w, g, a, out, (rows.end - g * GROUP).min(GROUP));
            }
        }

        /// Float weights times unquantized activations: `out(i, k)` for the tile's
        /// weight rows and every activation row. False (nothing written) for
        /// quantized weights.
        ///
        /// # Safety
        /// As `tile`.
        #[target_feature(enable = $features)]
        pub unsafe fn float_tile(
            w: &QWeight,
            rows: Range<usize>,
            x: &[f32],
            m: usize,
            out: Out,
        ) -> bool {
            match w.layout {
                Layout::F32 => float_tile_of::<F32>(w, rows, x, m, out),
                Layout::F16 => float_tile_of::<F16>(w, rows, x, m, out),
                Layout::BF16 => float_tile_of::<BF16>(w, rows, x, m, out),
                _ => return false,
            }
            true
        }

        const F32: u8 = 0;
        const F16: u8 = 1;
        const BF16: u8 = 2;

        /// Activation rows go `FLOAT_R` at a time past `FLOAT_K` weight rows (each
        /// weight vector loaded once serves `FLOAT_R` rows, each activation vector
        /// `FLOAT_K`). The rows left over go together past the same weight rows
        /// (a prefill's last few); in a batch of fewer than `FLOAT_R` (decoding)
        /// they go together past one weight row at a time.
        #[target_feature(enable = $features)]
        unsafe fn float_tile_of<const F: u8>(
            w: &QWeight,
            rows: Range<usize>,
            x: &[f32],
            m: usize,
            out: Out,
        ) {
            assert!(rows.end <= w.rows && x.len() == m * w.cols && w.cols % 16 == 0);
            let mut i = 0;
            while i + FLOAT_R <= m {
                float_block::<F, FLOAT_K, FLOAT_R>((w, rows.clone(), x, i, out));
                i += FLOAT_R;
            }
            // A prefill's weight rows are in cache by now, so several of them go
            // at once, keeping enough sums in flight. When decoding, one weight
            // row at a time: a single sequential stream, which the hardware
            // prefetcher follows (interleaving four rows' streams, 1 KiB apart for
            // SmolLM2, halved single-stream F16 decode on AMD EPYC), each read
            // once for all the activation rows.
            // (AVX2's `FLOAT_R` of three leaves at most two.)
            let tail = (w, rows, x, i, out);
            match (m >= FLOAT_R, m - i) {
                (_, 0) => {}
                (true, 1) => float_block::<F, FLOAT_K, 1>(tail),
                (true, 2) => float_block::<F, FLOAT_K, 2>(tail),
                (true, 3) => float_block::<F, FLOAT_K, 3>(tail),
                (true, 4) => float_block::<F, FLOAT_K, 4>(tail),
                (false, 1) => float_block::<F, 1, 1>(tail),
                (false, 2) => float_block::<F, 1, 2>(tail),
                (false, 3) => float_block::<F, 1, 3>(tail),
                (false, 4) => float_block::<F, 1, 4>(tail),
                (true, _) => float_block::<F, FLOAT_K, 5>(tail),
                (false, _) => float_block::<F, 1, 5>(tail),
            }
        }

        /// Activation rows `i..i + R` times the tile's weight rows, `K` at a time
        /// (then one at a time).
        #[target_feature(enable = $features)]
        unsafe fn float_block<const F: u8, const K: usize, const R: usize>(
            (w, rows, x, i, out): (&QWeight, Range<usize>, &[f32], usize, Out),
        ) {
            let mut k = rows.start;
            while k + K <= rows.end {
                let y = float_micro::<F, K, R>(w, k, x, i);
                for (kk, y) in y.iter().enumerate() {
                    for (r, &v) in y.iter().enumerate() {
                        out.set(i + r, k + kk, v);
                    }
                }
                k += K;
            }
            for k in k..rows.end {
                let y = float_micro::<F, 1, R>(w, k, x, i);
                for (r, &v) in y[0].iter().enumerate() {
                    out.set(i + r, k, v);
                }
            }
        }

        /// Float weight rows `k..k + K` and activation rows `i..i + R` as pointers,
        /// bounds-checked here.
        #[inline]
        fn float_rows<const K: usize, const R: usize>(
            w: &QWeight,
            k: usize,
            x: &[f32],
            i: usize,
        ) -> ([*const u8; K], [*const f32; R]) {
            let mut wp = [std::ptr::null::<u8>(); K];
            for (kk, p) in wp.iter_mut().enumerate() {
                *p = w.float_row(k + kk).as_ptr();
            }
            let mut xp = [std::ptr::null::<f32>(); R];
            for (r, p) in xp.iter_mut().enumerate() {
                *p = x[(i + r) * w.cols..][..w.cols].as_ptr();
            }
            (wp, xp)
        }
    };
}

/// AVX2 with FMA: each group in two halves of eight rows, 256-bit vectors.
pub mod avx2 {
    x86_path!("avx2,fma,f16c");

    /// The group's two halves of eight rows: activation rows four at a time, then
    /// one at a time.
    ///
    /// # Safety
    /// As `tile`; `valid` (the group's rows that exist) at most `GROUP`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<const L: u8, const H: bool>(
        w: &QWeight,
        g: usize,
        a: &Acts,
        out: Out,
        valid: usize,
    ) {
        for half in 0..2 {
            let first = g * GROUP + 8 * half;
            let rows = valid.saturating_sub(8 * half).min(8);
            let put = |i: usize, y: __m256| {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), y);
                for (rr, &v) in lanes.iter().enumerate().take(rows) {
                    out.set(i, first + rr, v);
                }
            };
            if rows == 0 {
                break;
            }
            let mut i = 0;
            while i + 4 <= a.m {
                for (r, &y) in micro::<L, H, 4>(w, g, half, a, i).iter().enumerate() {
                    put(i + r, y);
                }
                i += 4;
            }
            for i in i..a.m {
                put(i, micro::<L, H, 1>(w, g, half, a, i)[0]);
            }
        }
    }

    /// `acc` plus the 4-value-lane integer dot of unsigned `a` and signed `b`: 16-bit
    /// pairs (`maddubs`), then their sums (`madd`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn idot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)),
        )
    }

    // Float weights: two weight rows past three activation rows (twelve
    // accumulators of the sixteen registers).
    const FLOAT_K: usize = 2;
    const FLOAT_R: usize = 3;

    /// Eight weights at `p` as f32 (exact for every float type).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_floats<const F: u8>(p: *const u8) -> __m256 {
        match F {
            F32 => _mm256_loadu_ps(p as *const f32),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            // A bf16 is the high half of an f32.
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p as *const __m128i),
            ))),
        }
    }

    /// Float weight rows `k..k + K` times activation rows `i..i + R`: value `j`
    /// fused-multiply-added into lane `j % 16` (`generic::float_dots`), the sixteen
    /// lanes as two vectors.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline(never)]
    unsafe fn float_micro<const F: u8, const K: usize, const R: usize>(
        w: &QWeight,
        k: usize,
        x: &[f32],
        i: usize,
    ) -> [[f32; R]; K] {
        let esz = if F == F32 { 4 } else { 2 };
        let rb = w.float_row_bytes();
        let (wp, xp) = float_rows::<K, R>(w, k, x, i);
        let mut acc = [[[_mm256_setzero_ps(); 2]; R]; K];
        for j in (0..w.cols).step_by(16) {
            #[allow(clippy::needless_range_loop)] // `half` also places the loads
            for half in 0..2 {
                let at = (j + 8 * half) * esz;
                let mut wv = [_mm256_setzero_ps(); K];
                for kk in 0..K {
                    // Once per cache line: the same place K rows on.
                    if at % 64 == 0 {
                        let ahead = wp[kk].wrapping_add(at + K * rb);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                    wv[kk] = load_floats::<F>(wp[kk].add(at));
                }
                for r in 0..R {
                    let xv = _mm256_loadu_ps(xp[r].add(j + 8 * half));
                    for kk in 0..K {
                        acc[kk][r][half] = _mm256_fmadd_ps(wv[kk], xv, acc[kk][r][half]);
                    }
                }
            }
        }
        let mut y = [[0f32; R]; K];
        for kk in 0..K {
            for r in 0..R {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(
                    lanes.as_mut_ptr(),
                    _mm256_add_ps(acc[kk][r][0], acc[kk][r][1]),
                );
                y[kk][r] = crate::kernels::generic::hsum8(&lanes);
            }
        }
        y
    }

    use crate::kernels::weights::{QK, QUAD_VEC};

    /// Eight scales or minimums from `p` (f16 when `H`, else f32) as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const H: bool>(p: *const u8) -> __m256 {
        if H {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// Half `half` (eight rows) of group `g` times activation rows `i..i + R`: per
    /// activation row, the eight rows' results. The caller guarantees the rows
    /// exist and the block counts agree. Never inlined: compiled on its own, its
    /// fixed-size loops unroll and the accumulators stay in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline(never)]
    unsafe fn micro<const L: u8, const H: bool, const R: usize>(
        w: &QWeight,
        g: usize,
        half: usize,
        a: &Acts,
        i: usize,
    ) -> [__m256; R] {
        let lay = layout(L);
        let (min, hb, halves) = (lay.has_min(), lay.high_bits(), lay.has_halves());
        let (lbits, min_halves, fb) = (lay.low_bits(), lay.has_min_halves(), lay.factor_bytes());
        // Quads per vector of high bits.
        let per = 8 / hb.max(1);
        let (lb, hbytes) = (lay.low_bytes(), lay.high_bytes());
        let nb = w.nb;
        let esz = if H { 2 } else { 4 };
        // Bounds-checked once here; the loop indexes within them.
        let view = w.group(g);
        let (low, high, hv) = (view.low.as_ptr(), view.high.as_ptr(), view.halves.as_ptr());
        let mut xq = [std::ptr::null::<u8>(); R];
        let mut xs = [std::ptr::null::<crate::kernels::acts::BlockSums>(); R];
        for r in 0..R {
            xq[r] = a.row(i + r).as_ptr() as *const u8;
            xs[r] = a.row_sums(i + r).as_ptr();
        }
        let nibble = _mm256_set1_epi8(0x0F);
        let crumb = _mm256_set1_epi8(0x03);
        let high_mask = _mm256_set1_epi8((((1u32 << hb) - 1) << lbits) as i8);
        let offset = lay.offset() as i32;
        let levels = _mm256_broadcastsi128_si256(iq4_levels());
        let mut acc = [_mm256_setzero_ps(); R];
        let mut summ = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let lo = low.add(b * lb + 32 * half);
            // Four blocks on: the hardware alone leaves much of the memory
            // bandwidth unused. (Past the group's end the address may not be
            // valid; a prefetch never faults, and `wrapping_add` keeps the
            // arithmetic defined.)
            for line in (0..lb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(lo.wrapping_add(4 * lb + line) as *const i8);
            }
            // The eight quads of the eight rows, unsigned (Q8 and IQ4: |w|), and for
            // those the signed values whose signs the activations take.
            let mut wq = [_mm256_setzero_si256(); 8];
            let mut ws = [_mm256_setzero_si256(); 8];
            if L == SIGNED8 {
                for q in 0..8 {
                    ws[q] = _mm256_loadu_si256(lo.add(q * QUAD_VEC) as *const __m256i);
                    wq[q] = _mm256_sign_epi8(ws[q], ws[q]);
                }
            } else if lbits == 2 {
                for v in 0..2 {
                    let raw = _mm256_loadu_si256(lo.add(v * QUAD_VEC) as *const __m256i);
                    wq[v] = _mm256_and_si256(raw, crumb);
                    wq[v + 2] = _mm256_and_si256(_mm256_srli_epi16::<2>(raw), crumb);
                    wq[v + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), crumb);
                    wq[v + 6] = _mm256_and_si256(_mm256_srli_epi16::<6>(raw), crumb);
                }
            } else {
                for v in 0..4 {
                    let raw = _mm256_loadu_si256(lo.add(v * QUAD_VEC) as *const __m256i);
                    wq[v] = _mm256_and_si256(raw, nibble);
                    wq[v + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
                }
            }
            if L == TABLE4 {
                for q in 0..8 {
                    ws[q] = _mm256_shuffle_epi8(levels, wq[q]);
                    wq[q] = _mm256_sign_epi8(ws[q], ws[q]);
                }
            }
            if hb > 0 {
                let hi = high.add(b * hbytes + 32 * half);
                for (q, wq) in wq.iter_mut().enumerate() {
                    let (vec, shift) = (q / per, hb * (q % per));
                    let raw = _mm256_loadu_si256(hi.add(vec * QUAD_VEC) as *const __m256i);
                    // The quad's high bits moved above its low ones.
                    let bits = if shift <= lbits {
                        _mm256_sll_epi16(raw, _mm_cvtsi32_si128((lbits - shift) as i32))
                    } else {
                        _mm256_srl_epi16(raw, _mm_cvtsi32_si128((shift - lbits) as i32))
                    };
                    *wq = _mm256_or_si256(*wq, _mm256_and_si256(bits, high_mask));
                }
            }
            let dw = load8::<H>(view.d.add((b * GROUP + 8 * half) * esz));
            let mw = if min {
                load8::<H>(view.m.add((b * GROUP + 8 * half) * esz))
            } else {
                _mm256_setzero_ps()
            };
            // The halves' factors, and (Q2_K) their minimums' factors.
            let mut f = [_mm256_setzero_si256(); 4];
            for (k, f) in f.iter_mut().enumerate().take(fb / GROUP) {
                let p = hv.add(b * fb + k * GROUP + 8 * half);
                *f = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
            }
            let [f0, f1, t0, t1] = f;
            for r in 0..R {
                let x = xq[r].add(b * QK);
                let sums = &*xs[r].add(b);
                let mut half = [_mm256_setzero_si256(); 2];
                for q in 0..8 {
                    let xb = _mm256_set1_epi32((x.add(4 * q) as *const i32).read_unaligned());
                    let xv = if L == SIGNED8 || L == TABLE4 {
                        _mm256_sign_epi8(xb, ws[q])
                    } else {
                        xb
                    };
                    half[q / 4] = idot(half[q / 4], wq[q], xv);
                }
                let isum = if halves {
                    let h0 = _mm256_sub_epi32(half[0], _mm256_set1_epi32(offset * sums.halves[0]));
                    let h1 = _mm256_sub_epi32(half[1], _mm256_set1_epi32(offset * sums.halves[1]));
                    _mm256_add_epi32(_mm256_mullo_epi32(h0, f0), _mm256_mullo_epi32(h1, f1))
                } else {
                    let s = _mm256_add_epi32(half[0], half[1]);
                    if offset != 0 {
                        _mm256_sub_epi32(s, _mm256_set1_epi32(offset * sums.sum))
                    } else {
                        s
                    }
                };
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(sums.d));
                acc[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[r]);
                if min {
                    let s = if min_halves {
                        let t = _mm256_add_epi32(
                            _mm256_mullo_epi32(t0, _mm256_set1_epi32(sums.halves[0])),
                            _mm256_mullo_epi32(t1, _mm256_set1_epi32(sums.halves[1])),
                        );
                        _mm256_mul_ps(_mm256_set1_ps(sums.d), _mm256_cvtepi32_ps(t))
                    } else {
                        _mm256_set1_ps(if H { sums.s } else { sums.s_exact })
                    };
                    summ[r] = _mm256_add_ps(summ[r], _mm256_mul_ps(mw, s));
                }
            }
        }
        let mut y = [_mm256_setzero_ps(); R];
        for r in 0..R {
            y[r] = _mm256_add_ps(acc[r], summ[r]);
        }
        y
    }
}

/// AVX-512 with VNNI and BW: a group's sixteen rows in the lanes of 512-bit vectors.
pub mod avx512 {
    x86_path!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw");

    // Float weights: four weight rows past six activation rows (24 accumulators of
    // the 32 registers).
    const FLOAT_K: usize = 4;
    const FLOAT_R: usize = 6;

    /// Sixteen weights at `p` as f32 (exact for every float type).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw")]
    #[inline]
    unsafe fn load_floats<const F: u8>(p: *const u8) -> __m512 {
        match F {
            F32 => _mm512_loadu_ps(p as *const f32),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            // A bf16 is the high half of an f32.
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p as *const __m256i),
            ))),
        }
    }

    /// Float weight rows `k..k + K` times activation rows `i..i + R`: value `j`
    /// fused-multiply-added into lane `j % 16` (`generic::float_dots`).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw")]
    #[inline(never)]
    unsafe fn float_micro<const F: u8, const K: usize, const R: usize>(
        w: &QWeight,
        k: usize,
        x: &[f32],
        i: usize,
    ) -> [[f32; R]; K] {
        let esz = if F == F32 { 4 } else { 2 };
        let rb = w.float_row_bytes();
        let (wp, xp) = float_rows::<K, R>(w, k, x, i);
        let mut acc = [[_mm512_setzero_ps(); R]; K];
        for j in (0..w.cols).step_by(16) {
            let at = j * esz;
            let mut wv = [_mm512_setzero_ps(); K];
            for kk in 0..K {
                // Once per cache line: the same place K rows on.
                if at % 64 == 0 {
                    let ahead = wp[kk].wrapping_add(at + K * rb);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                wv[kk] = load_floats::<F>(wp[kk].add(at));
            }
            for r in 0..R {
                let xv = _mm512_loadu_ps(xp[r].add(j));
                for kk in 0..K {
                    acc[kk][r] = _mm512_fmadd_ps(wv[kk], xv, acc[kk][r]);
                }
            }
        }
        // Sixteen sums at a time (the last group padded with zeros), stored in
        // place: `acc` and `y` both hold weight row kk's sums at kk * R + r. Read
        // through a function, not gathered into an array, which the compiler
        // built in memory with a copy and a fill per call.
        let mut y = [[0f32; R]; K];
        let n = K * R;
        let flat = acc.as_ptr().cast::<__m512>();
        let sums = y.as_mut_ptr().cast::<f32>();
        for first in (0..n).step_by(16) {
            let v = reduce16(|a| {
                let a = first + a;
                if a < n {
                    // SAFETY: a < K * R, the vectors `acc` holds.
                    unsafe { *flat.add(a) }
                } else {
                    _mm512_setzero_ps()
                }
            });
            let keep = if n - first >= 16 {
                !0
            } else {
                (1u16 << (n - first)) - 1
            };
            // SAFETY: the lanes kept are y's values first..n.
            unsafe { _mm512_mask_storeu_ps(sums.add(first), keep, v) };
        }
        y
    }

    /// The lane sums of sixteen vectors (`v(0)` to `v(15)`), each summed as
    /// `generic::float_dots` sums its lanes (lanes l and l + 8, then `hsum8`'s
    /// tree), in lane order: the same additions, sixteen vectors' at once by
    /// shuffling them together.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw")]
    #[inline]
    unsafe fn reduce16(v: impl Fn(usize) -> __m512) -> __m512 {
        // Lanes l + l + 8: vectors 2i and 2i + 1 in the halves of t[i].
        let t: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v(2 * i), v(2 * i + 1));
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        });
        // hsum8's x[l] = s[l] + s[l + 4]: vectors 4i..4i + 4 in the quarters of u[i].
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (t[2 * i], t[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        });
        // x[0] + x[2] and x[1] + x[3], then their sum, within each quarter.
        let w: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (u[2 * i], u[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            )
        });
        let s = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(w[0], w[1]),
            _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
        );
        // Lane 4q + j holds vector 4j + q: back in vector order.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, s)
    }

    use crate::kernels::weights::{QK, QUAD_VEC};

    /// The group's rows, for every activation row.
    ///
    /// # Safety
    /// As `tile`; `valid` (the group's rows that exist) at most `GROUP`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw")]
    unsafe fn group<const L: u8, const H: bool>(
        w: &QWeight,
        g: usize,
        a: &Acts,
        out: Out,
        valid: usize,
    ) {
        let put = |i: usize, y: __m512| {
            let mut lanes = [0f32; GROUP];
            _mm512_storeu_ps(lanes.as_mut_ptr(), y);
            for (rr, &v) in lanes.iter().enumerate().take(valid) {
                out.set(i, g * GROUP + rr, v);
            }
        };
        // Eight rows at a time where there are (32 registers hold the eight
        // unpacked quads and eight rows' sums), then four, then one.
        let mut i = 0;
        while i + 8 <= a.m {
            for (r, &y) in micro::<L, H, 8>(w, g, a, i).iter().enumerate() {
                put(i + r, y);
            }
            i += 8;
        }
        while i + 4 <= a.m {
            for (r, &y) in micro::<L, H, 4>(w, g, a, i).iter().enumerate() {
                put(i + r, y);
            }
            i += 4;
        }
        for i in i..a.m {
            put(i, micro::<L, H, 1>(w, g, a, i)[0]);
        }
    }

    /// Sixteen scales or minimums from `p` (f16 when `H`, else f32) as f32.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw")]
    #[inline]
    unsafe fn load16<const H: bool>(p: *const u8) -> __m512 {
        if H {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    /// Group `g`'s sixteen weight rows times activation rows `i..i + R`: per
    /// activation row, the rows' results (the steps of `avx2::micro`, sixteen lanes
    /// wide; Q8_0's signs by mask, AVX-512 having no byte `sign`; IQ4's levels
    /// offset by 128 instead of signed, as AVX2's pairs could saturate on them but
    /// VNNI's sums cannot: the integers are the same).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw")]
    #[inline(never)]
    unsafe fn micro<const L: u8, const H: bool, const R: usize>(
        w: &QWeight,
        g: usize,
        a: &Acts,
        i: usize,
    ) -> [__m512; R] {
        let lay = layout(L);
        let (min, hb, halves) = (lay.has_min(), lay.high_bits(), lay.has_halves());
        let (lbits, min_halves, fb) = (lay.low_bits(), lay.has_min_halves(), lay.factor_bytes());
        // Quads per vector of high bits.
        let per = 8 / hb.max(1);
        let (lb, hbytes) = (lay.low_bytes(), lay.high_bytes());
        let esz = if H { 2 } else { 4 };
        // Bounds-checked once here; the loop indexes within them.
        let view = w.group(g);
        let (low, high, hv) = (view.low.as_ptr(), view.high.as_ptr(), view.halves.as_ptr());
        let mut xq = [std::ptr::null::<u8>(); R];
        let mut xs = [std::ptr::null::<crate::kernels::acts::BlockSums>(); R];
        for r in 0..R {
            xq[r] = a.row(i + r).as_ptr() as *const u8;
            xs[r] = a.row_sums(i + r).as_ptr();
        }
        let nibble = _mm512_set1_epi8(0x0F);
        let crumb = _mm512_set1_epi8(0x03);
        let high_mask = _mm512_set1_epi8((((1u32 << hb) - 1) << lbits) as i8);
        // IQ4's levels go in as unsigned bytes, 128 up (VNNI's products never
        // saturate), and come off with the activations' sum, as an offset does.
        let offset = if L == TABLE4 {
            128
        } else {
            lay.offset() as i32
        };
        let zero = _mm512_setzero_si512();
        let levels = _mm512_xor_si512(
            _mm512_broadcast_i32x4(iq4_levels()),
            _mm512_set1_epi8(i8::MIN),
        );
        let mut acc = [_mm512_setzero_ps(); R];
        let mut summ = [_mm512_setzero_ps(); R];
        for b in 0..w.nb {
            let lo = low.add(b * lb);
            // Four blocks on (see `avx2::micro`).
            for line in (0..lb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(lo.wrapping_add(4 * lb + line) as *const i8);
            }
            let mut wq = [zero; 8];
            let mut neg = [0u64; 8];
            if L == SIGNED8 {
                for q in 0..8 {
                    let v = _mm512_loadu_si512(lo.add(q * QUAD_VEC) as *const _);
                    wq[q] = _mm512_abs_epi8(v);
                    neg[q] = _mm512_movepi8_mask(v);
                }
            } else if lbits == 2 {
                for v in 0..2 {
                    let raw = _mm512_loadu_si512(lo.add(v * QUAD_VEC) as *const _);
                    wq[v] = _mm512_and_si512(raw, crumb);
                    wq[v + 2] = _mm512_and_si512(_mm512_srli_epi16::<2>(raw), crumb);
                    wq[v + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), crumb);
                    wq[v + 6] = _mm512_and_si512(_mm512_srli_epi16::<6>(raw), crumb);
                }
            } else {
                for v in 0..4 {
                    let raw = _mm512_loadu_si512(lo.add(v * QUAD_VEC) as *const _);
                    wq[v] = _mm512_and_si512(raw, nibble);
                    wq[v + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble);
                }
            }
            if L == TABLE4 {
                for w in wq.iter_mut() {
                    *w = _mm512_shuffle_epi8(levels, *w);
                }
            }
            if hb > 0 {
                let hi = high.add(b * hbytes);
                for (q, wq) in wq.iter_mut().enumerate() {
                    let (vec, shift) = (q / per, hb * (q % per));
                    let raw = _mm512_loadu_si512(hi.add(vec * QUAD_VEC) as *const _);
                    let bits = if shift <= lbits {
                        _mm512_sll_epi16(raw, _mm_cvtsi32_si128((lbits - shift) as i32))
                    } else {
                        _mm512_srl_epi16(raw, _mm_cvtsi32_si128((shift - lbits) as i32))
                    };
                    *wq = _mm512_or_si512(*wq, _mm512_and_si512(bits, high_mask));
                }
            }
            let dw = load16::<H>(view.d.add(b * GROUP * esz));
            let mw = if min {
                load16::<H>(view.m.add(b * GROUP * esz))
            } else {
                _mm512_setzero_ps()
            };
            // The halves' factors, and (Q2_K) their minimums' factors.
            let mut f = [zero; 4];
            for (k, f) in f.iter_mut().enumerate().take(fb / GROUP) {
                let p = hv.add(b * fb + k * GROUP);
                *f = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
            }
            let [f0, f1, t0, t1] = f;
            for r in 0..R {
                let x = xq[r].add(b * QK);
                let sums = &*xs[r].add(b);
                let mut half = [zero; 2];
                for q in 0..8 {
                    let xb = _mm512_set1_epi32((x.add(4 * q) as *const i32).read_unaligned());
                    let xv = if L == SIGNED8 {
                        _mm512_mask_sub_epi8(xb, neg[q], zero, xb)
                    } else {
                        xb
                    };
                    half[q / 4] = _mm512_dpbusd_epi32(half[q / 4], wq[q], xv);
                }
                let isum = if halves {
                    let h0 = _mm512_sub_epi32(half[0], _mm512_set1_epi32(offset * sums.halves[0]));
                    let h1 = _mm512_sub_epi32(half[1], _mm512_set1_epi32(offset * sums.halves[1]));
                    _mm512_add_epi32(_mm512_mullo_epi32(h0, f0), _mm512_mullo_epi32(h1, f1))
                } else {
                    let s = _mm512_add_epi32(half[0], half[1]);
                    if offset != 0 {
                        _mm512_sub_epi32(s, _mm512_set1_epi32(offset * sums.sum))
                    } else {
                        s
                    }
                };
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(sums.d));
                acc[r] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[r]);
                if min {
                    let s = if min_halves {
                        let t = _mm512_add_epi32(
                            _mm512_mullo_epi32(t0, _mm512_set1_epi32(sums.halves[0])),
                            _mm512_mullo_epi32(t1, _mm512_set1_epi32(sums.halves[1])),
                        );
                        _mm512_mul_ps(_mm512_set1_ps(sums.d), _mm512_cvtepi32_ps(t))
                    } else {
                        _mm512_set1_ps(if H { sums.s } else { sums.s_exact })
                    };
                    summ[r] = _mm512_add_ps(summ[r], _mm512_mul_ps(mw, s));
                }
            }
        }
        let mut y = [_mm512_setzero_ps(); R];
        for r in 0..R {
            y[r] = _mm512_add_ps(acc[r], summ[r]);
        }
        y
    }
}

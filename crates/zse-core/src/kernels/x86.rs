//! The x86 paths: the arithmetic of `generic::dot`, eight lanes at a time, with the
//! accumulators in registers.
//!
//! A micro-kernel multiplies `K` weight rows by `R` activation rows block by block.
//! Batches go `K = 1, R = 8`: each weight block is unpacked once for eight rows, whose
//! blocks and scales the activations hold interleaved (`acts::GroupBlock`), so a row
//! costs two loads and five vector operations per block (its scale is loaded already
//! splatted: broadcasting it from a register queues every row on the shuffle unit,
//! which measured 1.3 ns per row and block against 0.95 on one thread of a Zen 3).
//! Leftover rows (every row of a single
//! sequence's decode) go `K = 4, R = 1`: four independent accumulation chains, so the
//! loop is bound by throughput, not by the latency of one chain of fused adds.
//!
//! The two paths differ only in the integer dot of 4-value lanes: AVX2 multiplies to
//! 16-bit pairs and adds those (`maddubs` + `madd`); AVX-512 VNNI does it in one
//! instruction. The pairs never saturate (|w| <= 128, |x| <= 127, two products), so
//! both give the same integers. Q6_K's halves multiply their 16-bit pairs by their
//! 8-bit factors in the `madd` (on both paths: that step is free there).
//!
//! Each layout is its own instantiation (`L`): unpacking a block is a mask or a
//! shift of the paired nibbles, an OR of the high bits where the layout has them,
//! and the subtraction of its offset.

macro_rules! x86_path {
    ($features:literal, |$a:ident, $b:ident| $idot:expr) => {
        use std::arch::x86_64::*;
        use std::ops::Range;

        use crate::kernels::acts::Acts;
        use crate::kernels::generic::hsum8;
        use crate::kernels::weights::{high_place, Layout, QWeight};
        use crate::kernels::Out;

        /// `out(i, k)` = weight row `k` times activation row `i`, for the tile's
        /// weight rows and every activation row. False (nothing written) for a
        /// layout and scale precision that loading never produces.
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
                (Layout::Q6Halves, true) => tile_of::<Q6_HALVES, true>(w, rows, a, out),
                (Layout::Q8, true) => tile_of::<SIGNED8, true>(w, rows, a, out),
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

        const fn layout(l: u8) -> Layout {
            match l {
                Q4_OFFSET => Layout::Q4Offset,
                Q4_MIN => Layout::Q4Min,
                Q5_OFFSET => Layout::Q5Offset,
                Q5_MIN => Layout::Q5Min,
                Q6_HALVES => Layout::Q6Halves,
                _ => Layout::Q8,
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn tile_of<const L: u8, const H: bool>(
            w: &QWeight,
            rows: Range<usize>,
            a: &Acts,
            out: Out,
        ) {
            assert!(rows.end <= w.rows && w.nb == a.nb && w.layout == layout(L));
            let m = a.m;
            let mut i = 0;
            while i + 8 <= m {
                for k in rows.clone() {
                    let y = micro::<L, H, 1, 8>(w, k, a, i);
                    for (r, &v) in y[0].iter().enumerate() {
                        out.set(i + r, k, v);
                    }
                }
                i += 8;
            }
            for i in i..m {
                let mut k = rows.start;
                while k + 4 <= rows.end {
                    let y = micro::<L, H, 4, 1>(w, k, a, i);
                    for (j, y) in y.iter().enumerate() {
                        out.set(i, k + j, y[0]);
                    }
                    k += 4;
                }
                for k in k..rows.end {
                    out.set(i, k, micro::<L, H, 1, 1>(w, k, a, i)[0][0]);
                }
            }
        }

        /// The 4-value-lane integer dot of unsigned `a` and signed `b`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn idot($a: __m256i, $b: __m256i) -> __m256i {
            $idot
        }

        /// The same, each 16-bit pair times its factor in `f` (16 x i16).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn idot_scaled(a: __m256i, b: __m256i, f: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), f)
        }

        /// Eight scales or minimums from `p` (f16 when `H`, else f32) as f32.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn load8<const H: bool>(p: *const u8) -> __m256 {
            if H {
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
            } else {
                _mm256_loadu_ps(p as *const f32)
            }
        }

        /// A block's two 8-bit half factors at `p` as 16 x i16: the first eight
        /// 16-bit lanes (values 0..16) the first factor, the rest the second.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn halves16(p: *const i8) -> __m256i {
            let pair = (p as *const u16).read_unaligned();
            let spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_cvtsi32_si128(pair as i32), spread))
        }

        /// Weight rows `k..k + K` times activation rows `i..i + R` (`R` is 1 or 8).
        /// The caller guarantees both ranges exist and the block counts agree.
        /// Never inlined: compiled on its own, its fixed-size loops unroll and the
        /// accumulators stay in registers.
        ///
        /// Blocks go in groups of eight: the group's weight scales (and minimums)
        /// are converted in one instruction; for one activation row they are also
        /// multiplied by its eight scales (and sums) at once, the same products the
        /// generic code forms one by one.
        #[target_feature(enable = $features)]
        #[inline(never)]
        unsafe fn micro<const L: u8, const H: bool, const K: usize, const R: usize>(
            w: &QWeight,
            k: usize,
            a: &Acts,
            i: usize,
        ) -> [[f32; R]; K] {
            let lay = layout(L);
            let (min, hb, halves) = (lay.has_min(), lay.high_bits(), lay.has_halves());
            let (nb, nbp, m) = (w.nb, w.nbp, a.m);
            let esz = if H { 2 } else { 4 };
            let rb = w.row_bytes();
            // Row starts, bounds-checked once here; the loop indexes within them.
            let wq: [*const u8; K] = std::array::from_fn(|kk| w.row_values(k + kk).as_ptr());
            let wh: [*const u8; K] =
                std::array::from_fn(|kk| w.row_high_bits(k + kk).as_ptr());
            let hrb = w.row_high_bits(k).len();
            let wf: [*const i8; K] = std::array::from_fn(|kk| w.row_halves(k + kk).as_ptr());
            let wd: [*const u8; K] = std::array::from_fn(|kk| w.d.row_bytes((k + kk) * nbp, nbp));
            let wm: [*const u8; K] = std::array::from_fn(|kk| match min {
                true => w.m.row_bytes((k + kk) * nbp, nbp),
                false => std::ptr::null(),
            });
            // By row (one activation row) or transposed (eight).
            let (xd_row, xs_row) = (
                a.d_rows[i * nbp..][..nbp].as_ptr(),
                a.s_rows[i * nbp..][..nbp].as_ptr(),
            );
            let xs_t = a.s[..nb * m].as_ptr().add(i);
            // One row: its blocks; eight: their group, block by block (`i` is then a
            // multiple of 8).
            let (xq, group) = if R == 8 {
                (std::ptr::null(), a.groups[i / 8 * nb..(i / 8 + 1) * nb].as_ptr())
            } else {
                (a.row(i).as_ptr() as *const __m256i, std::ptr::null())
            };
            let low = _mm256_set1_epi8(0x0F);
            let high_mask = _mm256_set1_epi8(((1u32 << hb) - 1) as i8);
            let offset = _mm256_set1_epi8(lay.offset());
            let mut acc = [[_mm256_setzero_ps(); R]; K];
            let mut summs = [[0f32; R]; K];
            let mut summv = [_mm256_setzero_ps(); K];
            for g in (0..nb).step_by(8) {
                // Per weight row: the group's scales (times the activation scales
                // when R == 1), and minimums (times the activation sums).
                let mut sd = [[0f32; 8]; K];
                let mut sm = [[0f32; 8]; K];
                for kk in 0..K {
                    let mut v = load8::<H>(wd[kk].add(g * esz));
                    if R == 1 {
                        v = _mm256_mul_ps(v, _mm256_loadu_ps(xd_row.add(g)));
                    }
                    _mm256_storeu_ps(sd[kk].as_mut_ptr(), v);
                    if min {
                        let mut v = load8::<H>(wm[kk].add(g * esz));
                        if R == 1 {
                            v = _mm256_mul_ps(v, _mm256_loadu_ps(xs_row.add(g)));
                        }
                        _mm256_storeu_ps(sm[kk].as_mut_ptr(), v);
                    }
                }
                for b in g..(g + 8).min(nb) {
                    let lane = b - g;
                    // Block 2p is the low nibbles of its pair, 2p + 1 the high ones.
                    let (at, shift) = match L {
                        SIGNED8 => (b * 32, _mm_setzero_si128()),
                        _ => ((b / 2) * 32, _mm_cvtsi32_si128(4 * (b & 1) as i32)),
                    };
                    let (hgroup, hshift) = high_place(b, hb.max(1));
                    for kk in 0..K {
                        // The same place K rows on: what the next call reads. The
                        // hardware alone leaves much of the memory bandwidth unused.
                        // (Past the last row the address is not valid; a prefetch
                        // never faults, and `wrapping_add` keeps the arithmetic
                        // defined.)
                        let ahead = wq[kk].wrapping_add(at + K * rb);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                        let raw = _mm256_loadu_si256(wq[kk].add(at) as *const __m256i);
                        let wv = if L == SIGNED8 {
                            raw
                        } else {
                            let mut v = _mm256_and_si256(_mm256_srl_epi16(raw, shift), low);
                            if hb > 0 {
                                let hat = hgroup * 32;
                                if b % (8 / hb) == 0 {
                                    let ahead = wh[kk].wrapping_add(hat + K * hrb);
                                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                                }
                                let hraw = _mm256_loadu_si256(wh[kk].add(hat) as *const __m256i);
                                let hv = _mm256_and_si256(
                                    _mm256_srl_epi16(hraw, _mm_cvtsi32_si128(hshift as i32)),
                                    high_mask,
                                );
                                v = _mm256_or_si256(v, _mm256_slli_epi16::<4>(hv));
                            }
                            if min {
                                v
                            } else {
                                _mm256_sub_epi8(v, offset)
                            }
                        };
                        // Unsigned weights multiply as they are; signed ones as
                        // |w| * (x * sign(w)).
                        let wu = if min { wv } else { _mm256_sign_epi8(wv, wv) };
                        let factors = if halves {
                            halves16(wf[kk].add(2 * b))
                        } else {
                            _mm256_setzero_si256()
                        };
                        let w_scale = _mm256_set1_ps(sd[kk][lane]);
                        for r in 0..R {
                            let xv = if R == 8 {
                                _mm256_load_si256((*group.add(b)).qs[r].0.as_ptr() as *const __m256i)
                            } else {
                                _mm256_load_si256(xq.add(b))
                            };
                            let x = if min { xv } else { _mm256_sign_epi8(xv, wv) };
                            let p = if halves {
                                idot_scaled(wu, x, factors)
                            } else {
                                idot(wu, x)
                            };
                            let p = _mm256_cvtepi32_ps(p);
                            // Several rows: weight scale times the row's splatted
                            // scale (the product the generic code forms); one row:
                            // already in `sd`.
                            let dd = if R == 8 {
                                _mm256_mul_ps(w_scale, _mm256_load_ps((*group.add(b)).d[r].as_ptr()))
                            } else {
                                w_scale
                            };
                            acc[kk][r] = _mm256_fmadd_ps(dd, p, acc[kk][r]);
                        }
                        if min {
                            if R == 8 {
                                let t = _mm256_mul_ps(
                                    _mm256_set1_ps(sm[kk][lane]),
                                    _mm256_loadu_ps(xs_t.add(b * m)),
                                );
                                summv[kk] = _mm256_add_ps(summv[kk], t);
                            } else {
                                summs[kk][0] += sm[kk][lane];
                            }
                        }
                    }
                }
            }
            let mut y = [[0f32; R]; K];
            for kk in 0..K {
                if R == 8 {
                    _mm256_storeu_ps(summs[kk].as_mut_ptr(), summv[kk]);
                }
                for r in 0..R {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[kk][r]);
                    y[kk][r] = hsum8(&lanes) + summs[kk][r];
                }
            }
            y
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

        /// Activation rows go four at a time past two weight rows (eight
        /// accumulators: each weight vector loaded once serves four rows); the rest
        /// one at a time past four weight rows.
        #[target_feature(enable = $features)]
        unsafe fn float_tile_of<const F: u8>(
            w: &QWeight,
            rows: Range<usize>,
            x: &[f32],
            m: usize,
            out: Out,
        ) {
            assert!(rows.end <= w.rows && x.len() == m * w.cols && w.cols % 8 == 0);
            let mut i = 0;
            while i + 4 <= m {
                let mut k = rows.start;
                while k + 2 <= rows.end {
                    let y = float_micro::<F, 2, 4>(w, k, x, i);
                    for (kk, y) in y.iter().enumerate() {
                        for (r, &v) in y.iter().enumerate() {
                            out.set(i + r, k + kk, v);
                        }
                    }
                    k += 2;
                }
                for k in k..rows.end {
                    for (r, &v) in float_micro::<F, 1, 4>(w, k, x, i)[0].iter().enumerate() {
                        out.set(i + r, k, v);
                    }
                }
                i += 4;
            }
            for i in i..m {
                let mut k = rows.start;
                while k + 4 <= rows.end {
                    let y = float_micro::<F, 4, 1>(w, k, x, i);
                    for (kk, y) in y.iter().enumerate() {
                        out.set(i, k + kk, y[0]);
                    }
                    k += 4;
                }
                for k in k..rows.end {
                    out.set(i, k, float_micro::<F, 1, 1>(w, k, x, i)[0][0]);
                }
            }
        }

        /// Eight weights at `p` as f32 (exact for every float type).
        #[target_feature(enable = $features)]
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
        /// fused-multiply-added into lane `j % 8` (`generic::float_dot`).
        #[target_feature(enable = $features)]
        #[inline(never)]
        unsafe fn float_micro<const F: u8, const K: usize, const R: usize>(
            w: &QWeight,
            k: usize,
            x: &[f32],
            i: usize,
        ) -> [[f32; R]; K] {
            let cols = w.cols;
            let esz = if F == F32 { 4 } else { 2 };
            let rb = w.row_bytes();
            let mut wp = [std::ptr::null::<u8>(); K];
            for (kk, p) in wp.iter_mut().enumerate() {
                *p = w.row_values(k + kk).as_ptr();
            }
            let mut xp = [std::ptr::null::<f32>(); R];
            for (r, p) in xp.iter_mut().enumerate() {
                *p = x[(i + r) * cols..][..cols].as_ptr();
            }
            let mut acc = [[_mm256_setzero_ps(); R]; K];
            for j in (0..cols).step_by(8) {
                let at = j * esz;
                let mut wv = [_mm256_setzero_ps(); K];
                for kk in 0..K {
                    // Once per cache line: the same place K rows on (see `micro`).
                    if at % 64 == 0 {
                        let ahead = wp[kk].wrapping_add(at + K * rb);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                    wv[kk] = load_floats::<F>(wp[kk].add(at));
                }
                for r in 0..R {
                    let xv = _mm256_loadu_ps(xp[r].add(j));
                    for kk in 0..K {
                        acc[kk][r] = _mm256_fmadd_ps(wv[kk], xv, acc[kk][r]);
                    }
                }
            }
            let mut y = [[0f32; R]; K];
            for kk in 0..K {
                for r in 0..R {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[kk][r]);
                    y[kk][r] = hsum8(&lanes);
                }
            }
            y
        }
    };
}

/// AVX2 with FMA.
pub mod avx2 {
    x86_path!("avx2,fma,f16c", |a, b| _mm256_madd_epi16(
        _mm256_maddubs_epi16(a, b),
        _mm256_set1_epi16(1)
    ));
}

/// AVX-512 VNNI (with VL, on 256-bit vectors).
pub mod avx512 {
    x86_path!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", |a, b| {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    });
}

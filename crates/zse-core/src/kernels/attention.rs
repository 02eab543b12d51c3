//! Causal attention on the CPU, reading keys and values where they lie in the block
//! pool (no gather, no copy of the cache per step).
//!
//! Every reduction has a fixed order: a score is a dot product over the head
//! dimension in index order; the softmax and the weighted sum of values run over key
//! positions in position order. So a token's attention output is bit-for-bit the same
//! whether it is computed alone, in a prefill chunk of any size, after a preemption,
//! or beside other sequences: batch invariance rests on this. Work is split across
//! threads by KV head, which changes no order inside a row.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::ops::Range;

use super::elementwise::{exp, exp_lanes, LANES};

/// One layer's keys or values in the pool: a row per slot, `kv_heads * head_dim` wide.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvRows<'_> {
    /// Head `g` of slot `slot`, as f32, into `dst`.
    #[inline(always)]
    fn head_into(&self, slot: u32, g: usize, width: usize, hd: usize, dst: &mut [f32]) {
        let start = slot as usize * width + g * hd;
        match self {
            KvRows::F16(rows) => rows[start..start + hd].convert_to_f32_slice(dst),
            KvRows::F32(rows) => dst.copy_from_slice(&rows[start..start + hd]),
        }
    }
}

thread_local! {
    /// Per-thread scores and one key or value row for `attend_head`: buffers that
    /// only ever grow (no allocation per call).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Query rows (of one head) that share each converted key and value row.
const ROW_TILE: usize = 16;

/// Head counts and size, and how far back a query sees.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding-window attention: a query at position p sees keys `p + 1 - window
    /// ..= p` only (llama.cpp's standard window). None: every earlier key.
    pub window: Option<usize>,
}

/// One sequence of the batch: its query tokens are rows `offset..offset + n` of the
/// packed queries, at positions `past..past + n`; `slots` holds the cache slot of
/// every position `0..past + n`.
#[derive(Debug, Clone, Copy)]
pub struct SeqAttn<'a> {
    pub slots: &'a [u32],
    pub past: usize,
    pub n: usize,
    pub offset: usize,
}

/// Attention for a whole batch in one parallel pass over items of (sequence, query
/// heads, tile of query rows). `q: [tokens, num_heads * head_dim]` (rotated, packed
/// over the batch, as the projection gives them: each query head is read where it
/// lies); returns the same shape.
pub fn paged_attention(
    q: &[f32],
    tokens: usize,
    k: KvRows<'_>,
    v: KvRows<'_>,
    seqs: &[SeqAttn<'_>],
    h: Heads,
) -> Vec<f32> {
    attention_with(q, tokens, k, v, seqs, h, Loops::best())
}

/// One parallel item: query heads `heads` (all reading KV head `heads.start /
/// groups`) of queries `rows` of sequence `seq`.
struct Item {
    seq: usize,
    heads: Range<usize>,
    rows: Range<usize>,
}

/// `paged_attention` with the given loops (tests compare them).
fn attention_with(
    q: &[f32],
    tokens: usize,
    k: KvRows<'_>,
    v: KvRows<'_>,
    seqs: &[SeqAttn<'_>],
    h: Heads,
    loops: Loops,
) -> Vec<f32> {
    let (hd, nh, nkv) = (h.head_dim, h.num_heads, h.num_kv_heads);
    let groups = nh / nkv;
    debug_assert_eq!(q.len(), nh * tokens * hd);
    // A decoding sequence's query heads of one group read each cache row once
    // between them, where there are items enough for every thread; otherwise (one
    // sequence, or prefill chunks, whose rows share cache rows already) an item is
    // one query head, so that every thread has work. Neither changes any row's
    // arithmetic.
    let grouped = seqs.len() * nkv >= 2 * rayon::current_num_threads();
    let mut work = Vec::new();
    for (seq, s) in seqs.iter().enumerate() {
        let per_item = if grouped && s.n == 1 { groups } else { 1 };
        for first in (0..nh).step_by(per_item) {
            for i in (0..s.n).step_by(ROW_TILE) {
                work.push(Item {
                    seq,
                    heads: first..first + per_item,
                    rows: i..(i + ROW_TILE).min(s.n),
                });
            }
        }
    }
    let parts: Vec<Vec<f32>> = work
        .par_iter()
        .map(|it| {
            let s = &seqs[it.seq];
            let queries: Vec<Query<'_>> = it
                .heads
                .clone()
                .flat_map(|head| {
                    it.rows.clone().map(move |i| {
                        let at = ((s.offset + i) * nh + head) * hd;
                        let visible = s.past + i + 1;
                        Query {
                            q: &q[at..at + hd],
                            first: h.window.map_or(0, |w| visible.saturating_sub(w)),
                            visible,
                        }
                    })
                })
                .collect();
            attend_rows(&queries, (k, v), s, it.heads.start / groups, h, loops)
        })
        .collect();
    let mut out = vec![0f32; tokens * nh * hd];
    for (it, part) in work.iter().zip(&parts) {
        let s = &seqs[it.seq];
        let dests = it.heads.clone().flat_map(|head| {
            it.rows
                .clone()
                .map(move |i| (s.offset + i) * nh * hd + head * hd)
        });
        for (src, row) in part.chunks_exact(hd).zip(dests) {
            out[row..row + hd].copy_from_slice(src);
        }
    }
    out
}

/// A query row and the cache positions it sees (keys `first..visible`).
struct Query<'a> {
    q: &'a [f32],
    first: usize,
    visible: usize,
}

/// The outputs of `queries` (all of sequence `s`, reading KV head `g`):
/// `[queries, head_dim]`. Each key (then each value) row is read once for all the
/// queries that see it.
fn attend_rows(
    queries: &[Query<'_>],
    (k, v): (KvRows<'_>, KvRows<'_>),
    s: &SeqAttn<'_>,
    g: usize,
    h: Heads,
    loops: Loops,
) -> Vec<f32> {
    let (hd, nkv) = (h.head_dim, h.num_kv_heads);
    debug_assert_eq!(s.slots.len(), s.past + s.n);
    let scale = 1.0 / (hd as f32).sqrt();
    let n = queries.len();
    // Under a sliding window the tile reads from its earliest visible key; each
    // query's keys before its own first are masked out of the softmax below.
    let lo = queries.iter().map(|r| r.first).min().unwrap_or(0);
    let shifted: Vec<Query<'_>>;
    let queries = if lo == 0 {
        queries
    } else {
        shifted = (queries.iter())
            .map(|r| Query {
                q: r.q,
                first: r.first - lo,
                visible: r.visible - lo,
            })
            .collect();
        &shifted
    };
    let span = queries.iter().map(|r| r.visible).max().unwrap_or(0);
    let view = HeadView {
        slots: &s.slots[lo..lo + span],
        g,
        width: nkv * hd,
        hd,
    };
    let mut out = vec![0f32; n * hd];
    SCRATCH.with_borrow_mut(|(scores, row)| {
        row.resize(hd, 0.0);
        if scores.len() < n * span {
            scores.resize(n * span, 0.0);
        }
        let scores = &mut scores[..n * span];
        if !fast::scores(loops, k, &view, queries, scale, scores) {
            for (j, &slot) in view.slots.iter().enumerate() {
                k.head_into(slot, g, view.width, hd, row);
                for (t, r) in queries.iter().enumerate() {
                    if j < r.visible {
                        scores[t * span + j] = dot(r.q, row) * scale;
                    }
                }
            }
        }
        softmax(scores, span, queries);
        if !fast::values(loops, v, &view, queries, scores, &mut out) {
            for (j, &slot) in view.slots.iter().enumerate() {
                v.head_into(slot, g, view.width, hd, row);
                for (t, (r, o)) in queries.iter().zip(out.chunks_exact_mut(hd)).enumerate() {
                    if j < r.visible {
                        axpy(scores[t * span + j], row, o);
                    }
                }
            }
        }
    });
    out
}

/// Rows whose sums [`softmax`] runs side by side.
const SUM_ROWS: usize = 8;

/// Softmax of each query's row of `scores` (`span` apart), in place. A key masked
/// out of a row (before the query's first, under a window) weighs 0. The
/// exponentials vectorise, value by value. Each row's sum runs in key order (a
/// masked key adds an exact 0), each addition waiting on the last: so
/// [`SUM_ROWS`] rows' sums run side by side, each in its own order. Each weight
/// is then multiplied by the inverse of its row's sum.
fn softmax(scores: &mut [f32], span: usize, queries: &[Query<'_>]) {
    for (t, r) in queries.iter().enumerate() {
        let row = &mut scores[t * span..t * span + r.visible];
        row[..r.first].fill(0.0);
        let row = &mut row[r.first..];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let (runs, tail) = row.as_chunks_mut::<LANES>();
        for run in runs {
            run.iter_mut().for_each(|x| *x -= max);
            exp_lanes(run);
        }
        tail.iter_mut().for_each(|x| *x = exp(*x - max));
    }
    for (group, rows) in queries.chunks(SUM_ROWS).enumerate() {
        let top = group * SUM_ROWS;
        let mut sums = [0f32; SUM_ROWS];
        // The keys every row of the group sees, all rows a step, then each row's own.
        let shared = rows.iter().map(|r| r.visible).min().unwrap_or(0);
        for j in 0..shared {
            for (t, sum) in sums.iter_mut().enumerate().take(rows.len()) {
                *sum += scores[(top + t) * span + j];
            }
        }
        for ((t, r), sum) in rows.iter().enumerate().zip(&mut sums) {
            let row = &mut scores[(top + t) * span..(top + t) * span + r.visible];
            *sum = row[shared..].iter().fold(*sum, |s, &x| s + x);
            let inv = 1.0 / *sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// The cache rows one tile reads: KV head `g` of the given slots.
struct HeadView<'a> {
    slots: &'a [u32],
    g: usize,
    /// Values per slot (all KV heads).
    width: usize,
    hd: usize,
}

/// Which loops run `attend_rows`'s scores and weighted sums: the portable ones, or
/// x86 forms of them on 256- or 512-bit vectors. Every form gives the portable bits:
/// lanes hold independent sums, so the vector width changes no order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loops {
    Portable,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

impl Loops {
    /// The widest this CPU runs.
    fn best() -> Self {
        static BEST: std::sync::OnceLock<Loops> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use crate::kernels::KernelPath;
                if KernelPath::Avx512.supported() {
                    return Loops::Avx512;
                }
                if KernelPath::Avx2.supported() {
                    return Loops::Avx2;
                }
            }
            Loops::Portable
        })
    }
}

/// The x86 forms of the two loops of `attend_rows`: the same operations in the same
/// order (a multiply then an add per lane, lanes summed in order, values added in
/// position order), with each cache row converted in registers and the outputs of a
/// few query rows kept in registers across all positions. They return false where
/// they do not apply (portable loops asked for, a head size other than 64 or 128),
/// and the portable loops run.
mod fast {
    use super::{HeadView, KvRows, Loops, Query};

    /// `$module::$f::<HALF, CHUNKS>(args)` for the pool's precision (f16 or not)
    /// and a head size of 64 or 128 (8 or 16 chunks of 8); `return false` for
    /// another.
    #[cfg(target_arch = "x86_64")]
    macro_rules! by_shape {
        ($half:expr, $hd:expr, $module:ident::$f:ident($($arg:expr),*)) => {
            match ($half, $hd) {
                (true, 64) => $module::$f::<true, 8>($($arg),*),
                (true, 128) => $module::$f::<true, 16>($($arg),*),
                (false, 64) => $module::$f::<false, 8>($($arg),*),
                (false, 128) => $module::$f::<false, 16>($($arg),*),
                _ => return false,
            }
        };
    }

    pub fn scores(
        loops: Loops,
        k: KvRows<'_>,
        view: &HeadView<'_>,
        queries: &[Query<'_>],
        scale: f32,
        scores: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(base) = checked_base(loops, k, view) {
            let span = view.slots.len();
            let (p, half, hd) = (base.0, base.1, view.hd);
            // SAFETY: `checked_base` checked the features at run time, and that
            // every slot's head lies in the pool.
            unsafe {
                match loops {
                    Loops::Avx512 => by_shape!(
                        half,
                        hd,
                        x86_512::scores(p, view, queries, scale, scores, span)
                    ),
                    _ => by_shape!(half, hd, x86::scores(p, view, queries, scale, scores, span)),
                }
            };
            return true;
        }
        let _ = (loops, k, view, queries, scale, scores);
        false
    }

    /// `out[t] += weights[t * span + j] * value j` for each query `t`, in position
    /// order.
    pub fn values(
        loops: Loops,
        v: KvRows<'_>,
        view: &HeadView<'_>,
        queries: &[Query<'_>],
        weights: &[f32],
        out: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(base) = checked_base(loops, v, view) {
            let (p, half, hd) = (base.0, base.1, view.hd);
            // SAFETY: as in `scores`.
            unsafe {
                match loops {
                    Loops::Avx512 => {
                        by_shape!(half, hd, x86_512::values(p, view, queries, weights, out))
                    }
                    _ => by_shape!(half, hd, x86::values(p, view, queries, weights, out)),
                }
            };
            return true;
        }
        let _ = (loops, v, view, queries, weights, out);
        false
    }

    /// The pool's first byte and whether it holds f16, if `loops` are x86 ones this
    /// CPU runs, the head size is one they take, and every slot's row lies inside
    /// the pool.
    #[cfg(target_arch = "x86_64")]
    fn checked_base(
        loops: Loops,
        rows: KvRows<'_>,
        view: &HeadView<'_>,
    ) -> Option<(*const u8, bool)> {
        use crate::kernels::KernelPath;
        let supported = match loops {
            Loops::Portable => false,
            Loops::Avx2 => KernelPath::Avx2.supported(),
            Loops::Avx512 => KernelPath::Avx512.supported(),
        };
        if !supported || !matches!(view.hd, 64 | 128) {
            return None;
        }
        let max_slot = *view.slots.iter().max()? as usize;
        let (base, len, half) = match rows {
            KvRows::F16(r) => (r.as_ptr() as *const u8, r.len(), true),
            KvRows::F32(r) => (r.as_ptr() as *const u8, r.len(), false),
        };
        ((max_slot + 1) * view.width <= len && (view.g + 1) * view.hd <= view.width)
            .then_some((base, half))
    }

    /// A score tile's results: pair (t, kk) of `sums` (at `t * k + kk`) is query
    /// `first + t`'s score of key `j + kk`, stored where that query sees the key
    /// (`n` keys in the tile; rows of `span` scores).
    #[cfg(target_arch = "x86_64")]
    fn store_tile(
        scores: &mut [f32],
        qs: &[Query<'_>],
        (first, span, j, n): (usize, usize, usize, usize),
        k: usize,
        sums: &[f32],
    ) {
        for (t, r) in qs.iter().enumerate() {
            let row = (first + t) * span + j;
            for kk in 0..n.min(r.visible.saturating_sub(j)) {
                scores[row + kk] = sums[t * k + kk];
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::{HeadView, Query};

        /// Chunk `c` (8 values) of the row at `p`, as f32.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn chunk<const H: bool>(p: *const u8, c: usize) -> __m256 {
            if H {
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * c) as *const __m128i))
            } else {
                _mm256_loadu_ps((p as *const f32).add(8 * c))
            }
        }

        /// Where head `g` of `slot` starts.
        #[inline]
        pub(super) unsafe fn head_at<const H: bool>(
            base: *const u8,
            view: &HeadView<'_>,
            slot: u32,
        ) -> *const u8 {
            let esz = if H { 2 } else { 4 };
            base.add((slot as usize * view.width + view.g * view.hd) * esz)
        }

        /// The lane sums of eight vectors, each in lane order (as `dot` sums its
        /// lanes), as the lanes of one vector: transposed, then added row by row.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        pub(super) unsafe fn sum_lanes8(v: &[__m256; 8]) -> __m256 {
            let lo = |a, b| _mm256_unpacklo_ps(a, b);
            let hi = |a, b| _mm256_unpackhi_ps(a, b);
            // Pairs interleaved: (v0 v1) lanes 0 1 | 4 5, and 2 3 | 6 7; likewise
            // for (v2 v3), (v4 v5), (v6 v7).
            let t = [
                lo(v[0], v[1]),
                hi(v[0], v[1]),
                lo(v[2], v[3]),
                hi(v[2], v[3]),
                lo(v[4], v[5]),
                hi(v[4], v[5]),
                lo(v[6], v[7]),
                hi(v[6], v[7]),
            ];
            // Lane l of v0..v3 in the low half (l < 4) or lane l + 4 (high half).
            let quad = |a, b, c, d| {
                [
                    _mm256_shuffle_ps::<0x44>(a, b),
                    _mm256_shuffle_ps::<0xEE>(a, b),
                    _mm256_shuffle_ps::<0x44>(c, d),
                    _mm256_shuffle_ps::<0xEE>(c, d),
                ]
            };
            let u = quad(t[0], t[2], t[1], t[3]);
            let w = quad(t[4], t[6], t[5], t[7]);
            // Row l: lane l of v0..v7.
            let mut sum = _mm256_permute2f128_ps::<0x20>(u[0], w[0]);
            for l in 1..8 {
                let row = if l < 4 {
                    _mm256_permute2f128_ps::<0x20>(u[l], w[l])
                } else {
                    _mm256_permute2f128_ps::<0x31>(u[l - 4], w[l - 4])
                };
                sum = _mm256_add_ps(sum, row);
            }
            sum
        }

        /// `scores[t * span + j] = dot(query t, key j) * scale` for visible keys.
        /// Eight (query, key) pairs at a time: their chains of adds overlap, and
        /// their lane sums are one transposition; each score's own order is
        /// unchanged.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn scores<const H: bool, const C: usize>(
            base: *const u8,
            view: &HeadView<'_>,
            queries: &[Query<'_>],
            scale: f32,
            scores: &mut [f32],
            span: usize,
        ) {
            let mut t = 0;
            while t < queries.len() {
                let tile = ScoreTile {
                    base,
                    view,
                    first: t,
                    scale,
                    span,
                };
                t += match queries.len() - t {
                    1 => tile.run::<H, C, 1, 8>(queries, scores),
                    2 | 3 => tile.run::<H, C, 2, 4>(queries, scores),
                    _ => tile.run::<H, C, 4, 2>(queries, scores),
                };
            }
        }

        /// Queries `first..first + Q` of a `scores` call.
        struct ScoreTile<'a, 'b> {
            base: *const u8,
            view: &'a HeadView<'b>,
            first: usize,
            scale: f32,
            span: usize,
        }

        impl ScoreTile<'_, '_> {
            /// The tile's scores, `K` keys at a time (`Q * K == 8`); returns `Q`.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn run<const H: bool, const C: usize, const Q: usize, const K: usize>(
                &self,
                queries: &[Query<'_>],
                scores: &mut [f32],
            ) -> usize {
                let qs = &queries[self.first..self.first + Q];
                let seen = qs.iter().map(|r| r.visible).max().unwrap_or(0);
                let scale = _mm256_set1_ps(self.scale);
                let mut j = 0;
                while j < seen {
                    let n = K.min(seen - j);
                    // Past the last key, the last key again (computed, not stored).
                    let keys: [*const u8; K] = std::array::from_fn(|kk| {
                        head_at::<H>(self.base, self.view, self.view.slots[j + kk.min(n - 1)])
                    });
                    // Pair (t, kk) at t * K + kk.
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in 0..C {
                        let qc: [__m256; Q] =
                            std::array::from_fn(|t| _mm256_loadu_ps(qs[t].q.as_ptr().add(8 * c)));
                        for (kk, &key) in keys.iter().enumerate() {
                            let kc = chunk::<H>(key, c);
                            for t in 0..Q {
                                let a = &mut acc[t * K + kk];
                                *a = _mm256_add_ps(*a, _mm256_mul_ps(qc[t], kc));
                            }
                        }
                    }
                    let mut sums = [0f32; 8];
                    _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_mul_ps(sum_lanes8(&acc), scale));
                    super::store_tile(scores, qs, (self.first, self.span, j, n), K, &sums);
                    j += n;
                }
                Q
            }
        }

        /// `out[t] += weights[t * span + j] * value j`, in position order.
        /// One query keeps its whole output in registers; several go two at a time,
        /// 32 values of the output at a time, in registers too.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn values<const H: bool, const C: usize>(
            base: *const u8,
            view: &HeadView<'_>,
            queries: &[Query<'_>],
            weights: &[f32],
            out: &mut [f32],
        ) {
            let (hd, span) = (8 * C, view.slots.len());
            // Value `j`'s weight for query `t`.
            let weight = |t: usize, j: usize| _mm256_set1_ps(weights[t * span + j]);
            if let [r] = queries {
                let mut o = [_mm256_setzero_ps(); C];
                for j in 0..r.visible {
                    let p = head_at::<H>(base, view, view.slots[j]);
                    let a = weight(0, j);
                    for (c, oc) in o.iter_mut().enumerate() {
                        *oc = _mm256_add_ps(*oc, _mm256_mul_ps(a, chunk::<H>(p, c)));
                    }
                }
                for (c, oc) in o.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), *oc);
                }
                return;
            }
            const GROUP: usize = 4;
            for t0 in (0..queries.len()).step_by(2) {
                let pair = &queries[t0..(t0 + 2).min(queries.len())];
                // Both queries see the first `both` values; the rest are one's alone.
                let both = pair.iter().map(|r| r.visible).min().unwrap_or(0);
                for c0 in (0..C).step_by(GROUP) {
                    let mut o = [[_mm256_setzero_ps(); GROUP]; 2];
                    for j in 0..both {
                        let p = head_at::<H>(base, view, view.slots[j]);
                        let a = [weight(t0, j), weight(t0 + pair.len() - 1, j)];
                        for c in 0..GROUP {
                            let vc = chunk::<H>(p, c0 + c);
                            for (o, a) in o.iter_mut().zip(a).take(pair.len()) {
                                o[c] = _mm256_add_ps(o[c], _mm256_mul_ps(a, vc));
                            }
                        }
                    }
                    for (t, (r, o)) in pair.iter().zip(&mut o).enumerate() {
                        for j in both..r.visible {
                            let p = head_at::<H>(base, view, view.slots[j]);
                            let a = weight(t0 + t, j);
                            for (c, oc) in o.iter_mut().enumerate() {
                                *oc = _mm256_add_ps(*oc, _mm256_mul_ps(a, chunk::<H>(p, c0 + c)));
                            }
                        }
                        let dst = out.as_mut_ptr().add((t0 + t) * hd + 8 * c0);
                        for (c, oc) in o.iter().enumerate() {
                            _mm256_storeu_ps(dst.add(8 * c), *oc);
                        }
                    }
                }
            }
        }
    }

    /// The loops of `x86` on 512-bit vectors (AVX-512F): two pairs' eight-lane sums
    /// side by side in one vector for the scores, sixteen output values per vector
    /// for the weighted sums. Each lane does what it did on 256 bits, so the bits are
    /// the same.
    #[cfg(target_arch = "x86_64")]
    mod x86_512 {
        use std::arch::x86_64::*;

        use super::x86::{head_at, sum_lanes8};
        use super::{HeadView, Query};

        /// `lo` in lanes 0..8 and `hi` in lanes 8..16.
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        #[inline]
        unsafe fn join(lo: __m256, hi: __m256) -> __m512 {
            let lo = _mm512_castpd256_pd512(_mm256_castps_pd(lo));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(lo, _mm256_castps_pd(hi)))
        }

        /// Lanes 0..8 (`HI` false) or 8..16 of `v`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        #[inline]
        unsafe fn half<const HI: bool>(v: __m512) -> __m256 {
            let v = _mm512_castps_pd(v);
            _mm256_castpd_ps(if HI {
                _mm512_extractf64x4_pd::<1>(v)
            } else {
                _mm512_castpd512_pd256(v)
            })
        }

        /// Chunk `c` (8 values) of the rows at `a` and `b`, side by side as f32.
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        #[inline]
        unsafe fn chunk_pair<const H: bool>(a: *const u8, b: *const u8, c: usize) -> __m512 {
            if H {
                let lo = _mm_loadu_si128(a.add(16 * c) as *const __m128i);
                let hi = _mm_loadu_si128(b.add(16 * c) as *const __m128i);
                _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
            } else {
                join(
                    _mm256_loadu_ps((a as *const f32).add(8 * c)),
                    _mm256_loadu_ps((b as *const f32).add(8 * c)),
                )
            }
        }

        /// Values `16 * z..16 * z + 16` of the row at `p`, as f32.
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        #[inline]
        unsafe fn sixteen<const H: bool>(p: *const u8, z: usize) -> __m512 {
            if H {
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32 * z) as *const __m256i))
            } else {
                _mm512_loadu_ps((p as *const f32).add(16 * z))
            }
        }

        /// As `x86::scores`, sixteen (query, key) pairs at a time.
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        pub unsafe fn scores<const H: bool, const C: usize>(
            base: *const u8,
            view: &HeadView<'_>,
            queries: &[Query<'_>],
            scale: f32,
            scores: &mut [f32],
            span: usize,
        ) {
            let mut t = 0;
            while t < queries.len() {
                let tile = (base, view, t, scale, span);
                t += match queries.len() - t {
                    1 => score_tile::<H, C, 1, 16>(tile, queries, scores),
                    2 | 3 => score_tile::<H, C, 2, 8>(tile, queries, scores),
                    _ => score_tile::<H, C, 4, 4>(tile, queries, scores),
                };
            }
        }

        /// Queries `first..first + Q` against every key they see, `K` keys at a time
        /// (`Q * K == 16`, `K` even); returns `Q`. Pair (t, kk)'s lanes are half
        /// `kk % 2` of accumulator `t * K / 2 + kk / 2`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        unsafe fn score_tile<const H: bool, const C: usize, const Q: usize, const K: usize>(
            (base, view, first, scale, span): (*const u8, &HeadView<'_>, usize, f32, usize),
            queries: &[Query<'_>],
            scores: &mut [f32],
        ) -> usize {
            let qs = &queries[first..first + Q];
            let seen = qs.iter().map(|r| r.visible).max().unwrap_or(0);
            let scale = _mm256_set1_ps(scale);
            let mut j = 0;
            while j < seen {
                let n = K.min(seen - j);
                // Past the last key, the last key again (computed, not stored).
                let keys: [*const u8; K] = std::array::from_fn(|kk| {
                    head_at::<H>(base, view, view.slots[j + kk.min(n - 1)])
                });
                let mut acc = [_mm512_setzero_ps(); 8];
                for c in 0..C {
                    let qc: [__m512; Q] = std::array::from_fn(|t| {
                        let v = _mm256_loadu_ps(qs[t].q.as_ptr().add(8 * c));
                        join(v, v)
                    });
                    for kp in 0..K / 2 {
                        let kc = chunk_pair::<H>(keys[2 * kp], keys[2 * kp + 1], c);
                        for t in 0..Q {
                            let a = &mut acc[t * K / 2 + kp];
                            *a = _mm512_add_ps(*a, _mm512_mul_ps(qc[t], kc));
                        }
                    }
                }
                // Pair p = t * K + kk, as x86::scores numbers them, eight at a time.
                let pair = |p: usize| {
                    let v = acc[p / 2];
                    if p.is_multiple_of(2) {
                        half::<false>(v)
                    } else {
                        half::<true>(v)
                    }
                };
                let mut sums = [0f32; 16];
                for (e, sums) in sums.chunks_exact_mut(8).enumerate() {
                    let eight: [__m256; 8] = std::array::from_fn(|p| pair(8 * e + p));
                    _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_mul_ps(sum_lanes8(&eight), scale));
                }
                super::store_tile(scores, qs, (first, span, j, n), K, &sums);
                j += n;
            }
            Q
        }

        /// As `x86::values`: `G` queries at a time, each output (`8 * C` values) in
        /// registers across all positions (`G` of 4 for a head size of 64, 2 for 128).
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        pub unsafe fn values<const H: bool, const C: usize>(
            base: *const u8,
            view: &HeadView<'_>,
            queries: &[Query<'_>],
            weights: &[f32],
            out: &mut [f32],
        ) {
            let mut t = 0;
            while t < queries.len() {
                let tile = (base, view, t, weights);
                t += match (C, queries.len() - t) {
                    (8, 1) | (16, 1) => value_tile::<H, C, 1>(tile, queries, out),
                    (8, 2 | 3) | (16, _) => value_tile::<H, C, 2>(tile, queries, out),
                    _ => value_tile::<H, C, 4>(tile, queries, out),
                };
            }
        }

        /// Queries `first..first + G`; returns `G`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f")]
        unsafe fn value_tile<const H: bool, const C: usize, const G: usize>(
            (base, view, first, weights): (*const u8, &HeadView<'_>, usize, &[f32]),
            queries: &[Query<'_>],
            out: &mut [f32],
        ) -> usize {
            // At most 8 vectors per output row: a head size of at most 128.
            const MAX_Z: usize = 8;
            let (z, hd, span) = (C / 2, 8 * C, view.slots.len());
            let qs = &queries[first..first + G];
            // Every query sees the first `both` values; the rest are some queries'.
            let both = qs.iter().map(|r| r.visible).min().unwrap_or(0);
            let mut o = [[_mm512_setzero_ps(); MAX_Z]; G];
            for j in 0..both {
                let p = head_at::<H>(base, view, view.slots[j]);
                let v: [__m512; MAX_Z] = std::array::from_fn(|zz| {
                    if zz < z {
                        sixteen::<H>(p, zz)
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for (t, o) in o.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(weights[(first + t) * span + j]);
                    for (oz, vz) in o.iter_mut().zip(&v).take(z) {
                        *oz = _mm512_add_ps(*oz, _mm512_mul_ps(a, *vz));
                    }
                }
            }
            for (t, (r, o)) in qs.iter().zip(&mut o).enumerate() {
                for j in both..r.visible {
                    let p = head_at::<H>(base, view, view.slots[j]);
                    let a = _mm512_set1_ps(weights[(first + t) * span + j]);
                    for (zz, oz) in o.iter_mut().enumerate().take(z) {
                        *oz = _mm512_add_ps(*oz, _mm512_mul_ps(a, sixteen::<H>(p, zz)));
                    }
                }
                let dst = out.as_mut_ptr().add((first + t) * hd);
                for (zz, oz) in o.iter().enumerate().take(z) {
                    _mm512_storeu_ps(dst.add(16 * zz), *oz);
                }
            }
            G
        }
    }
}

/// A dot product in a fixed order: eight lanes (vectorised by the compiler), then
/// the lanes in order, then the tail.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let (x, y): (&[f32; 8], &[f32; 8]) = (
            x.try_into().unwrap_or(&[0.0; 8]),
            y.try_into().unwrap_or(&[0.0; 8]),
        );
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// `o += a * x`, element by element.
#[inline(always)]
fn axpy(a: f32, x: &[f32], o: &mut [f32]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain attention for one query head over explicit keys and values.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
        let scale = 1.0 / (q.len() as f32).sqrt();
        let s: Vec<f32> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (p, v) in e.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += p / z * x;
            }
        }
        out
    }

    fn pseudo(i: usize) -> f32 {
        ((i * 7919 % 1000) as f32 / 500.0) - 1.0
    }

    /// One sequence's shapes, for the tests.
    #[derive(Clone, Copy)]
    struct AttnShape {
        n: usize,
        past: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    }

    /// `paged_attention` for one sequence with `q: [n, num_heads * head_dim]`.
    fn one(q: &[f32], k: KvRows<'_>, v: KvRows<'_>, slots: &[u32], s: AttnShape) -> Vec<f32> {
        let seq = SeqAttn {
            slots,
            past: s.past,
            n: s.n,
            offset: 0,
        };
        let h = Heads {
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            window: None,
        };
        paged_attention(q, s.n, k, v, &[seq], h)
    }

    fn setup() -> (AttnShape, Vec<f32>, Vec<f32>, Vec<f32>, Vec<u32>) {
        let s = AttnShape {
            n: 3,
            past: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let width = s.num_kv_heads * s.head_dim;
        let total = s.past + s.n;
        // Slots scattered over a pool of 16 rows.
        let slots: Vec<u32> = (0..total as u32).map(|p| (p * 5 + 3) % 16).collect();
        let k: Vec<f32> = (0..16 * width).map(pseudo).collect();
        let v: Vec<f32> = (0..16 * width).map(|i| pseudo(i + 17)).collect();
        let q: Vec<f32> = (0..s.num_heads * s.n * s.head_dim)
            .map(|i| pseudo(i + 3))
            .collect();
        (s, q, k, v, slots)
    }

    /// Checks `out` (setup()'s queries) against plain attention of each query over
    /// the keys it sees: all earlier ones, or the last `window`.
    #[allow(clippy::type_complexity)]
    fn check_plain(
        (s, q, k, v, slots): &(AttnShape, Vec<f32>, Vec<f32>, Vec<f32>, Vec<u32>),
        out: &[f32],
        window: Option<usize>,
    ) {
        let (hd, width) = (s.head_dim, s.num_kv_heads * s.head_dim);
        for h in 0..s.num_heads {
            let g = h / (s.num_heads / s.num_kv_heads);
            for i in 0..s.n {
                let end = s.past + i + 1;
                let visible = &slots[window.map_or(0, |w| end - w)..end];
                let row = |t: &[f32], slot: u32| t[slot as usize * width + g * hd..][..hd].to_vec();
                let keys: Vec<_> = visible.iter().map(|&sl| row(k, sl)).collect();
                let values: Vec<_> = visible.iter().map(|&sl| row(v, sl)).collect();
                let qi = &q[(i * s.num_heads + h) * hd..][..hd];
                let want = reference(qi, &keys, &values);
                let got = &out[i * s.num_heads * hd + h * hd..][..hd];
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn matches_plain_causal_attention_with_gqa() {
        let data = setup();
        let (s, q, k, v, slots) = &data;
        let out = one(q, KvRows::F32(k), KvRows::F32(v), slots, *s);
        check_plain(&data, &out, None);
    }

    #[test]
    fn a_sliding_window_sees_only_its_last_keys_with_the_same_bits_alone() {
        let data = setup();
        let (s, q, k, v, slots) = &data;
        let (s, hd, window) = (*s, s.head_dim, 3);
        let h = Heads {
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            head_dim: hd,
            window: Some(window),
        };
        let seq = |n: usize, past: usize| SeqAttn {
            slots: &slots[..past + n],
            past,
            n,
            offset: 0,
        };
        let (kr, vr) = (KvRows::F32(k), KvRows::F32(v));
        let out = paged_attention(q, s.n, kr, vr, &[seq(s.n, s.past)], h);
        check_plain(&data, &out, Some(window));
        // The chunk's last query alone (its tile starts at its own window).
        let last = &q[(s.n - 1) * s.num_heads * hd..];
        let alone = paged_attention(last, 1, kr, vr, &[seq(1, s.past + s.n - 1)], h);
        assert_eq!(alone, out[(s.n - 1) * s.num_heads * hd..].to_vec());
    }

    #[test]
    fn a_token_gets_the_same_bits_alone_or_in_a_chunk() {
        let (s, q, k, v, slots) = setup();
        let chunk = one(&q, KvRows::F32(&k), KvRows::F32(&v), &slots, s);
        let hd = s.head_dim;
        // The last query alone, with everything before it as past.
        let last = &q[(s.n - 1) * s.num_heads * hd..];
        let alone_shape = AttnShape {
            n: 1,
            past: s.past + s.n - 1,
            ..s
        };
        let alone = one(last, KvRows::F32(&k), KvRows::F32(&v), &slots, alone_shape);
        assert_eq!(alone, chunk[(s.n - 1) * s.num_heads * hd..].to_vec());
    }

    #[test]
    fn softmax_sums_each_row_in_key_order_whatever_its_neighbours() {
        // Rows of a causal tile under a window: growing lengths, the first few keys
        // masked, more rows than one group of sums, scores spread past exp's
        // fast range.
        let span = 70;
        let queries: Vec<Query<'_>> = (0..11)
            .map(|t| Query {
                q: &[],
                first: t / 3,
                visible: span - 10 + t - t % 2,
            })
            .collect();
        let scores: Vec<f32> = (0..queries.len() * span)
            .map(|i| pseudo(i) * if i % 7 == 0 { 400.0 } else { 4.0 })
            .collect();
        let mut got = scores.clone();
        softmax(&mut got, span, &queries);
        for (t, r) in queries.iter().enumerate() {
            let row = &scores[t * span..t * span + r.visible];
            let max = row[r.first..]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let e: Vec<f32> = (row.iter().enumerate())
                .map(|(j, &x)| if j < r.first { 0.0 } else { exp(x - max) })
                .collect();
            let inv = 1.0 / e.iter().fold(0f32, |s, &x| s + x);
            let want: Vec<u32> = e.iter().map(|x| (x * inv).to_bits()).collect();
            let have: Vec<u32> = got[t * span..t * span + r.visible]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(have, want, "row {t}");
        }
    }

    /// The x86 loops this CPU runs (every one is tested where it runs).
    fn fast_loops() -> Vec<Loops> {
        use crate::kernels::KernelPath;
        let mut loops = Vec::new();
        #[cfg(target_arch = "x86_64")]
        for (l, path) in [
            (Loops::Avx2, KernelPath::Avx2),
            (Loops::Avx512, KernelPath::Avx512),
        ] {
            if path.supported() {
                loops.push(l);
            }
        }
        loops
    }

    #[test]
    fn fast_loops_give_the_portable_bits() {
        for hd in [64, 128] {
            let (nh, nkv, pool) = (4, 2, 64);
            let width = nkv * hd;
            let k: Vec<f32> = (0..pool * width).map(pseudo).collect();
            let v: Vec<f32> = (0..pool * width).map(|i| pseudo(i + 5)).collect();
            let (k16, v16): (Vec<f16>, Vec<f16>) = (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let h = Heads {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                window: None,
            };
            // A decode row and a chunk longer than a tile, on scattered slots.
            for (past, n) in [(30, 1), (3, 2 * ROW_TILE + 3)] {
                let slots: Vec<u32> = (0..(past + n) as u32).map(|p| (p * 7 + 1) % 64).collect();
                let q: Vec<f32> = (0..nh * n * hd).map(|i| pseudo(i + 11)).collect();
                let seq = SeqAttn {
                    slots: &slots,
                    past,
                    n,
                    offset: 0,
                };
                for (kr, vr) in [
                    (KvRows::F32(&k), KvRows::F32(&v)),
                    (KvRows::F16(&k16), KvRows::F16(&v16)),
                ] {
                    for h in [
                        h,
                        Heads {
                            window: Some(5),
                            ..h
                        },
                    ] {
                        let portable = attention_with(&q, n, kr, vr, &[seq], h, Loops::Portable);
                        for loops in fast_loops() {
                            let fast = attention_with(&q, n, kr, vr, &[seq], h, loops);
                            assert_eq!(
                                fast, portable,
                                "{loops:?}, hd {hd}, n {n}, window {:?}",
                                h.window
                            );
                        }
                    }
                }
            }
            // Decoding sequences of different lengths, enough of them that a
            // group's query heads share an item (tiles of several queries).
            let lens = [1usize, 9, 17, 30, 5, 12];
            let slots: Vec<Vec<u32>> = (lens.iter().enumerate())
                .map(|(s, &len)| {
                    (0..len as u32)
                        .map(|p| (p * 5 + 9 * s as u32) % 64)
                        .collect()
                })
                .collect();
            let seqs = decoding(&slots);
            let q: Vec<f32> = (0..nh * seqs.len() * hd).map(|i| pseudo(i + 4)).collect();
            let (kr, vr) = (KvRows::F16(&k16), KvRows::F16(&v16));
            let portable = attention_with(&q, seqs.len(), kr, vr, &seqs, h, Loops::Portable);
            for loops in fast_loops() {
                let fast = attention_with(&q, seqs.len(), kr, vr, &seqs, h, loops);
                assert_eq!(fast, portable, "{loops:?}, hd {hd}, decoding batch");
            }
        }
    }

    /// One decoding token per sequence, each at the end of its slots.
    fn decoding(slots: &[Vec<u32>]) -> Vec<SeqAttn<'_>> {
        (slots.iter().enumerate())
            .map(|(i, sl)| SeqAttn {
                slots: sl,
                past: sl.len() - 1,
                n: 1,
                offset: i,
            })
            .collect()
    }

    #[test]
    fn decoding_sequences_get_the_same_bits_alone_or_batched() {
        // Batched, a decoding sequence's query heads of one group share an item;
        // alone, each head is an item of its own.
        let (nh, nkv, hd, pool) = (6, 2, 64, 96);
        let width = nkv * hd;
        let k: Vec<f16> = (0..pool * width)
            .map(|i| f16::from_f32(pseudo(i)))
            .collect();
        let v: Vec<f16> = (0..pool * width)
            .map(|i| f16::from_f32(pseudo(i + 9)))
            .collect();
        let h = Heads {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            window: None,
        };
        let slots: Vec<Vec<u32>> = [20u32, 7, 33, 12]
            .iter()
            .enumerate()
            .map(|(s, &len)| (0..len).map(|p| (p * 3 + s as u32 * 24) % 96).collect())
            .collect();
        let seqs = decoding(&slots);
        let tokens = seqs.len();
        let q: Vec<f32> = (0..nh * tokens * hd).map(|i| pseudo(i + 2)).collect();
        let batched = paged_attention(&q, tokens, KvRows::F16(&k), KvRows::F16(&v), &seqs, h);
        for (i, s) in seqs.iter().enumerate() {
            let qi = &q[i * nh * hd..(i + 1) * nh * hd];
            let alone_seq = SeqAttn { offset: 0, ..*s };
            let alone = paged_attention(qi, 1, KvRows::F16(&k), KvRows::F16(&v), &[alone_seq], h);
            assert_eq!(alone, batched[i * nh * hd..(i + 1) * nh * hd].to_vec());
        }
    }

    #[test]
    fn f16_rows_are_read_as_f16() {
        let (s, q, k, v, slots) = setup();
        let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let k32: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
        let v32: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
        let a = one(&q, KvRows::F16(&k16), KvRows::F16(&v16), &slots, s);
        let b = one(&q, KvRows::F32(&k32), KvRows::F32(&v32), &slots, s);
        assert_eq!(a, b);
    }
}

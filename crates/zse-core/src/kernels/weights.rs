//! Quantized weights repacked at load for the kernels.
//!
//! Every block type is brought to one form: blocks of 32 values, each value a small
//! integer `q`, the block's weights `d * (q - offset)` (signed layouts) or `d * q + m`
//! (layouts with a minimum), the K-quants' 16-value sub-blocks as 8-bit factors of
//! the two halves. The kernels multiply the integers exactly and apply the scales per
//! block, so one micro-kernel serves every type; a layout says only how to unpack a
//! block's integers.
//!
//! Rows go in groups of sixteen, interleaved, so that one 64-byte vector holds four
//! consecutive values (a "quad") of each of sixteen rows: one instruction then
//! multiplies four broadcast activation values into all the rows' sums at once
//! (AVX2 takes the group as two halves of eight), and the scales of the rows are
//! one vector. That is llama.cpp's repacked form (its `_8x8` GEMM); here every block
//! type has it. Per group and block:
//! - the low planes, `b` bits of each value in `b` vectors of 64 bytes: quad `g` in
//!   vector `g % b`, byte `4 * row + t`, at bit `b * (g / b)` (Q8_0's whole bytes in
//!   eight vectors; four bits in four, quads 0..4 in the low nibbles; Q2_K and Q3_K's
//!   two bits in two);
//! - three-, five- and six-bit layouts add a plane of high bits: `h` vectors of 64
//!   bytes, byte `4 * row + t` holding the high bits of value `t` of each quad, `h`
//!   bits per quad (Q6_K's two bits: quads 0..4 in the first vector, 4..8 in the
//!   second);
//! - the rows' scales (and minimums, and the K-quants' 8-bit half-block factors:
//!   Q2_K's scale and minimum factors, Q3_K and Q6_K's scale factors).
//!
//! IQ4_NL and IQ4_XS store 4-bit indices into 16 fixed signed levels: the low plane
//! keeps the indices, and the kernels look the levels up (one byte shuffle) and
//! multiply them as Q8_0's signed bytes (VNNI: 128 up, as an offset); IQ4_XS's 6-bit
//! sub-block scales times its f16 scale are kept in f32, exactly, as Q4_K's.
//!
//! Float weights (F32, F16, BF16) keep GGML's rows as they are; the kernels multiply
//! them by unquantized activations (`generic::float_dots`).
//!
//! Scales stay f16 where GGML had them in f16 (the bytes streamed per token stay
//! close to GGML's). Q4_K and Q5_K's 6-bit scales and minimums times the
//! super-block's f16 factors are exact in f32 (not in f16), so they are kept in f32
//! and nothing is lost. Q2_K, Q3_K and Q6_K scale each 16 values with their own
//! small factor: the block keeps the super-block's f16 scale (and Q2_K's minimum), and
//! the two 8-bit factors of its halves multiply the halves' integer sums, as
//! llama.cpp's kernels do. Q2_K and Q3_K so take four bits per weight with their
//! factors and per-block scales (GGML's 2.6 and 3.4), and unpack as the other layouts.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::block_type::BlockType;

/// Values per block for every layout here.
pub const QK: usize = 32;

/// How a block's 32 weights are stored once repacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// 4-bit, `w = d * (q - 8)` (Q4_0).
    Q4Offset,
    /// 4-bit, `w = d * q + m` (Q4_1, and Q4_K per 32-value sub-block).
    Q4Min,
    /// 5-bit, `w = d * (q - 16)` (Q5_0).
    Q5Offset,
    /// 5-bit, `w = d * q + m` (Q5_1, and Q5_K per 32-value sub-block).
    Q5Min,
    /// 2-bit, `w = d * s * q + m * t` with 4-bit factors `s` and `t` per 16 values
    /// (Q2_K; `m` is minus its `dmin`).
    Q2Halves,
    /// 3-bit, `w = d * s * (q - 4)` with a 6-bit signed factor `s` per 16 values (Q3_K).
    Q3Halves,
    /// 6-bit, `w = d * s * (q - 32)` with an 8-bit factor `s` per 16 values (Q6_K).
    Q6Halves,
    /// 8-bit signed, `w = d * q` (Q8_0).
    Q8,
    /// 4-bit indices into `IQ4_LEVELS`, `w = d * IQ4_LEVELS[q]` (IQ4_NL, and IQ4_XS per
    /// 32-value sub-block).
    Q4Table,
    /// Floats, as GGML stores them.
    F32,
    F16,
    BF16,
}

impl Layout {
    /// The layout GGML's `dtype` is repacked into, if the kernels handle it.
    pub fn of(dtype: BlockType) -> Option<Layout> {
        let dtype = match dtype {
            BlockType::IQ4NL | BlockType::IQ4XS => return Some(Layout::Q4Table),
            BlockType::Ggml(t) => t,
        };
        Some(match dtype {
            GgmlDType::Q4_0 => Layout::Q4Offset,
            GgmlDType::Q4_1 | GgmlDType::Q4K => Layout::Q4Min,
            GgmlDType::Q5_0 => Layout::Q5Offset,
            GgmlDType::Q5_1 | GgmlDType::Q5K => Layout::Q5Min,
            GgmlDType::Q2K => Layout::Q2Halves,
            GgmlDType::Q3K => Layout::Q3Halves,
            GgmlDType::Q6K => Layout::Q6Halves,
            GgmlDType::Q8_0 => Layout::Q8,
            GgmlDType::F32 => Layout::F32,
            GgmlDType::F16 => Layout::F16,
            GgmlDType::BF16 => Layout::BF16,
            _ => return None,
        })
    }

    /// Bits per value in the low planes (also the number of their vectors).
    pub const fn low_bits(self) -> usize {
        match self {
            Layout::Q8 => 8,
            Layout::Q2Halves | Layout::Q3Halves => 2,
            _ => 4,
        }
    }

    /// High bits per value above the low planes (none for Q8, whose bytes are whole).
    pub const fn high_bits(self) -> usize {
        match self {
            Layout::Q3Halves | Layout::Q5Offset | Layout::Q5Min => 1,
            Layout::Q6Halves => 2,
            _ => 0,
        }
    }

    /// What the stored integers are offset by (`w = d * (q - offset)`).
    pub const fn offset(self) -> i8 {
        match self {
            Layout::Q3Halves => 4,
            Layout::Q4Offset => 8,
            Layout::Q5Offset => 16,
            Layout::Q6Halves => 32,
            _ => 0,
        }
    }

    /// Whether blocks have a minimum (unsigned values, `w = d * q + m`).
    pub const fn has_min(self) -> bool {
        matches!(self, Layout::Q4Min | Layout::Q5Min | Layout::Q2Halves)
    }

    /// Whether each half block has an 8-bit factor of its own.
    pub const fn has_halves(self) -> bool {
        matches!(self, Layout::Q2Halves | Layout::Q3Halves | Layout::Q6Halves)
    }

    /// Whether each half block's minimum is the block's `m` times an 8-bit factor of
    /// its own (Q2_K).
    pub const fn has_min_halves(self) -> bool {
        matches!(self, Layout::Q2Halves)
    }

    /// Bytes of half-block factors per group of rows and block: the rows' first
    /// factors, their second ones, then (Q2_K) the same for the minimums.
    pub const fn factor_bytes(self) -> usize {
        match (self.has_halves(), self.has_min_halves()) {
            (_, true) => 4 * GROUP,
            (true, false) => 2 * GROUP,
            _ => 0,
        }
    }

    /// Whether the weights are floats (no blocks, no scales).
    pub const fn is_float(self) -> bool {
        matches!(self, Layout::F32 | Layout::F16 | Layout::BF16)
    }

    /// Values a row's length must be a multiple of: a block, or for floats the
    /// sixteen lanes of the kernels' sums.
    const fn granule(self) -> usize {
        if self.is_float() {
            16
        } else {
            QK
        }
    }

    /// Bytes of float values per row of `cols` values.
    fn float_row_bytes(self, cols: usize) -> usize {
        match self {
            Layout::F32 => 4 * cols,
            _ => 2 * cols,
        }
    }

    /// Bytes of the low planes per group of rows and block.
    pub const fn low_bytes(self) -> usize {
        self.low_bits() * QUAD_VEC
    }

    /// Bytes of the high-bit plane per group of rows and block.
    pub const fn high_bytes(self) -> usize {
        self.high_bits() * QUAD_VEC
    }
}

/// IQ4_NL's 16 levels (GGML's `kvalues_iq4nl`), which IQ4_XS shares.
pub const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Per-block factors of a weight matrix (scales or minimums): per group of rows and
/// block, the group's rows' factors.
#[derive(Debug)]
pub enum Scales {
    Half(Vec<f16>),
    Single(Vec<f32>),
}

impl Scales {
    /// Values from f32 rows: f16 when `half` (the caller knows they are exact).
    fn new(values: Vec<f32>, half: bool) -> Self {
        if half {
            Scales::Half(values.into_iter().map(f16::from_f32).collect())
        } else {
            Scales::Single(values)
        }
    }

    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Scales::Half(v) => v[i].to_f32(),
            Scales::Single(v) => v[i],
        }
    }

    pub fn is_half(&self) -> bool {
        matches!(self, Scales::Half(_))
    }

    /// The `n` values starting at element `at`, as raw bytes (f16 or f32 as
    /// `is_half` says), bounds-checked here.
    #[inline]
    pub fn span(&self, at: usize, n: usize) -> *const u8 {
        match self {
            Scales::Half(v) => v[at..at + n].as_ptr() as *const u8,
            Scales::Single(v) => v[at..at + n].as_ptr() as *const u8,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Scales::Half(v) => 2 * v.len(),
            Scales::Single(v) => 4 * v.len(),
        }
    }

    fn append(&mut self, other: Scales) -> Result<()> {
        match (self, other) {
            (Scales::Half(a), Scales::Half(b)) => a.extend(b),
            (Scales::Single(a), Scales::Single(b)) => a.extend(b),
            _ => return Err(Error::Compute("cannot stack f16 and f32 scales".into())),
        }
        Ok(())
    }
}

/// A weight matrix `[rows, cols]`, repacked (see the module docs).
#[derive(Debug)]
pub struct QWeight {
    pub layout: Layout,
    pub rows: usize,
    pub cols: usize,
    /// Blocks per row (quantized layouts).
    pub nb: usize,
    /// Groups of `GROUP` rows (the last one padded with zero rows).
    pub groups: usize,
    /// The low planes (or the float rows).
    qs: Vec<u8>,
    /// The high-bit planes (five- and six-bit layouts; empty otherwise).
    qh: Vec<u8>,
    /// The scales.
    pub d: Scales,
    /// The minimums (layouts with a minimum; empty otherwise).
    pub m: Scales,
    /// The half blocks' 8-bit factors, `Layout::factor_bytes` per group and block
    /// (empty for layouts without them).
    halves: Vec<i8>,
}

/// Bytes of GGML data repacked between calls of `from_ggml_releasing`'s `done`.
const RELEASE_BYTES: usize = 256 << 10;

/// Rows per group: the lanes of a 512-bit vector of 32-bit sums (AVX-512 takes a
/// group at once, AVX2 its two halves of eight).
pub const GROUP: usize = 16;

/// Bytes of one quad of every row of a group: one 512-bit vector.
pub const QUAD_VEC: usize = 4 * GROUP;

/// Group `g`'s data for every block, as the kernels read it (see `QWeight::group`).
pub struct GroupView<'a> {
    pub low: &'a [u8],
    pub high: &'a [u8],
    pub d: *const u8,
    pub m: *const u8,
    pub halves: &'a [i8],
}

/// `buf` as `n` consecutive slices of `len` values (empty ones where `len` is 0).
fn split_even<T>(buf: &mut [T], n: usize, len: usize) -> Vec<&mut [T]> {
    let mut rest = buf;
    (0..n)
        .map(|_| {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            part
        })
        .collect()
}

/// Group `g`'s stretch of each of a `QWeight`'s buffers, during repacking.
struct GroupOut<'a> {
    g: usize,
    qs: &'a mut [u8],
    qh: &'a mut [u8],
    halves: &'a mut [i8],
    d: &'a mut [f32],
    m: &'a mut [f32],
}

impl GroupOut<'_> {
    /// Repacks the group's rows (those below `rows`, `src_row` bytes each) of GGML
    /// `data`.
    fn repack(
        &mut self,
        dtype: BlockType,
        layout: Layout,
        rows: usize,
        src_row: usize,
        data: &[u8],
    ) {
        // Monomorphised per plane shape, so that the per-block loop has its planes'
        // shifts as constants.
        let (d, l) = (dtype, layout);
        match (layout.low_bits(), layout.high_bits()) {
            (8, _) => self.repack_planes::<8, 0>(d, l, rows, src_row, data),
            (4, 0) => self.repack_planes::<4, 0>(d, l, rows, src_row, data),
            (4, 1) => self.repack_planes::<4, 1>(d, l, rows, src_row, data),
            (4, _) => self.repack_planes::<4, 2>(d, l, rows, src_row, data),
            (_, 0) => self.repack_planes::<2, 0>(d, l, rows, src_row, data),
            _ => self.repack_planes::<2, 1>(d, l, rows, src_row, data),
        }
    }

    /// `repack` for `LB` low bits and `H` high bits per value.
    fn repack_planes<const LB: usize, const H: usize>(
        &mut self,
        dtype: BlockType,
        layout: Layout,
        rows: usize,
        src_row: usize,
        data: &[u8],
    ) {
        let (per_src, blocks_per_src) = (dtype.type_size(), dtype.block_size() / QK);
        let fb = layout.factor_bytes();
        for rr in 0..GROUP.min(rows.saturating_sub(self.g * GROUP)) {
            let r = self.g * GROUP + rr;
            let src = &data[r * src_row..(r + 1) * src_row];
            for (s, blk) in src.chunks_exact(per_src).enumerate() {
                for j in 0..blocks_per_src {
                    let b = s * blocks_per_src + j;
                    let u = unpack(dtype, blk, j);
                    self.put_planes::<LB, H>(rr, b, &u.q);
                    self.d[b * GROUP + rr] = u.d;
                    if layout.has_min() {
                        self.m[b * GROUP + rr] = u.m;
                    }
                    if layout.has_halves() {
                        let at = b * fb + rr;
                        self.halves[at] = u.halves[0];
                        self.halves[at + GROUP] = u.halves[1];
                    }
                    if layout.has_min_halves() {
                        let at = b * fb + rr + 2 * GROUP;
                        self.halves[at] = u.min_halves[0];
                        self.halves[at + GROUP] = u.min_halves[1];
                    }
                }
            }
        }
    }

    /// Writes block `b` of the group's row `rr` from its unsigned integers, for
    /// `LB` low bits and `H` high bits per value: each byte of the row's
    /// four lanes in a plane whole at once (`place`'s arithmetic, folded: quad
    /// `LB * s + p` sits in low plane `p` at bit `LB * s`, quad `8 / H * p + s` in
    /// high plane `p` at bit `H * s`).
    #[inline(always)]
    fn put_planes<const LB: usize, const H: usize>(&mut self, rr: usize, b: usize, q: &[u8; QK]) {
        let lane = 4 * rr;
        let low = b * LB * QUAD_VEC + lane;
        for p in 0..LB {
            let bytes: [u8; 4] = std::array::from_fn(|k| {
                (0..8 / LB).fold(0u8, |byte, s| {
                    byte | (q[4 * (LB * s + p) + k] & low_mask(LB)) << (LB * s)
                })
            });
            self.qs[low + p * QUAD_VEC..][..4].copy_from_slice(&bytes);
        }
        if let Some(per) = 8usize.checked_div(H) {
            let high = b * H * QUAD_VEC + lane;
            for p in 0..H {
                let bytes: [u8; 4] = std::array::from_fn(|k| {
                    (0..per).fold(0u8, |byte, s| {
                        byte | ((q[4 * (per * p + s) + k] >> LB) & low_mask(H)) << (H * s)
                    })
                });
                self.qh[high + p * QUAD_VEC..][..4].copy_from_slice(&bytes);
            }
        }
    }
}

/// The low `bits` bits of a byte (all eight for 8).
#[inline(always)]
const fn low_mask(bits: usize) -> u8 {
    if bits >= 8 {
        0xFF
    } else {
        (1u8 << bits) - 1
    }
}

/// Where value `j` of row `rr` (of its group) in block cell `cell` lies, for a
/// layout of `lb` low and `h` high bits: its byte in the low planes and the shift of
/// its low bits there, and its byte in the high planes and the shift of its high
/// bits there.
#[inline(always)]
fn place(lb: usize, h: usize, cell: usize, rr: usize, j: usize) -> (usize, usize, usize, usize) {
    let (quad, lane) = (j / 4, 4 * rr + j % 4);
    let (low, shift) = ((quad % lb) * QUAD_VEC + lane, lb * (quad / lb));
    let per = 8 / h.max(1);
    let high = cell * h * QUAD_VEC + (quad / per) * QUAD_VEC + lane;
    (cell * lb * QUAD_VEC + low, shift, high, h * (quad % per))
}

/// One GGML block, unpacked: its values as unsigned integers (before the layout's
/// offset), its scale and minimum, and its halves' factors of the scale and of the
/// minimum.
struct Unpacked {
    q: [u8; QK],
    d: f32,
    m: f32,
    halves: [i8; 2],
    min_halves: [i8; 2],
}

impl QWeight {
    /// The weights of `t` repacked, if the kernels handle its type (else None:
    /// candle's own matmul runs it).
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let (rows, cols) = t.shape().dims2()?;
        if !Self::handles(t.dtype(), cols) {
            return Ok(None);
        }
        let data = t.data()?;
        Self::from_ggml(t.dtype(), rows, cols, &data).map(Some)
    }

    /// Whether the kernels handle `dtype` with rows of `cols` values.
    pub fn handles(dtype: impl Into<BlockType>, cols: usize) -> bool {
        let dtype = dtype.into();
        Layout::of(dtype).is_some_and(|l| {
            cols.is_multiple_of(dtype.block_size()) && cols.is_multiple_of(l.granule())
        })
    }

    /// Whether `other` can be stacked under this matrix (same columns, layout and
    /// scale precision; and for quantized layouts, this matrix's rows whole groups).
    pub fn stacks_with(&self, other: &QWeight) -> bool {
        self.layout == other.layout
            && self.cols == other.cols
            && self.d.is_half() == other.d.is_half()
            && self.m.is_half() == other.m.is_half()
            && (self.layout.is_float() || self.rows.is_multiple_of(GROUP))
    }

    /// Several matrices with the same columns and block type, stacked by rows (one
    /// matmul for the q/k/v or gate/up projections). Each output is still one weight
    /// row times one activation row, so the results are those of separate matmuls.
    pub fn stack(parts: Vec<QWeight>) -> Result<Self> {
        let mut it = parts.into_iter();
        let mut out = it
            .next()
            .ok_or_else(|| Error::Compute("nothing to stack".into()))?;
        for w in it {
            if !out.stacks_with(&w) {
                return Err(Error::Compute(format!(
                    "cannot stack {:?} {}x{} onto {:?} {}x{}",
                    w.layout, w.rows, w.cols, out.layout, out.rows, out.cols
                )));
            }
            out.rows += w.rows;
            out.groups += w.groups;
            out.qs.extend_from_slice(&w.qs);
            out.qh.extend_from_slice(&w.qh);
            out.halves.extend_from_slice(&w.halves);
            out.d.append(w.d)?;
            out.m.append(w.m)?;
        }
        Ok(out)
    }

    /// Repacks GGML blocks of `dtype` holding `rows x cols` values.
    pub fn from_ggml(
        dtype: impl Into<BlockType>,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<Self> {
        Self::from_ggml_releasing(dtype, rows, cols, data, &mut |_| {})
    }

    /// As `from_ggml`, calling `done` with each range of `data` once it is read, in
    /// order, a few hundred KiB at a time (a loader drops those pages of its file map).
    pub fn from_ggml_releasing(
        dtype: impl Into<BlockType>,
        rows: usize,
        cols: usize,
        data: &[u8],
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> Result<Self> {
        let dtype = dtype.into();
        let layout = match Layout::of(dtype) {
            Some(layout) if Self::handles(dtype, cols) => layout,
            _ => {
                return Err(Error::Unsupported(format!(
                    "CPU kernels do not handle {dtype} rows of {cols} values"
                )))
            }
        };
        let expected = rows * cols / dtype.block_size() * dtype.type_size();
        if data.len() != expected {
            return Err(Error::Compute(format!(
                "{dtype} weights of {rows}x{cols} need {expected} bytes, got {}",
                data.len()
            )));
        }
        let nb = cols / QK;
        let groups = rows.div_ceil(GROUP);
        if layout.is_float() {
            let mut qs = Vec::with_capacity(data.len());
            for (i, chunk) in data.chunks(RELEASE_BYTES).enumerate() {
                qs.extend_from_slice(chunk);
                done(i * RELEASE_BYTES..i * RELEASE_BYTES + chunk.len());
            }
            return Ok(QWeight {
                layout,
                rows,
                cols,
                nb,
                groups,
                qs,
                qh: Vec::new(),
                d: Scales::Single(Vec::new()),
                m: Scales::Single(Vec::new()),
                halves: Vec::new(),
            });
        }
        let cells = groups * nb;
        let mut w = QWeight {
            layout,
            rows,
            cols,
            nb,
            groups,
            qs: vec![0u8; cells * layout.low_bytes()],
            qh: vec![0u8; cells * layout.high_bytes()],
            d: Scales::Single(Vec::new()),
            m: Scales::Single(Vec::new()),
            halves: vec![0i8; cells * layout.factor_bytes()],
        };
        let mut d = vec![0f32; cells * GROUP];
        let mut m = vec![0f32; if layout.has_min() { cells * GROUP } else { 0 }];
        // Each group of rows owns a contiguous stretch of every buffer, so groups
        // repack in parallel; a batch of them at a time, its source then released.
        let mut outs: Vec<GroupOut<'_>> = {
            let per = |bytes: usize| nb * bytes;
            let mut qs = split_even(&mut w.qs, groups, per(layout.low_bytes()));
            let mut qh = split_even(&mut w.qh, groups, per(layout.high_bytes()));
            let mut halves = split_even(&mut w.halves, groups, per(layout.factor_bytes()));
            let mut d = split_even(&mut d, groups, per(GROUP));
            let mut m = split_even(
                &mut m,
                groups,
                if layout.has_min() { per(GROUP) } else { 0 },
            );
            (0..groups)
                .map(|g| GroupOut {
                    g,
                    qs: std::mem::take(&mut qs[g]),
                    qh: std::mem::take(&mut qh[g]),
                    halves: std::mem::take(&mut halves[g]),
                    d: std::mem::take(&mut d[g]),
                    m: std::mem::take(&mut m[g]),
                })
                .collect()
        };
        let src_row = data.len() / rows.max(1);
        let groups_per_release = (RELEASE_BYTES / (GROUP * src_row).max(1)).max(1);
        for batch in outs.chunks_mut(groups_per_release) {
            batch
                .par_iter_mut()
                .for_each(|out| out.repack(dtype, layout, rows, src_row, data));
            let first = batch[0].g * GROUP;
            let end = ((batch[batch.len() - 1].g + 1) * GROUP).min(rows);
            done(first * src_row..end * src_row);
        }
        drop(outs);
        // Scales exact in f16 stay f16: every type's but the sub-block products of
        // Q4_K, Q5_K and IQ4_XS.
        let half = !matches!(
            dtype,
            BlockType::Ggml(GgmlDType::Q4K | GgmlDType::Q5K) | BlockType::IQ4XS
        );
        w.d = Scales::new(d, half);
        w.m = Scales::new(m, half);
        Ok(w)
    }

    /// Group and block of row `r`'s block `b`, as one index.
    #[inline]
    fn cell(&self, r: usize, b: usize) -> usize {
        (r / GROUP) * self.nb + b
    }

    /// Where row `r`'s factor of block `b` lies in `d` and `m`.
    #[inline]
    fn factor_at(&self, r: usize, b: usize) -> usize {
        self.cell(r, b) * GROUP + r % GROUP
    }

    /// Where row `r`'s first half factor of block `b` lies (the second is
    /// `GROUP` on, the minimums' `2 * GROUP`).
    #[inline]
    fn halves_at(&self, r: usize, b: usize) -> usize {
        self.cell(r, b) * self.layout.factor_bytes() + r % GROUP
    }

    /// Where value `j` of row `r`'s block `b` lies (see `place`).
    #[inline]
    fn place(&self, r: usize, b: usize, j: usize) -> (usize, usize, usize, usize) {
        let (lb, h) = (self.layout.low_bits(), self.layout.high_bits());
        place(lb, h, self.cell(r, b), r % GROUP, j)
    }

    /// The 32 values of block `b` of row `r` as integers (`w = d * q (+ m)`), in
    /// element order, already offset.
    #[inline]
    pub fn block(&self, r: usize, b: usize) -> [i8; QK] {
        let (lb, h) = (self.layout.low_bits(), self.layout.high_bits());
        std::array::from_fn(|j| {
            let (low, shift, high, hshift) = self.place(r, b, j);
            if self.layout == Layout::Q8 {
                return self.qs[low] as i8;
            }
            let mut v = (self.qs[low] >> shift) & ((1 << lb) - 1);
            if h > 0 {
                v |= ((self.qh[high] >> hshift) & ((1 << h) - 1)) << lb;
            }
            if self.layout == Layout::Q4Table {
                return IQ4_LEVELS[v as usize];
            }
            v as i8 - self.layout.offset()
        })
    }

    /// The scale of block `b` of row `r`.
    #[inline]
    pub fn scale(&self, r: usize, b: usize) -> f32 {
        self.d.get(self.factor_at(r, b))
    }

    /// The minimum of block `b` of row `r` (layouts with one).
    #[inline]
    pub fn min(&self, r: usize, b: usize) -> f32 {
        self.m.get(self.factor_at(r, b))
    }

    /// The 8-bit factors of block `b`'s two halves (ones where the layout has none).
    #[inline]
    pub fn halves(&self, r: usize, b: usize) -> [i8; 2] {
        if self.layout.has_halves() {
            let at = self.halves_at(r, b);
            [self.halves[at], self.halves[at + GROUP]]
        } else {
            [1, 1]
        }
    }

    /// The 8-bit factors of block `b`'s halves' minimums (layouts with them).
    #[inline]
    pub fn min_halves(&self, r: usize, b: usize) -> Option<[i8; 2]> {
        self.layout.has_min_halves().then(|| {
            let at = self.halves_at(r, b) + 2 * GROUP;
            [self.halves[at], self.halves[at + GROUP]]
        })
    }

    /// Row `r` as floats (the embedding lookup of a tied output head).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.layout.is_float() {
            let (row, out) = (self.float_row(r), &mut out[..self.cols]);
            match self.layout {
                Layout::F32 => {
                    for (y, v) in out.iter_mut().zip(row.chunks_exact(4)) {
                        *y = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                    }
                }
                Layout::F16 => {
                    for (y, v) in out.iter_mut().zip(row.chunks_exact(2)) {
                        *y = f16::from_le_bytes([v[0], v[1]]).to_f32();
                    }
                }
                _ => {
                    for (y, v) in out.iter_mut().zip(row.chunks_exact(2)) {
                        *y = half::bf16::from_le_bytes([v[0], v[1]]).to_f32();
                    }
                }
            }
            return;
        }
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate().take(self.nb) {
            let q = self.block(r, b);
            let d = self.scale(r, b);
            let halves = self.halves(r, b);
            let min_halves = self.min_halves(r, b);
            for (j, (y, &v)) in chunk.iter_mut().zip(&q).enumerate() {
                // As GGML's dequantization: the scale (times the half's factor, an
                // exact product), times the value, then the minimum (Q2_K's: its
                // factor times the negated `dmin`, an exact product too).
                *y = if let Some(t) = min_halves {
                    d * halves[j / 16] as f32 * v as f32 + self.min(r, b) * t[j / 16] as f32
                } else if self.layout.has_min() {
                    v as f32 * d + self.min(r, b)
                } else if self.layout.has_halves() {
                    d * halves[j / 16] as f32 * v as f32
                } else {
                    v as f32 * d
                };
            }
        }
    }

    /// Bytes of a float row.
    #[inline]
    pub fn float_row_bytes(&self) -> usize {
        self.layout.float_row_bytes(self.cols)
    }

    /// Row `r` of float weights, as GGML stores it.
    #[inline]
    pub fn float_row(&self, r: usize) -> &[u8] {
        let bytes = self.float_row_bytes();
        &self.qs[r * bytes..(r + 1) * bytes]
    }

    /// Group `g` of a quantized matrix, every block, bounds-checked here.
    #[inline]
    pub fn group(&self, g: usize) -> GroupView<'_> {
        let (nb, lay) = (self.nb, self.layout);
        let cells = g * nb..(g + 1) * nb;
        GroupView {
            low: &self.qs[cells.start * lay.low_bytes()..cells.end * lay.low_bytes()],
            high: &self.qh[cells.start * lay.high_bytes()..cells.end * lay.high_bytes()],
            d: self.d.span(cells.start * GROUP, nb * GROUP),
            m: match lay.has_min() {
                true => self.m.span(cells.start * GROUP, nb * GROUP),
                false => std::ptr::null(),
            },
            halves: &self.halves[cells.start * lay.factor_bytes()..cells.end * lay.factor_bytes()],
        }
    }

    /// Bytes held (for the memory figures).
    pub fn size_bytes(&self) -> usize {
        self.qs.len() + self.qh.len() + self.halves.len() + self.d.bytes() + self.m.bytes()
    }
}

/// A tensor of `dtype` with `shape` (candle's order) as f32 values, exactly as GGML
/// dequantizes it: for the types candle cannot hold (IQ4) where something other than
/// these kernels needs their values.
pub fn dequantize(dtype: BlockType, shape: &[usize], data: &[u8]) -> Result<Vec<f32>> {
    let cols = shape.last().copied().unwrap_or(1);
    let rows = shape.iter().rev().skip(1).product::<usize>();
    let w = QWeight::from_ggml(dtype, rows, cols, data)?;
    let mut out = vec![0f32; rows * cols];
    for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        w.dequantize_row(r, row);
    }
    Ok(out)
}

/// Sub-block `j` (of 32 values) of GGML block `blk` of type `dtype`.
fn unpack(dtype: BlockType, blk: &[u8], j: usize) -> Unpacked {
    let mut u = Unpacked {
        q: [0; QK],
        d: f16_at(blk, 0),
        m: 0.0,
        halves: [1, 1],
        min_halves: [0, 0],
    };
    // Values 0..16 of the 32-value blocks are the low nibbles of 16 bytes at `qs`,
    // 16..32 the high ones.
    let nibbles = |q: &mut [u8; QK], qs: &[u8]| {
        for (l, &b) in qs[..16].iter().enumerate() {
            q[l] = b & 0x0F;
            q[l + 16] = b >> 4;
        }
    };
    let dtype = match dtype {
        BlockType::IQ4NL => {
            nibbles(&mut u.q, &blk[2..]);
            return u;
        }
        BlockType::IQ4XS => {
            // d, the 6-bit sub-block scales' high bit pairs (a u16, pair j for
            // sub-block j) and low nibbles (4 bytes, two sub-blocks each), then 16
            // bytes of nibbles per sub-block. The scale is `d * (s - 32)`, exact in
            // f32.
            let high = u16::from_le_bytes([blk[2], blk[3]]);
            let s =
                ((blk[4 + j / 2] >> (4 * (j % 2))) & 0x0F) | ((((high >> (2 * j)) & 3) as u8) << 4);
            u.d *= s as f32 - 32.0;
            nibbles(&mut u.q, &blk[8 + 16 * j..]);
            return u;
        }
        BlockType::Ggml(t) => t,
    };
    match dtype {
        GgmlDType::Q4_0 => nibbles(&mut u.q, &blk[2..]),
        GgmlDType::Q4_1 => {
            u.m = f16_at(blk, 2);
            nibbles(&mut u.q, &blk[4..]);
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let at = if dtype == GgmlDType::Q5_1 {
                u.m = f16_at(blk, 2);
                4
            } else {
                2
            };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            nibbles(&mut u.q, &blk[at + 4..]);
            for (l, v) in u.q.iter_mut().enumerate() {
                *v |= (((qh >> l) & 1) as u8) << 4;
            }
        }
        GgmlDType::Q8_0 => {
            u.q.copy_from_slice(&blk[2..2 + QK]);
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            // d, dmin, 12 bytes of 6-bit scales and minimums, (Q5_K: 32 bytes of high
            // bits, bit j of byte l for sub-block j), then 128 bytes holding the
            // sub-blocks' low nibbles in pairs.
            let (sd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let (sc, mn) = k_scale_min(j, &blk[4..16]);
            u.d = sd * sc as f32;
            u.m = -(dmin * mn as f32);
            let (qh, qs) = if dtype == GgmlDType::Q5K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            let shift = 4 * (j % 2);
            for (l, v) in u.q.iter_mut().enumerate() {
                *v = (qs[(j / 2) * QK + l] >> shift) & 0x0F;
                if let Some(qh) = qh {
                    *v |= ((qh[l] >> j) & 1) << 4;
                }
            }
        }
        GgmlDType::Q2K => {
            // 16 bytes of 4-bit scale (low) and minimum (high) factors, one per 16
            // values, 64 bytes of 2-bit values, then d and dmin. In each half of 128
            // values, sub-block k (0..4) is bit pair k of its 32 bytes.
            let qs = &blk[16 + 32 * (j / 4)..][..32];
            let shift = 2 * (j % 4);
            for (l, v) in u.q.iter_mut().enumerate() {
                *v = (qs[l] >> shift) & 3;
            }
            let sc = [blk[2 * j], blk[2 * j + 1]];
            u.halves = sc.map(|s| (s & 0x0F) as i8);
            u.min_halves = sc.map(|s| (s >> 4) as i8);
            u.d = f16_at(blk, 80);
            u.m = -f16_at(blk, 82);
        }
        GgmlDType::Q3K => {
            // 32 bytes of high bits (bit j of byte l for sub-block j), 64 bytes of
            // low bit pairs laid out as Q2_K's, 12 bytes of 6-bit factors, then d.
            // GGML's values are `low - 4` where the high bit is clear, else `low`:
            // `(low | high << 2) - 4`.
            let (hm, qs) = (&blk[..32], &blk[32 + 32 * (j / 4)..][..32]);
            let shift = 2 * (j % 4);
            for (l, v) in u.q.iter_mut().enumerate() {
                *v = ((qs[l] >> shift) & 3) | (((hm[l] >> j) & 1) << 2);
            }
            u.halves = [
                q3k_factor(2 * j, &blk[96..108]),
                q3k_factor(2 * j + 1, &blk[96..108]),
            ];
            u.d = f16_at(blk, 108);
        }
        _ => {
            // Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 8-bit factors,
            // then d. In each half of 128 values, sub-block k (0..4) is the low
            // nibbles of bytes 32 * (k % 2).. of its 64 (k < 2) or their high ones,
            // with bit pair k of its 32 high bytes.
            let (half, k) = (j / 4, j % 4);
            let ql = &blk[64 * half + 32 * (k % 2)..][..32];
            let qh = &blk[128 + 32 * half..][..32];
            let shift = 4 * (k / 2);
            for (l, v) in u.q.iter_mut().enumerate() {
                *v = ((ql[l] >> shift) & 0x0F) | (((qh[l] >> (2 * k)) & 3) << 4);
            }
            u.halves = [blk[192 + 2 * j] as i8, blk[192 + 2 * j + 1] as i8];
            u.d = f16_at(blk, 208);
        }
    }
    u
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Factor `s` (0..16) of a Q3_K block from its 12 packed bytes: four low bits in
/// the nibbles of bytes 0..8, two high bits in bytes 8..12, offset by 32.
fn q3k_factor(s: usize, q: &[u8]) -> i8 {
    let low = if s < 8 { q[s] & 0x0F } else { q[s - 8] >> 4 };
    let high = (q[8 + s % 4] >> (2 * (s / 4))) & 3;
    (low | (high << 4)) as i8 - 32
}

/// Scale and minimum of Q4_K/Q5_K sub-block `j` from the 12 packed bytes.
fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> QTensor {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    #[test]
    fn repacked_rows_dequantize_exactly_as_candle() {
        for (dtype, cols) in [
            (GgmlDType::Q4_0, 96),
            (GgmlDType::Q4_1, 96),
            (GgmlDType::Q5_0, 96),
            (GgmlDType::Q5_1, 96),
            (GgmlDType::Q8_0, 64),
            (GgmlDType::Q4K, 512),
            (GgmlDType::Q5K, 512),
            (GgmlDType::Q2K, 512),
            (GgmlDType::Q3K, 512),
            (GgmlDType::Q6K, 768),
            (GgmlDType::F32, 48),
            (GgmlDType::F16, 48),
            (GgmlDType::BF16, 48),
        ] {
            let q = quantized(dtype, 5, cols);
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let w = QWeight::from_qtensor(&q).unwrap().unwrap();
            for (r, row) in want.iter().enumerate() {
                let mut got = vec![0f32; cols];
                w.dequantize_row(r, &mut got);
                assert_eq!(&got, row, "{dtype:?} row {r}");
            }
        }
    }

    /// IQ4 blocks packed here from GGML's layout (`block_iq4_nl`, `block_iq4_xs`):
    /// value `e` of sub-block `j` has index `(3 * e + j) % 16`, IQ4_XS's sub-block `j`
    /// the 6-bit scale `5 + 7 * j` (high bits set from sub-block 4 on).
    #[test]
    fn iq4_blocks_dequantize_as_ggml_defines_them() {
        let index = |j: usize, e: usize| (3 * e + j) % 16;
        let nibbles = |j: usize| -> Vec<u8> {
            (0..16)
                .map(|l| (index(j, l) | (index(j, l + 16) << 4)) as u8)
                .collect()
        };
        let d = f16::from_f32(0.375);
        // IQ4_NL: two rows of two blocks, block b as sub-block j = b + 2 * row.
        let mut nl = Vec::new();
        for j in 0..4 {
            nl.extend_from_slice(&d.to_le_bytes());
            nl.extend(nibbles(j));
        }
        let got = dequantize(BlockType::IQ4NL, &[2, 64], &nl).unwrap();
        for (i, &v) in got.iter().enumerate() {
            let (j, e) = (i / 32, i % 32);
            assert_eq!(
                v,
                0.375 * IQ4_LEVELS[index(j, e)] as f32,
                "IQ4_NL value {i}"
            );
        }
        // IQ4_XS: one super-block of eight sub-blocks.
        let scale = |j: usize| 5 + 7 * j;
        let mut xs = d.to_le_bytes().to_vec();
        let high: u16 = (0..8).map(|j| ((scale(j) >> 4) as u16) << (2 * j)).sum();
        xs.extend(high.to_le_bytes());
        xs.extend((0..4).map(|p| ((scale(2 * p) & 15) | ((scale(2 * p + 1) & 15) << 4)) as u8));
        for j in 0..8 {
            xs.extend(nibbles(j));
        }
        let got = dequantize(BlockType::IQ4XS, &[1, 256], &xs).unwrap();
        for (i, &v) in got.iter().enumerate() {
            let (j, e) = (i / 32, i % 32);
            let dl = 0.375 * (scale(j) as f32 - 32.0);
            assert_eq!(v, dl * IQ4_LEVELS[index(j, e)] as f32, "IQ4_XS value {i}");
        }
        // IQ4_XS rows need whole super-blocks; both need the bytes their shape does.
        assert!(dequantize(BlockType::IQ4XS, &[1, 32], &xs[..18]).is_err());
        assert!(dequantize(BlockType::IQ4NL, &[2, 64], &nl[..71]).is_err());
    }

    #[test]
    fn releasing_reports_every_byte_once_in_order() {
        // Rows of 1536 Q8_0 values (1632 bytes): releases every 160 rows, and a
        // last part; float rows by byte chunks.
        for (dtype, rows, cols) in [
            (GgmlDType::Q8_0, 700, 1536),
            (GgmlDType::Q4K, 3, 256),
            (GgmlDType::F16, 300, 576),
        ] {
            let q = quantized(dtype, rows, cols);
            let data = q.data().unwrap();
            let mut seen = Vec::new();
            let w = QWeight::from_ggml_releasing(dtype, rows, cols, &data, &mut |r| seen.push(r))
                .unwrap();
            assert_eq!(seen.first().map(|r| r.start), Some(0), "{dtype:?}");
            assert_eq!(seen.last().map(|r| r.end), Some(data.len()), "{dtype:?}");
            assert!(seen.windows(2).all(|p| p[0].end == p[1].start), "{dtype:?}");
            assert!(seen.len() > 1 || data.len() <= RELEASE_BYTES, "{dtype:?}");
            let same = QWeight::from_ggml(dtype, rows, cols, &data).unwrap();
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            w.dequantize_row(rows - 1, &mut a);
            same.dequantize_row(rows - 1, &mut b);
            assert_eq!(a, b, "{dtype:?}");
            assert!(w.qs == same.qs && w.qh == same.qh, "{dtype:?}");
        }
    }

    #[test]
    fn stacking_keeps_every_row() {
        let a = QWeight::from_qtensor(&quantized(GgmlDType::Q4_1, 16, 64))
            .unwrap()
            .unwrap();
        let b = QWeight::from_qtensor(&quantized(GgmlDType::Q4_1, 3, 64))
            .unwrap()
            .unwrap();
        let (a5, b1) = (a.block(5, 1), b.block(1, 1));
        let s = QWeight::stack(vec![a, b]).unwrap();
        assert_eq!((s.rows, s.block(5, 1), s.block(17, 1)), (19, a5, b1));
        let c = QWeight::from_qtensor(&quantized(GgmlDType::Q8_0, 2, 64))
            .unwrap()
            .unwrap();
        assert!(QWeight::stack(vec![s, c]).is_err());
        // Quantized rows stack in whole groups only.
        let (d, e) = (
            quantized(GgmlDType::Q4_1, 3, 64),
            quantized(GgmlDType::Q4_1, 16, 64),
        );
        let (d, e) = (
            QWeight::from_qtensor(&d).unwrap().unwrap(),
            QWeight::from_qtensor(&e).unwrap().unwrap(),
        );
        assert!(!d.stacks_with(&e) && e.stacks_with(&d));
    }

    #[test]
    fn wrong_sizes_and_types_are_refused() {
        assert!(QWeight::from_ggml(GgmlDType::Q4_1, 2, 64, &[0; 79]).is_err());
        assert!(QWeight::from_ggml(GgmlDType::Q2K, 1, 256, &[0; 83]).is_err());
        assert!(QWeight::from_ggml(GgmlDType::Q8_1, 1, 32, &[0; 36]).is_err());
        assert!(QWeight::from_ggml(GgmlDType::Q6K, 1, 256, &[0; 209]).is_err());
        assert!(QWeight::from_ggml(GgmlDType::F16, 2, 24, &[0; 96]).is_err());
        for dtype in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            assert!(!QWeight::handles(dtype, 96) && QWeight::handles(dtype, 768));
        }
    }
}

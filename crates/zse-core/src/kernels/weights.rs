//! Quantized weights repacked at load for the kernels.
//!
//! Every block type is brought to one form: blocks of 32 values, each value a small
//! integer `q`, the block's weights `d * q` (signed layouts) or `d * q + m` (layouts
//! with a minimum). The kernels multiply the integers exactly and apply the scales
//! per block, so one micro-kernel serves every type; a layout says only how to
//! unpack a block's 32 integers.
//!
//! - The low four bits of two consecutive blocks share one 32-byte vector (block `2p`
//!   in the low nibbles, block `2p + 1` in the high ones), so that one load and a mask
//!   or a shift give a block's values in element order. Q4_K and Q5_K store their
//!   sub-blocks this way already; the other types are interleaved into it here.
//! - Five- and six-bit types add a plane of high bits: for each group of `8 / h`
//!   blocks (`h` high bits per value) 32 bytes, byte `j` holding the high bits of
//!   value `j` of each block of the group, `h` bits per block. That is Q5_K's and
//!   Q6_K's own arrangement; Q5_0 and Q5_1 blocks are gathered into it.
//! - Q8_0 keeps its bytes as they are, and so do float weights (F32, F16, BF16),
//!   which the kernels multiply by unquantized activations (`float_dot`).
//!
//! Scales and minimums sit in arrays of their own, each row padded to a multiple of
//! eight blocks, so that a kernel converts eight at once. They stay f16 where GGML
//! had them in f16 (the bytes streamed per token stay close to GGML's). Q4_K and
//! Q5_K's 6-bit scales and minimums times the super-block's f16 factors are exact in
//! f32 (not in f16), so they are kept in f32 and nothing is lost. Q6_K scales each
//! 16 values with its own 8-bit factor: the block keeps the super-block's f16 scale,
//! and the two 8-bit factors of its halves multiply the halves' integer sums, as
//! llama.cpp's kernels do.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use crate::error::{Error, Result};

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
    /// 6-bit, `w = d * s * (q - 32)` with an 8-bit factor `s` per 16 values (Q6_K).
    Q6Halves,
    /// 8-bit signed, `w = d * q` (Q8_0).
    Q8,
    /// Floats, as GGML stores them.
    F32,
    F16,
    BF16,
}

impl Layout {
    /// The layout GGML's `dtype` is repacked into, if the kernels handle it.
    pub fn of(dtype: GgmlDType) -> Option<Layout> {
        Some(match dtype {
            GgmlDType::Q4_0 => Layout::Q4Offset,
            GgmlDType::Q4_1 | GgmlDType::Q4K => Layout::Q4Min,
            GgmlDType::Q5_0 => Layout::Q5Offset,
            GgmlDType::Q5_1 | GgmlDType::Q5K => Layout::Q5Min,
            GgmlDType::Q6K => Layout::Q6Halves,
            GgmlDType::Q8_0 => Layout::Q8,
            GgmlDType::F32 => Layout::F32,
            GgmlDType::F16 => Layout::F16,
            GgmlDType::BF16 => Layout::BF16,
            _ => return None,
        })
    }

    /// High bits per value above the 4-bit plane (none for Q8, whose bytes are whole).
    pub const fn high_bits(self) -> usize {
        match self {
            Layout::Q5Offset | Layout::Q5Min => 1,
            Layout::Q6Halves => 2,
            _ => 0,
        }
    }

    /// What the stored integers are offset by (`w = d * (q - offset)`).
    pub const fn offset(self) -> i8 {
        match self {
            Layout::Q4Offset => 8,
            Layout::Q5Offset => 16,
            Layout::Q6Halves => 32,
            _ => 0,
        }
    }

    /// Whether blocks have a minimum (unsigned values, `w = d * q + m`).
    pub const fn has_min(self) -> bool {
        matches!(self, Layout::Q4Min | Layout::Q5Min)
    }

    /// Whether each half block has an 8-bit factor of its own.
    pub const fn has_halves(self) -> bool {
        matches!(self, Layout::Q6Halves)
    }

    /// Whether the weights are floats (no blocks, no scales).
    pub const fn is_float(self) -> bool {
        matches!(self, Layout::F32 | Layout::F16 | Layout::BF16)
    }

    /// Values a row's length must be a multiple of: a block, or for floats the
    /// eight lanes of a vector.
    const fn granule(self) -> usize {
        if self.is_float() {
            8
        } else {
            QK
        }
    }

    /// Bytes of low-plane values (or floats) per row of `cols` values.
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            Layout::F32 => 4 * cols,
            Layout::F16 | Layout::BF16 => 2 * cols,
            // Whole bytes.
            Layout::Q8 => cols,
            // Blocks in pairs; an odd last block leaves its high nibbles zero.
            _ => (cols / QK).div_ceil(2) * QK,
        }
    }

    /// Bytes of high bits per row of `nbp` blocks (a multiple of 8): 32 per group
    /// of `8 / h` blocks.
    fn high_row_bytes(self, nbp: usize) -> usize {
        nbp * 4 * self.high_bits()
    }
}

/// Per-block factors of a weight matrix (scales or minimums), row-major, each row
/// padded with zeros to `QWeight::nbp` blocks.
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

    /// The row of `nbp` values starting at element `at`, as raw bytes (f16 or f32
    /// as `is_half` says), bounds-checked here.
    #[inline]
    pub fn row_bytes(&self, at: usize, nbp: usize) -> *const u8 {
        match self {
            Scales::Half(v) => v[at..at + nbp].as_ptr() as *const u8,
            Scales::Single(v) => v[at..at + nbp].as_ptr() as *const u8,
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

/// A quantized weight matrix `[rows, cols]`, repacked (see the module docs).
#[derive(Debug)]
pub struct QWeight {
    pub layout: Layout,
    pub rows: usize,
    pub cols: usize,
    /// Blocks per row.
    pub nb: usize,
    /// Blocks per row of `d` and `m`: `nb` rounded up to a multiple of 8.
    pub nbp: usize,
    /// The low plane: paired nibbles, or Q8's bytes.
    qs: Vec<u8>,
    /// The high-bit plane (five- and six-bit layouts; empty otherwise).
    qh: Vec<u8>,
    /// The scales.
    pub d: Scales,
    /// The minimums (layouts with a minimum; empty otherwise).
    pub m: Scales,
    /// The half blocks' 8-bit factors, two per block, `2 * nbp` per row (`Q6Halves`;
    /// empty otherwise).
    halves: Vec<i8>,
}

/// One GGML block, unpacked: its values as unsigned integers (before the layout's
/// offset), its scale and minimum, and its halves' factors.
struct Unpacked {
    q: [u8; QK],
    d: f32,
    m: f32,
    halves: [i8; 2],
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
    pub fn handles(dtype: GgmlDType, cols: usize) -> bool {
        Layout::of(dtype).is_some_and(|l| {
            cols.is_multiple_of(dtype.block_size()) && cols.is_multiple_of(l.granule())
        })
    }

    /// Whether `other` can be stacked under this matrix (same columns, layout and
    /// scale precision).
    pub fn stacks_with(&self, other: &QWeight) -> bool {
        self.layout == other.layout
            && self.cols == other.cols
            && self.d.is_half() == other.d.is_half()
            && self.m.is_half() == other.m.is_half()
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
            out.qs.extend_from_slice(&w.qs);
            out.qh.extend_from_slice(&w.qh);
            out.halves.extend_from_slice(&w.halves);
            out.d.append(w.d)?;
            out.m.append(w.m)?;
        }
        Ok(out)
    }

    /// Repacks GGML blocks of `dtype` holding `rows x cols` values.
    pub fn from_ggml(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let layout = match Layout::of(dtype) {
            Some(layout) if Self::handles(dtype, cols) => layout,
            _ => {
                return Err(Error::Unsupported(format!(
                    "CPU kernels do not handle {dtype:?} rows of {cols} values"
                )))
            }
        };
        let expected = rows * cols / dtype.block_size() * dtype.type_size();
        if data.len() != expected {
            return Err(Error::Compute(format!(
                "{dtype:?} weights of {rows}x{cols} need {expected} bytes, got {}",
                data.len()
            )));
        }
        let nb = cols / QK;
        let nbp = nb.next_multiple_of(8);
        if layout.is_float() {
            return Ok(QWeight {
                layout,
                rows,
                cols,
                nb,
                nbp,
                qs: data.to_vec(),
                qh: Vec::new(),
                d: Scales::Single(Vec::new()),
                m: Scales::Single(Vec::new()),
                halves: Vec::new(),
            });
        }
        let (row_bytes, high_bytes) = (layout.row_bytes(cols), layout.high_row_bytes(nbp));
        let mut w = QWeight {
            layout,
            rows,
            cols,
            nb,
            nbp,
            qs: vec![0u8; rows * row_bytes],
            qh: vec![0u8; rows * high_bytes],
            d: Scales::Single(Vec::new()),
            m: Scales::Single(Vec::new()),
            halves: vec![
                0i8;
                if layout.has_halves() {
                    rows * 2 * nbp
                } else {
                    0
                }
            ],
        };
        let mut d = vec![0f32; rows * nbp];
        let mut m = vec![0f32; if layout.has_min() { rows * nbp } else { 0 }];
        let src_row = data.len() / rows.max(1);
        let per_src = dtype.type_size();
        let blocks_per_src = dtype.block_size() / QK;
        for r in 0..rows {
            let src = &data[r * src_row..(r + 1) * src_row];
            for (s, blk) in src.chunks_exact(per_src).enumerate() {
                for j in 0..blocks_per_src {
                    let b = s * blocks_per_src + j;
                    let u = unpack(dtype, blk, j);
                    w.put(r, b, &u.q);
                    d[r * nbp + b] = u.d;
                    if layout.has_min() {
                        m[r * nbp + b] = u.m;
                    }
                    if layout.has_halves() {
                        let at = (r * nbp + b) * 2;
                        w.halves[at..at + 2].copy_from_slice(&u.halves);
                    }
                }
            }
        }
        // Scales exact in f16 stay f16: every type's but the sub-block products of
        // Q4_K and Q5_K.
        let half = !matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K);
        w.d = Scales::new(d, half);
        w.m = Scales::new(m, half);
        Ok(w)
    }

    /// Writes block `b` of row `r` from its unsigned integers.
    fn put(&mut self, r: usize, b: usize, q: &[u8; QK]) {
        let row_bytes = self.row_bytes();
        if self.layout == Layout::Q8 {
            self.qs[r * row_bytes + b * QK..][..QK].copy_from_slice(q);
            return;
        }
        let pair = &mut self.qs[r * row_bytes + (b / 2) * QK..][..QK];
        let shift = 4 * (b % 2);
        for (p, &v) in pair.iter_mut().zip(q) {
            *p |= (v & 0x0F) << shift;
        }
        let h = self.layout.high_bits();
        if h > 0 {
            let (group, shift) = high_place(b, h);
            let at = r * self.layout.high_row_bytes(self.nbp) + group * QK;
            let mask = (1u8 << h) - 1;
            for (p, &v) in self.qh[at..at + QK].iter_mut().zip(q) {
                *p |= ((v >> 4) & mask) << shift;
            }
        }
    }

    /// The 32 values of block `b` of row `r` as integers (`w = d * q (+ m)`), in
    /// element order, already offset.
    #[inline]
    pub fn block(&self, r: usize, b: usize) -> [i8; QK] {
        let bytes = self.row_bytes();
        let mut q = [0i8; QK];
        if self.layout == Layout::Q8 {
            for (v, &p) in q.iter_mut().zip(&self.qs[r * bytes + b * QK..][..QK]) {
                *v = p as i8;
            }
            return q;
        }
        let pair = &self.qs[r * bytes + (b / 2) * QK..][..QK];
        let shift = 4 * (b % 2);
        let h = self.layout.high_bits();
        let (group, hshift) = high_place(b, h.max(1));
        let high =
            &self.qh[(r * self.layout.high_row_bytes(self.nbp) + group * QK).min(self.qh.len())..];
        let mask = (1u8 << h) - 1;
        for (j, (v, &p)) in q.iter_mut().zip(pair).enumerate() {
            let hi = if h > 0 { (high[j] >> hshift) & mask } else { 0 };
            *v = (((p >> shift) & 0x0F) | (hi << 4)) as i8 - self.layout.offset();
        }
        q
    }

    /// The 8-bit factors of block `b`'s two halves (ones where the layout has none).
    #[inline]
    pub fn halves(&self, r: usize, b: usize) -> [i8; 2] {
        if self.layout.has_halves() {
            let at = (r * self.nbp + b) * 2;
            [self.halves[at], self.halves[at + 1]]
        } else {
            [1, 1]
        }
    }

    /// Row `r` as floats (the embedding lookup of a tied output head).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.layout.is_float() {
            let (row, out) = (self.row_values(r), &mut out[..self.cols]);
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
            let d = self.d.get(r * self.nbp + b);
            let halves = self.halves(r, b);
            for (j, (y, &v)) in chunk.iter_mut().zip(&q).enumerate() {
                // As GGML's dequantization: the scale (times the half's factor, an
                // exact product), times the value, then the minimum.
                *y = if self.layout.has_min() {
                    v as f32 * d + self.m.get(r * self.nbp + b)
                } else if self.layout.has_halves() {
                    d * halves[j / 16] as f32 * v as f32
                } else {
                    v as f32 * d
                };
            }
        }
    }

    /// Bytes of low-plane values (or floats) per row.
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.layout.row_bytes(self.cols)
    }

    /// The low-plane values of row `r` (the kernels index blocks from it).
    #[inline]
    pub fn row_values(&self, r: usize) -> &[u8] {
        let bytes = self.row_bytes();
        &self.qs[r * bytes..(r + 1) * bytes]
    }

    /// The high-bit plane of row `r` (empty for layouts without one).
    #[inline]
    pub fn row_high_bits(&self, r: usize) -> &[u8] {
        let bytes = self.layout.high_row_bytes(self.nbp);
        &self.qh[r * bytes..(r + 1) * bytes]
    }

    /// The halves' factors of row `r`, two per block (empty for other layouts).
    #[inline]
    pub fn row_halves(&self, r: usize) -> &[i8] {
        if self.layout.has_halves() {
            &self.halves[r * 2 * self.nbp..(r + 1) * 2 * self.nbp]
        } else {
            &[]
        }
    }

    /// Bytes held (for the memory figures).
    pub fn size_bytes(&self) -> usize {
        self.qs.len() + self.qh.len() + self.halves.len() + self.d.bytes() + self.m.bytes()
    }
}

/// Where block `b`'s high bits lie in the plane of `h` bits per value: its group of
/// `8 / h` blocks and the shift within each byte.
#[inline]
pub fn high_place(b: usize, h: usize) -> (usize, usize) {
    let per = 8 / h;
    (b / per, h * (b % per))
}

/// Sub-block `j` (of 32 values) of GGML block `blk` of type `dtype`.
fn unpack(dtype: GgmlDType, blk: &[u8], j: usize) -> Unpacked {
    let mut u = Unpacked {
        q: [0; QK],
        d: f16_at(blk, 0),
        m: 0.0,
        halves: [1, 1],
    };
    // Values 0..16 of the 32-value blocks are the low nibbles of 16 bytes at `qs`,
    // 16..32 the high ones.
    let nibbles = |q: &mut [u8; QK], qs: &[u8]| {
        for (l, &b) in qs[..16].iter().enumerate() {
            q[l] = b & 0x0F;
            q[l + 16] = b >> 4;
        }
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
            (GgmlDType::Q6K, 768),
            (GgmlDType::F32, 40),
            (GgmlDType::F16, 40),
            (GgmlDType::BF16, 40),
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

    #[test]
    fn stacking_keeps_every_row() {
        let a = QWeight::from_qtensor(&quantized(GgmlDType::Q4_1, 3, 64))
            .unwrap()
            .unwrap();
        let b = QWeight::from_qtensor(&quantized(GgmlDType::Q4_1, 2, 64))
            .unwrap()
            .unwrap();
        let (a0, b1) = (a.block(0, 1), b.block(1, 1));
        let s = QWeight::stack(vec![a, b]).unwrap();
        assert_eq!((s.rows, s.block(0, 1), s.block(4, 1)), (5, a0, b1));
        let c = QWeight::from_qtensor(&quantized(GgmlDType::Q8_0, 2, 64))
            .unwrap()
            .unwrap();
        assert!(QWeight::stack(vec![s, c]).is_err());
    }

    #[test]
    fn wrong_sizes_and_types_are_refused() {
        assert!(QWeight::from_ggml(GgmlDType::Q4_1, 2, 64, &[0; 79]).is_err());
        assert!(QWeight::from_ggml(GgmlDType::Q2K, 1, 256, &[0; 84]).is_err());
        assert!(QWeight::from_ggml(GgmlDType::Q6K, 1, 256, &[0; 209]).is_err());
        assert!(QWeight::from_ggml(GgmlDType::F16, 2, 20, &[0; 80]).is_err());
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            assert!(!QWeight::handles(dtype, 96) && QWeight::handles(dtype, 768));
        }
    }
}

//! Quantized weights repacked at load for the kernels.
//!
//! GGML stores each 32-value block with its f16 scale in front of the values. The
//! kernels want the opposite: scales already in f32 (no conversion in the inner loop)
//! and the 4-bit values of two consecutive blocks in one 32-byte vector (block `2p` in
//! the low nibbles, block `2p + 1` in the high ones), so that one load and a mask or a
//! shift give a block's 32 values in element order. That pairing is how Q4_K stores
//! its sub-blocks already; Q4_0/Q4_1 blocks are interleaved into it here.
//!
//! Scales and minimums sit in arrays of their own, each row padded to a multiple of
//! eight blocks, so that a kernel converts eight at once. They stay f16 where GGML
//! had them in f16 (the bytes streamed per token stay GGML's).
//!
//! Q4_K becomes the Q4_1 form per 32-value sub-block: its 6-bit scales and minimums
//! times the super-block's f16 factors are exact in f32 (not in f16), so they are
//! kept in f32 and nothing is lost.

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
    /// 8-bit signed, `w = d * q` (Q8_0).
    Q8,
}

impl Layout {
    /// Bytes of values per row of `nb` blocks.
    fn row_bytes(self, nb: usize) -> usize {
        match self {
            // Blocks in pairs; an odd last block leaves its high nibbles zero.
            Layout::Q4Offset | Layout::Q4Min => nb.div_ceil(2) * QK,
            Layout::Q8 => nb * QK,
        }
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
    qs: Vec<u8>,
    /// The scales.
    pub d: Scales,
    /// The minimums (`Q4Min`; empty otherwise).
    pub m: Scales,
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
        match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 => cols.is_multiple_of(QK),
            GgmlDType::Q4K => cols.is_multiple_of(256),
            _ => false,
        }
    }

    /// Whether `other` can be stacked under this matrix (same columns, layout and
    /// scale precision).
    pub fn stacks_with(&self, other: &QWeight) -> bool {
        self.layout == other.layout
            && self.cols == other.cols
            && self.d.is_half() == other.d.is_half()
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
            out.d.append(w.d)?;
            out.m.append(w.m)?;
        }
        Ok(out)
    }

    /// Repacks GGML blocks of `dtype` holding `rows x cols` values.
    pub fn from_ggml(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        if !Self::handles(dtype, cols) {
            return Err(Error::Unsupported(format!(
                "CPU kernels do not handle {dtype:?} rows of {cols} values"
            )));
        }
        let expected = rows * cols / dtype.block_size() * dtype.type_size();
        if data.len() != expected {
            return Err(Error::Compute(format!(
                "{dtype:?} weights of {rows}x{cols} need {expected} bytes, got {}",
                data.len()
            )));
        }
        let layout = match dtype {
            GgmlDType::Q4_0 => Layout::Q4Offset,
            GgmlDType::Q8_0 => Layout::Q8,
            _ => Layout::Q4Min,
        };
        let nb = cols / QK;
        let nbp = nb.next_multiple_of(8);
        let row_bytes = layout.row_bytes(nb);
        let mut qs = vec![0u8; rows * row_bytes];
        let mut d = vec![0f32; rows * nbp];
        let mut m = vec![
            0f32;
            if layout == Layout::Q4Min {
                rows * nbp
            } else {
                0
            }
        ];
        let src_row = data.len() / rows.max(1);
        for r in 0..rows {
            let src = &data[r * src_row..(r + 1) * src_row];
            let dst = &mut qs[r * row_bytes..(r + 1) * row_bytes];
            let m_at = (r * nbp).min(m.len());
            let (d, m) = (&mut d[r * nbp..], &mut m[m_at..]);
            match dtype {
                GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                    let (bb, head) = if dtype == GgmlDType::Q4_0 {
                        (18, 2)
                    } else {
                        (20, 4)
                    };
                    for (b, blk) in src.chunks_exact(bb).enumerate() {
                        d[b] = f16_at(blk, 0);
                        if dtype == GgmlDType::Q4_1 {
                            m[b] = f16_at(blk, 2);
                        }
                        let shift = 4 * (b % 2);
                        let pair = &mut dst[(b / 2) * QK..(b / 2 + 1) * QK];
                        for (j, &q) in blk[head..].iter().enumerate() {
                            pair[j] |= (q & 0x0F) << shift;
                            pair[j + 16] |= (q >> 4) << shift;
                        }
                    }
                }
                GgmlDType::Q8_0 => {
                    for (b, blk) in src.chunks_exact(34).enumerate() {
                        d[b] = f16_at(blk, 0);
                        dst[b * QK..(b + 1) * QK].copy_from_slice(&blk[2..]);
                    }
                }
                _ => {
                    // Q4_K: d, dmin, 12 bytes of 6-bit scales and minimums, then 128
                    // bytes holding 8 sub-blocks already paired as the kernels want.
                    for (sb, blk) in src.chunks_exact(144).enumerate() {
                        let (sd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                        for j in 0..8 {
                            let (sc, mn) = q4k_scale_min(j, &blk[4..16]);
                            d[sb * 8 + j] = sd * sc as f32;
                            m[sb * 8 + j] = -(dmin * mn as f32);
                        }
                        dst[sb * 128..(sb + 1) * 128].copy_from_slice(&blk[16..144]);
                    }
                }
            }
        }
        let half = dtype != GgmlDType::Q4K;
        Ok(QWeight {
            layout,
            rows,
            cols,
            nb,
            nbp,
            qs,
            d: Scales::new(d, half),
            m: Scales::new(m, half),
        })
    }

    /// The 32 values of block `b` of row `r` as integers (`w = d * q (+ m)`), in
    /// element order; `Q4Offset` values already shifted by -8.
    #[inline]
    pub fn block(&self, r: usize, b: usize) -> [i8; QK] {
        let bytes = self.layout.row_bytes(self.nb);
        let mut q = [0i8; QK];
        match self.layout {
            Layout::Q4Offset | Layout::Q4Min => {
                let pair = &self.qs[r * bytes + (b / 2) * QK..][..QK];
                let shift = 4 * (b % 2);
                let off = if self.layout == Layout::Q4Offset {
                    8
                } else {
                    0
                };
                for (v, &p) in q.iter_mut().zip(pair) {
                    *v = ((p >> shift) & 0x0F) as i8 - off;
                }
            }
            Layout::Q8 => {
                for (v, &p) in q.iter_mut().zip(&self.qs[r * bytes + b * QK..][..QK]) {
                    *v = p as i8;
                }
            }
        }
        q
    }

    /// Row `r` as floats (the embedding lookup of a tied output head).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate().take(self.nb) {
            let q = self.block(r, b);
            let d = self.d.get(r * self.nbp + b);
            let m = if self.layout == Layout::Q4Min {
                self.m.get(r * self.nbp + b)
            } else {
                0.0
            };
            for (y, &v) in chunk.iter_mut().zip(&q) {
                // As GGML's dequantization: one product, then the minimum.
                *y = if self.layout == Layout::Q4Min {
                    v as f32 * d + m
                } else {
                    v as f32 * d
                };
            }
        }
    }

    /// Bytes of values per row.
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.layout.row_bytes(self.nb)
    }

    /// The values of row `r` (the kernels index blocks from it).
    #[inline]
    pub fn row_values(&self, r: usize) -> &[u8] {
        let bytes = self.row_bytes();
        &self.qs[r * bytes..(r + 1) * bytes]
    }

    /// Bytes held (for the memory figures).
    pub fn size_bytes(&self) -> usize {
        self.qs.len() + self.d.bytes() + self.m.bytes()
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scale and minimum of Q4_K sub-block `j` from the 12 packed bytes.
fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
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
            (GgmlDType::Q8_0, 64),
            (GgmlDType::Q4K, 512),
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
        assert!(QWeight::from_ggml(GgmlDType::Q6K, 1, 256, &[0; 210]).is_err());
        assert!(!QWeight::handles(GgmlDType::Q4K, 96));
    }
}

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

/// One layer's keys or values in the pool: a row per slot, `kv_heads * head_dim` wide.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvRows<'_> {
    /// Head `g` of slot `slot`, as f32, into `dst`.
    #[inline]
    fn head_into(&self, slot: u32, g: usize, width: usize, hd: usize, dst: &mut [f32]) {
        let start = slot as usize * width + g * hd;
        match self {
            KvRows::F16(rows) => rows[start..start + hd].convert_to_f32_slice(dst),
            KvRows::F32(rows) => dst.copy_from_slice(&rows[start..start + hd]),
        }
    }
}

thread_local! {
    /// Per-thread key and value buffers for `paged_attention`.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Head counts and size.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
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

/// Attention for a whole batch in one parallel pass over (sequence, KV head).
/// `q: [num_heads, tokens, head_dim]` (rotated, packed over the batch); returns
/// `[tokens, num_heads * head_dim]`.
pub fn paged_attention(
    q: &[f32],
    tokens: usize,
    k: KvRows<'_>,
    v: KvRows<'_>,
    seqs: &[SeqAttn<'_>],
    h: Heads,
) -> Vec<f32> {
    let (hd, nh, nkv) = (h.head_dim, h.num_heads, h.num_kv_heads);
    debug_assert_eq!(q.len(), nh * tokens * hd);
    let work: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..nkv).map(move |g| (s, g)))
        .collect();
    let parts: Vec<Vec<f32>> = work
        .par_iter()
        .map(|&(si, g)| attend_head(q, tokens, k, v, &seqs[si], g, h))
        .collect();
    let groups = nh / nkv;
    let mut out = vec![0f32; tokens * nh * hd];
    for (&(si, g), part) in work.iter().zip(&parts) {
        let s = &seqs[si];
        for kk in 0..groups {
            let head = g * groups + kk;
            for i in 0..s.n {
                let src = &part[(kk * s.n + i) * hd..(kk * s.n + i + 1) * hd];
                let row = (s.offset + i) * nh * hd + head * hd;
                out[row..row + hd].copy_from_slice(src);
            }
        }
    }
    out
}

/// One sequence, one KV head: the outputs of the head's query heads,
/// `[groups, n, head_dim]`.
fn attend_head(
    q: &[f32],
    tokens: usize,
    k: KvRows<'_>,
    v: KvRows<'_>,
    s: &SeqAttn<'_>,
    g: usize,
    h: Heads,
) -> Vec<f32> {
    let (hd, nh, nkv) = (h.head_dim, h.num_heads, h.num_kv_heads);
    let (groups, width) = (nh / nkv, nkv * hd);
    let total = s.past + s.n;
    debug_assert_eq!(s.slots.len(), total);
    let scale = 1.0 / (hd as f32).sqrt();
    let rows = groups * s.n;
    SCRATCH.with_borrow_mut(|(keys, values)| {
        // This head's keys and values as contiguous f32 rows, converted once, in
        // per-thread buffers that only ever grow (no allocation per call).
        if keys.len() < total * hd {
            keys.resize(total * hd, 0.0);
            values.resize(total * hd, 0.0);
        }
        for (j, &slot) in s.slots.iter().enumerate() {
            k.head_into(slot, g, width, hd, &mut keys[j * hd..(j + 1) * hd]);
            v.head_into(slot, g, width, hd, &mut values[j * hd..(j + 1) * hd]);
        }
        let mut out = vec![0f32; rows * hd];
        let mut scores = vec![0f32; total];
        for r in 0..rows {
            // Row r = (query head in the group, query i); it sees keys 0..=past + i.
            let (head, i) = (g * groups + r / s.n, r % s.n);
            let visible = s.past + i + 1;
            let at = (head * tokens + s.offset + i) * hd;
            let qr = &q[at..at + hd];
            let sc = &mut scores[..visible];
            for (j, x) in sc.iter_mut().enumerate() {
                *x = dot(qr, &keys[j * hd..(j + 1) * hd]) * scale;
            }
            let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in sc.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            let o = &mut out[r * hd..(r + 1) * hd];
            for (j, &p) in sc.iter().enumerate() {
                axpy(p * inv, &values[j * hd..(j + 1) * hd], o);
            }
        }
        out
    })
}

/// A dot product in a fixed order: eight lanes (vectorised by the compiler), then
/// the lanes in order, then the tail.
#[inline]
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
#[inline]
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

    /// `paged_attention` for one sequence with `q: [num_heads, n, head_dim]`.
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

    #[test]
    fn matches_plain_causal_attention_with_gqa() {
        let (s, q, k, v, slots) = setup();
        let (hd, width) = (s.head_dim, s.num_kv_heads * s.head_dim);
        let out = one(&q, KvRows::F32(&k), KvRows::F32(&v), &slots, s);
        for h in 0..s.num_heads {
            let g = h / (s.num_heads / s.num_kv_heads);
            for i in 0..s.n {
                let visible = &slots[..s.past + i + 1];
                let row = |t: &[f32], slot: u32| {
                    let st = slot as usize * width + g * hd;
                    t[st..st + hd].to_vec()
                };
                let keys: Vec<_> = visible.iter().map(|&sl| row(&k, sl)).collect();
                let values: Vec<_> = visible.iter().map(|&sl| row(&v, sl)).collect();
                let qi = &q[(h * s.n + i) * hd..(h * s.n + i + 1) * hd];
                let want = reference(qi, &keys, &values);
                let got = &out[i * s.num_heads * hd + h * hd..][..hd];
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn a_token_gets_the_same_bits_alone_or_in_a_chunk() {
        let (s, q, k, v, slots) = setup();
        let chunk = one(&q, KvRows::F32(&k), KvRows::F32(&v), &slots, s);
        let hd = s.head_dim;
        // The last query alone, with everything before it as past.
        let last: Vec<f32> = (0..s.num_heads)
            .flat_map(|h| q[(h * s.n + s.n - 1) * hd..(h * s.n + s.n) * hd].to_vec())
            .collect();
        let alone_shape = AttnShape {
            n: 1,
            past: s.past + s.n - 1,
            ..s
        };
        let alone = one(&last, KvRows::F32(&k), KvRows::F32(&v), &slots, alone_shape);
        assert_eq!(alone, chunk[(s.n - 1) * s.num_heads * hd..].to_vec());
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

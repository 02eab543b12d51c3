//! Per-sequence KV cache: one key and one value tensor per layer, shaped
//! `[kv_heads, positions, head_dim]`, grown as the sequence advances.
//!
//! This is the simple layout the single-sequence and small-batch engine needs; the
//! block-based cache with a shared free list replaces it when batching needs a budget.

use candle_core::{Tensor, D};

use crate::error::Result;

#[derive(Debug, Default)]
pub struct SeqKvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl SeqKvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of positions already stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends this step's keys and values for `layer` and returns the whole history.
    /// The position count advances once every layer has been appended, via `commit`.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers[layer].take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, k], D::Minus2)?,
                Tensor::cat(&[&pv, v], D::Minus2)?,
            ),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    pub fn commit(&mut self, new_positions: usize) {
        self.len += new_positions;
    }

    /// Bytes held by the cache (keys and values of all layers).
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

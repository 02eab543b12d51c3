//! Rotary position embeddings: the cos/sin tables of one rotation (a base, optional
//! per-pair frequency divisors, a pairing style), computed once at load for every
//! position the model serves. An architecture may hold several (Gemma 3's local and
//! global layers rotate with different bases).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kernels::elementwise::RopeStyle;

pub struct Rope {
    /// `[max_positions, head_dim / 2]` each.
    cos: Tensor,
    sin: Tensor,
    head_dim: usize,
    style: RopeStyle,
}

impl Rope {
    /// The tables for `head_dim`-wide heads rotated with base `theta`, frequencies
    /// divided by `factors` where given (Llama 3's scaling), positions
    /// `0..max_positions`.
    pub fn new(
        head_dim: usize,
        theta: f32,
        factors: Option<&[f32]>,
        style: RopeStyle,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
                f / factors.map_or(1.0, |fs| fs[i])
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?.contiguous()?,
            sin: angles.sin()?.contiguous()?,
            head_dim,
            style,
        })
    }

    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }
}

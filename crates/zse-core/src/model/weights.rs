//! Weights as a model holds them: where they are read from (`TensorSource`, and
//! `RawTensor` where the source maps a tensor's bytes), loading with their shapes
//! checked (`Loader`), a weight matrix as its backend multiplies it
//! (`Weight`), and projections of one input run as one matmul (`Projections`).

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::ops::cpu::with_f32;
use super::ops::{Backend, Ops};
use crate::error::{Error, Result};
use crate::format::BlockType;
use crate::kernels::{KernelPath, QWeight};

/// Where the model reads its tensors from (a `.zse` file, or a test's memory).
pub trait TensorSource {
    fn load(&self, name: &str) -> Result<Option<QTensor>>;

    /// The tensor's GGML bytes where the source holds them in memory (a map of the
    /// file), so that the kernels repack a matrix straight from them; None where it
    /// does not (then `load`).
    fn raw(&self, _name: &str) -> Option<RawTensor<'_>> {
        None
    }
}

/// A tensor's bytes as its source maps them.
pub struct RawTensor<'a> {
    pub dtype: BlockType,
    /// `[out, in]` for a matrix, as `load` gives it.
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    /// Called with each range of `bytes` once read (the file map drops those pages).
    pub release: Box<dyn Fn(Range<usize>) + 'a>,
}

/// Reads an architecture's tensors from a source, each checked against the shape
/// the config implies, into the form the backend computes with.
pub struct Loader<'a> {
    pub src: &'a dyn TensorSource,
    pub ops: &'a dyn Ops,
}

impl Loader<'_> {
    pub fn device(&self) -> &Device {
        self.ops.device()
    }

    /// A tensor that must be there, with this shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let t = self
            .src
            .load(name)?
            .ok_or_else(|| Error::Unsupported(format!("tensor '{name}' is missing")))?;
        if t.shape().dims() != shape {
            return Err(Error::Unsupported(format!(
                "tensor '{name}' has shape {:?}, expected {shape:?}",
                t.shape().dims()
            )));
        }
        Ok(t)
    }

    /// The matrix `{name}.weight`, `[out, in]`. Where the kernels run it and the
    /// source maps its bytes, it is repacked from the map as the rows are read, their
    /// pages dropped as it goes: never the file's copy, a candle copy and the repacked
    /// matrix at once (for Gemma 3's 262k-token embedding, 137 MiB each).
    pub fn matrix(&self, name: &str, out: usize, inp: usize) -> Result<Weight> {
        let name = format!("{name}.weight");
        if let (Backend::Kernels(path), Some(raw)) = (self.ops.backend(), self.src.raw(&name)) {
            if raw.shape == [out, inp] && QWeight::handles(raw.dtype, inp) {
                let mut release = |range| (raw.release)(range);
                let w = QWeight::from_ggml_releasing(raw.dtype, out, inp, raw.bytes, &mut release)?;
                return Ok(Weight::Kernel(w, path));
            }
        }
        let t = self.tensor(&name, &[out, inp])?;
        self.ops.weight(Arc::new(t))
    }

    /// A vector (norm weights, biases) as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        Ok(self
            .tensor(name, &[len])?
            .dequantize(self.device())?
            .to_dtype(DType::F32)?)
    }

    /// `{name}.bias` where the architecture has biases there.
    pub fn bias(&self, name: &str, len: usize, present: bool) -> Result<Option<Tensor>> {
        present
            .then(|| self.vector(&format!("{name}.bias"), len))
            .transpose()
    }

    /// An optional tensor, dequantized to f32 values.
    pub fn optional_values(&self, name: &str) -> Result<Option<Vec<f32>>> {
        match self.src.load(name)? {
            Some(t) => Ok(Some(
                t.dequantize(self.device())?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )),
            None => Ok(None),
        }
    }
}

/// A weight matrix: ZSE's CPU kernels where they handle its block type, candle's
/// quantized matmul otherwise.
pub enum Weight {
    Kernel(QWeight, KernelPath),
    Candle(QMatMul),
}

impl Weight {
    pub fn size_bytes(&self) -> usize {
        match self {
            Weight::Kernel(w, _) => w.size_bytes(),
            Weight::Candle(q) => match q {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            },
        }
    }

    /// The block type of a matrix that ZSE's kernels do not run (candle's matmul
    /// does), as `zse info` names types; None for one they run.
    pub fn without_kernel(&self) -> Option<String> {
        match self {
            Weight::Kernel(..) => None,
            Weight::Candle(QMatMul::QTensor(t)) => Some(format!("{:?}", t.dtype())),
            Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                Some(format!("{:?}", t.dtype()))
            }
        }
    }

    /// `x: [tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Kernel(w, path) => {
                let m = x.dim(0)?;
                let y = with_f32(x, |xs| w.matmul(xs, m, *path))?;
                Ok(Tensor::from_vec(y, (m, w.rows), x.device())?)
            }
            Weight::Candle(q) => Ok(q.forward(x)?),
        }
    }

    /// The rows `ids` of the matrix (an embedding lookup), `[tokens, in]` in f32.
    pub fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Weight::Kernel(w, _) => {
                let mut out = vec![0f32; ids.len() * w.cols];
                for (row, &id) in out.chunks_exact_mut(w.cols).zip(ids) {
                    w.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), w.cols), device)?)
            }
            Weight::Candle(q) => {
                let ids = Tensor::from_slice(ids, ids.len(), device)?;
                Ok(q.embedding(&ids)?.to_dtype(DType::F32)?)
            }
        }
    }
}

/// Projections of one input (q/k/v, or gate/up), each with an optional bias. Where
/// the kernels run them all, their weights are stacked into one matrix: one matmul,
/// one quantization of the input and one parallel dispatch instead of several. A
/// file may also store them fused (Phi-3): then it is one matrix from the start.
pub struct Projections {
    weights: Vec<Weight>,
    /// Output width of each projection.
    widths: Vec<usize>,
    biases: Vec<Option<Tensor>>,
}

impl Projections {
    pub fn new(
        weights: Vec<Weight>,
        widths: Vec<usize>,
        biases: Vec<Option<Tensor>>,
    ) -> Result<Self> {
        // Stacked only where the kernels run every part with one layout (a file may
        // mix block types across q/k/v); otherwise each runs on its own.
        let kernels: Vec<&QWeight> = weights
            .iter()
            .filter_map(|w| match w {
                Weight::Kernel(q, _) => Some(q),
                Weight::Candle(_) => None,
            })
            .collect();
        let stackable = weights.len() > 1
            && kernels.len() == weights.len()
            && kernels.windows(2).all(|p| p[0].stacks_with(p[1]));
        let weights = match (stackable, weights.first()) {
            (true, Some(Weight::Kernel(_, path))) => {
                let path = *path;
                let parts = weights
                    .into_iter()
                    .filter_map(|w| match w {
                        Weight::Kernel(q, _) => Some(q),
                        Weight::Candle(_) => None,
                    })
                    .collect();
                vec![Weight::Kernel(QWeight::stack(parts)?, path)]
            }
            _ => weights,
        };
        Ok(Self {
            weights,
            widths,
            biases,
        })
    }

    /// Projections stored as one matrix whose rows are the parts' rows in turn.
    pub fn fused(weight: Weight, widths: Vec<usize>, biases: Vec<Option<Tensor>>) -> Self {
        Self {
            weights: vec![weight],
            widths,
            biases,
        }
    }

    /// Matrices held (one when stacked or fused).
    pub fn matrices(&self) -> usize {
        self.weights.len()
    }

    /// The matrices held.
    pub fn weights(&self) -> &[Weight] {
        &self.weights
    }

    /// `x: [tokens, in]` -> one `[tokens, width]` tensor per projection.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(self.widths.len());
        if let [joined] = self.weights.as_slice() {
            let y = joined.forward(x)?;
            let mut at = 0;
            for &w in &self.widths {
                outs.push(y.narrow(1, at, w)?.contiguous()?);
                at += w;
            }
        } else {
            for w in &self.weights {
                outs.push(w.forward(x)?);
            }
        }
        for (y, b) in outs.iter_mut().zip(&self.biases) {
            if let Some(b) = b {
                *y = y.broadcast_add(b)?;
            }
        }
        Ok(outs)
    }

    /// `x: [tokens, in]` -> the projections side by side, `[tokens, sum of widths]`
    /// (no copy where they are one matrix). Biases are not added: for the gated
    /// feed-forward blocks, which have none.
    pub fn forward_joined(&self, x: &Tensor) -> Result<Tensor> {
        if self.biases.iter().any(Option::is_some) {
            return Err(Error::Compute("joined projections with biases".into()));
        }
        match self.weights.as_slice() {
            [joined] => joined.forward(x),
            parts => {
                let outs = parts
                    .iter()
                    .map(|w| w.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&outs, 1)?)
            }
        }
    }
}

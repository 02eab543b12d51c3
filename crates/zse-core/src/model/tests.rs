//! The model on random weights: the backends agree, and files may mix block types.

use super::*;
use crate::kernels::KernelPath;
use candle_core::quantized::{GgmlDType, QTensor};
use std::collections::HashMap;

/// Tensors in memory, quantized on the way in.
struct Memory(HashMap<String, QTensor>);

impl TensorSource for Memory {
    fn load(&self, name: &str) -> Result<Option<QTensor>> {
        Ok(self.0.get(name).map(|t| {
            let data = t.data().map(|d| d.into_owned()).unwrap_or_default();
            candle_core::quantized::ggml_file::qtensor_from_ggml(
                t.dtype(),
                &data,
                t.shape().dims().to_vec(),
                &Device::Cpu,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"))
        }))
    }
}

fn config() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        vocab_size: 64,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 32,
        rope_theta: 10000.0,
        rope_style: RopeStyle::Interleaved,
        rms_norm_eps: 1e-5,
        context_length: 64,
        qkv_bias: false,
        qk_norm: false,
        tied_embeddings: true,
        sliding_window: None,
        sliding_window_pattern: None,
        rope_theta_swa: None,
    }
}

/// Random weights; `k_type` for the key projection, Q8_0 for the other matrices.
fn model(k_type: GgmlDType) -> Model {
    model_with(
        k_type,
        GgmlDType::Q8_0,
        Backend::Kernels(KernelPath::best()),
    )
}

/// Random weights, `k_type` for the key projection and `w_type` for the other
/// matrices, on `backend`.
fn model_with(k_type: GgmlDType, w_type: GgmlDType, backend: Backend) -> Model {
    model_config(config(), k_type, w_type, backend)
}

/// Random weights for `c`, as `model_with`.
fn model_config(c: ModelConfig, k_type: GgmlDType, w_type: GgmlDType, backend: Backend) -> Model {
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in expected_tensors(&c).unwrap().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|j| (((j + 31 * i) * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(vals, shape.as_slice(), &Device::Cpu).unwrap();
        let dtype = match (shape.len(), name.contains("attn_k")) {
            (1, _) => GgmlDType::F32,
            (_, true) => k_type,
            _ => w_type,
        };
        tensors.insert(name, QTensor::quantize(&t, dtype).unwrap());
    }
    let src = Memory(tensors);
    Model::load(&c, &src, 64, DType::F32, &Device::Cpu, backend).unwrap()
}

fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let pool = m.new_kv_pool(4, 4, 16).unwrap();
    let slots: Vec<u32> = (0..tokens.len() as u32).collect();
    let item = BatchItem::same_slots(tokens, 0, &slots, Logits::Last);
    let out = m.forward(&[item], &pool).unwrap().remove(0).unwrap();
    out.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn mixed_block_types_in_qkv_run_as_separate_matmuls() {
    // All Q8_0: q/k/v stacked into one matmul. Q4_0 keys: three matmuls. Both
    // load and run; only the keys' quantization differs, so the logits are close.
    let (stacked, mixed) = (model(GgmlDType::Q8_0), model(GgmlDType::Q4_0));
    assert_eq!(stacked.layers.qkv_matrices(), vec![1]);
    assert_eq!(mixed.layers.qkv_matrices(), vec![3]);
    let tokens = [1u32, 5, 9, 2];
    let (a, b) = (logits(&stacked, &tokens), logits(&mixed, &tokens));
    assert_eq!(a.len(), 64);
    assert!(a.iter().chain(&b).all(|x| x.is_finite()));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.5, "logits apart by {worst}");
    // The tied head serves the embedding: no second copy.
    assert!(stacked.embed.is_none());
}

fn item<'a>(tokens: &'a [u32], past: usize, slots: &'a [u32]) -> BatchItem<'a> {
    BatchItem::same_slots(tokens, past, slots, Logits::All)
}

/// Runs two steps of three sequences on `m`: A and C prefill, then A and C
/// decode beside B's prefill. Returns every logits row of the second step.
fn two_steps(m: &Model) -> Vec<Vec<f32>> {
    let pool = m.new_kv_pool(4, 4, 16).unwrap();
    let (a, b, c) = (
        [3u32, 7, 1, 4, 9, 2],
        [5u32, 6, 8],
        [2u32, 2, 4, 8, 16, 32, 1, 11],
    );
    let slots = |r: std::ops::Range<u32>| r.collect::<Vec<u32>>();
    let (sa, sb, sc) = (slots(0..6), slots(16..19), slots(32..40));
    m.forward(
        &[item(&a[..5], 0, &sa[..5]), item(&c[..7], 0, &sc[..7])],
        &pool,
    )
    .unwrap();
    let second = [
        item(&a[5..], 5, &sa),
        item(&b, 0, &sb),
        item(&c[7..], 7, &sc),
    ];
    let out = m.forward(&second, &pool).unwrap();
    out.into_iter()
        .flat_map(|t| t.unwrap().to_vec2::<f32>().unwrap())
        .collect()
}

#[test]
fn candles_operations_compute_what_the_kernels_compute() {
    // F32 weights: the same matmul on both; only attention differs (in place
    // over the pool, against gathered, with the decoding sequences batched and
    // the rows put back in the batch's order).
    let kernels = Backend::Kernels(KernelPath::best());
    let native = two_steps(&model_with(GgmlDType::F32, GgmlDType::F32, kernels));
    let candle = two_steps(&model_with(GgmlDType::F32, GgmlDType::F32, Backend::Candle));
    assert_eq!(native.len(), 1 + 3 + 1);
    for (row, (x, y)) in native.iter().zip(&candle).enumerate() {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "row {row}: logits apart by {worst}");
    }
}

#[test]
fn a_sliding_window_is_kept_alike_by_both_backends() {
    // Window 3: the second step's long items (positions 5..8 of C, B's prefill) see
    // only their last three keys; the kernels' tiles and candle's masks agree.
    let windowed = ModelConfig {
        sliding_window: Some(3),
        ..config()
    };
    let f32_model =
        |c: &ModelConfig, b: Backend| model_config(c.clone(), GgmlDType::F32, GgmlDType::F32, b);
    let kernels = Backend::Kernels(KernelPath::best());
    let native = two_steps(&f32_model(&windowed, kernels));
    let candle = two_steps(&f32_model(&windowed, Backend::Candle));
    let full = two_steps(&f32_model(&config(), kernels));
    let apart = |x: &[Vec<f32>], y: &[Vec<f32>]| {
        x.iter()
            .flatten()
            .zip(y.iter().flatten())
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        apart(&native, &candle) < 1e-4,
        "backends apart by {}",
        apart(&native, &candle)
    );
    // B's first three positions see all they would anyway; later ones do not.
    assert!(apart(&native, &full) > 1e-3, "the window changed nothing");
}

//! `zse convert`: a GGUF file or a HF model directory in, a `.zse` file out.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::block_type::BlockType;
use super::gguf::GgufFile;
use super::gguf_config::config_from_gguf;
use super::gguf_tokenizer::{adds_bos_token, tokenizer_json_from_gguf};
use super::gguf_write::{self, TensorData};
use super::hf::HfDir;
use super::zse::{keys, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::model::check_tensor_set;
use crate::model::ModelConfig;

/// Bumped whenever the converter writes different tensors or keys for the same
/// source and options, so that caches of converted files (the default model's
/// among them) know to convert again.
pub const CONVERTER_REVISION: u32 = 3;

/// The weight precision asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// 4-bit blocks: Q4_K where rows allow it, else Q4_1; embeddings in Q8_0.
    Int4,
    /// Q8_0 blocks.
    Int8,
    Fp16,
    /// The source's own block types.
    Keep,
    /// One GGML block type for the matrices (`q4_0`, `q4_1`, `q4_k`, `q8_0`), with
    /// Q8_0 embeddings for the 4-bit ones, as llama.cpp's own files have.
    Blocks(GgmlDType),
}

/// Every scheme name `--quant` accepts, in one table for parsing and naming.
const SCHEMES: &[(&str, Quant)] = &[
    ("int4", Quant::Int4),
    ("int8", Quant::Int8),
    ("fp16", Quant::Fp16),
    ("keep", Quant::Keep),
    ("q4_0", Quant::Blocks(GgmlDType::Q4_0)),
    ("q4_1", Quant::Blocks(GgmlDType::Q4_1)),
    ("q4_k", Quant::Blocks(GgmlDType::Q4K)),
    ("q8_0", Quant::Blocks(GgmlDType::Q8_0)),
];

impl FromStr for Quant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SCHEMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, q)| q)
            .ok_or_else(|| {
                let names: Vec<&str> = SCHEMES.iter().map(|(n, _)| *n).collect();
                Error::invalid_argument(
                    "quant",
                    format!("'{s}' (expected one of {})", names.join(", ")),
                )
            })
    }
}

impl Quant {
    /// The scheme's name as `--quant` spells it (and `zse.quantization` records it).
    pub fn name(self) -> &'static str {
        SCHEMES
            .iter()
            .find(|(_, q)| *q == self)
            .map_or("custom", |(n, _)| n)
    }

    /// The block type a tensor gets. Vectors (norms, biases) always stay F32; a
    /// matrix whose rows do not divide into blocks falls back to F16.
    fn target(self, name: &str, shape: &[usize], stored: impl Into<BlockType>) -> BlockType {
        let stored = stored.into();
        self.candle_target(name, shape, stored)
            .map_or(stored, BlockType::from)
    }

    /// `target`, where it is a type candle holds (None: keep the stored one).
    fn candle_target(self, name: &str, shape: &[usize], stored: BlockType) -> Option<GgmlDType> {
        if shape.len() < 2 {
            return Some(GgmlDType::F32);
        }
        let row = shape[shape.len() - 1];
        let fits = |t: GgmlDType| row.is_multiple_of(t.block_size());
        let or_f16 = |t: GgmlDType| if fits(t) { t } else { GgmlDType::F16 };
        let embedding = name == "token_embd.weight" || name == "output.weight";
        Some(match self {
            Quant::Keep => return stored.candle(),
            Quant::Blocks(t) if embedding && t != GgmlDType::Q8_0 => or_f16(GgmlDType::Q8_0),
            Quant::Blocks(t) => or_f16(t),
            Quant::Fp16 => GgmlDType::F16,
            Quant::Int8 => or_f16(GgmlDType::Q8_0),
            Quant::Int4 if embedding => or_f16(GgmlDType::Q8_0),
            Quant::Int4 if fits(GgmlDType::Q4K) => GgmlDType::Q4K,
            Quant::Int4 => or_f16(GgmlDType::Q4_1),
        })
    }
}

/// What `zse convert` is asked to do besides the paths.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvertOptions {
    /// The weight precision; `None` keeps a GGUF file's block types and makes a HF
    /// directory's float weights `int4`.
    pub quant: Option<Quant>,
    /// Let a tensor already stored in a quantized block type be quantized again to
    /// another one. Off by default, as in llama.cpp's `llama-quantize`: rounding
    /// rounded weights a second time loses more than quantizing the originals once.
    pub allow_requantize: bool,
}

/// A quantized tensor converted into another quantized block type.
#[derive(Debug, Clone)]
pub struct Requantized {
    pub name: String,
    pub from: BlockType,
    pub to: BlockType,
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub output: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
    pub quantization: String,
    pub source_sha256: String,
    /// Tensors rounded a second time (only with `allow_requantize`).
    pub requantized: Vec<Requantized>,
}

/// Loads one tensor, by GGUF name, as the source stores it.
type TensorLoader = Box<dyn Fn(&str) -> Result<Stored>>;

/// A tensor as the source stores it: in a type candle holds, or (a GGUF file's IQ4
/// tensors) as its type and bytes, which are copied as they are.
enum Stored {
    Candle(QTensor),
    Bytes {
        dtype: BlockType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    },
}

impl Stored {
    fn dtype(&self) -> BlockType {
        match self {
            Stored::Candle(t) => t.dtype().into(),
            Stored::Bytes { dtype, .. } => *dtype,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Stored::Candle(t) => t.shape().dims(),
            Stored::Bytes { shape, .. } => shape,
        }
    }

    /// The values as f32, as GGML dequantizes them.
    fn dequantize(&self) -> Result<Tensor> {
        match self {
            Stored::Candle(t) => Ok(t.dequantize(&Device::Cpu)?),
            Stored::Bytes {
                dtype,
                shape,
                bytes,
            } => {
                let values = crate::kernels::weights::dequantize(*dtype, shape, bytes)?;
                Ok(Tensor::from_vec(values, shape.clone(), &Device::Cpu)?)
            }
        }
    }

    fn data<'a>(&'a self, name: &'a str) -> Result<TensorData<'a>> {
        match self {
            Stored::Candle(t) => TensorData::of_qtensor(name, t),
            Stored::Bytes {
                dtype,
                shape,
                bytes,
            } => Ok(TensorData {
                name,
                dtype: *dtype,
                shape,
                bytes: std::borrow::Cow::Borrowed(bytes),
            }),
        }
    }
}

/// Everything read from a source model, in GGUF conventions.
struct Source {
    name: String,
    config: ModelConfig,
    tokenizer_json: String,
    chat_template: Option<String>,
    bos_token_id: Option<u32>,
    /// Whether prompts start with BOS (the engine adds it where missing).
    add_bos_token: bool,
    eos_token_ids: Vec<u32>,
    /// Keys copied as they are, so llama.cpp can still read the output.
    passthrough: Vec<(String, Value)>,
    /// Tensor names and shapes (candle order), in file order.
    tensors: Vec<(String, Vec<usize>)>,
    /// The GGML block type each tensor is stored in, where the source has them
    /// (GGUF); `None` for a HF directory's float weights.
    stored_types: Vec<Option<BlockType>>,
    /// The scheme when none is asked for.
    default_quant: Quant,
    loader: TensorLoader,
    hashed_files: Vec<PathBuf>,
    extra_tensors: Vec<(String, QTensor)>,
}

fn gguf_source(path: &Path) -> Result<Source> {
    let g = GgufFile::open(path)?;
    let config = config_from_gguf(&g)?;
    // A `.zse` file can be converted again (e.g. to another precision).
    let tokenizer_json = match g.get_str(keys::TOKENIZER_JSON) {
        Some(t) => t.to_string(),
        None => tokenizer_json_from_gguf(&g)?,
    };
    let chat_template = g
        .get_str(keys::CHAT_TEMPLATE)
        .or_else(|| g.get_str("tokenizer.chat_template"))
        .map(str::to_string);
    let bos_token_id = g.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32);
    let add_bos_token = match g.get(keys::ADD_BOS_TOKEN) {
        Some(Value::Bool(b)) => *b,
        _ => adds_bos_token(&g),
    };
    let mut eos_token_ids: Vec<u32> = g
        .get_u64("tokenizer.ggml.eos_token_id")
        .map(|v| v as u32)
        .into_iter()
        .collect();
    if let Some(eot) = g.get_u64("tokenizer.ggml.eot_token_id") {
        if !eos_token_ids.contains(&(eot as u32)) {
            eos_token_ids.push(eot as u32);
        }
    }
    let passthrough = g
        .metadata
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("zse.") && *k != "general.alignment" && *k != "general.file_type"
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let tensors = g
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let stored_types = g.tensors.iter().map(|t| Some(t.dtype)).collect();
    let name = g.get_str("general.name").unwrap_or("model").to_string();
    Ok(Source {
        name,
        config,
        tokenizer_json,
        chat_template,
        bos_token_id,
        add_bos_token,
        eos_token_ids,
        passthrough,
        tensors,
        stored_types,
        default_quant: Quant::Keep,
        hashed_files: vec![path.to_path_buf()],
        loader: Box::new(move |n| match g.tensor_info(n) {
            Some(info) if info.dtype.candle().is_none() => {
                let bytes = g.tensor_bytes(info).to_vec();
                // Copied: the map's pages go, as `qtensor` lets them.
                g.release(info, 0..info.len);
                Ok(Stored::Bytes {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes,
                })
            }
            _ => g.qtensor(n, &Device::Cpu).map(Stored::Candle),
        }),
        extra_tensors: Vec::new(),
    })
}

fn hf_source(dir: &Path) -> Result<Source> {
    let hf = HfDir::open(dir)?;
    let c = hf.config.clone();
    let a = c.architecture.clone();
    let u32v = |v: usize| Value::U32(v as u32);
    let passthrough = vec![
        ("general.architecture".to_string(), Value::String(a.clone())),
        (format!("{a}.context_length"), u32v(c.context_length)),
        (format!("{a}.embedding_length"), u32v(c.hidden_size)),
        (format!("{a}.block_count"), u32v(c.num_layers)),
        (
            format!("{a}.feed_forward_length"),
            u32v(c.intermediate_size),
        ),
        (format!("{a}.attention.head_count"), u32v(c.num_heads)),
        (format!("{a}.attention.head_count_kv"), u32v(c.num_kv_heads)),
        (format!("{a}.rope.dimension_count"), u32v(c.head_dim)),
        (format!("{a}.rope.freq_base"), Value::F32(c.rope_theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps),
        ),
    ];
    let extra_tensors = match &hf.rope_factors {
        Some(f) => {
            let t = Tensor::from_slice(f, f.len(), &Device::Cpu)?;
            vec![(
                "rope_freqs.weight".to_string(),
                QTensor::quantize(&t, GgmlDType::F32)?,
            )]
        }
        None => Vec::new(),
    };
    let tensors = hf.tensors();
    Ok(Source {
        name: hf.name.clone(),
        config: c,
        tokenizer_json: hf.tokenizer_json.clone(),
        chat_template: hf.chat_template.clone(),
        bos_token_id: hf.bos_token_id,
        add_bos_token: hf.add_bos_token,
        eos_token_ids: hf.eos_token_ids.clone(),
        passthrough,
        stored_types: vec![None; tensors.len()],
        tensors,
        default_quant: Quant::Int4,
        hashed_files: hf.files.clone(),
        loader: Box::new(move |n| hf.load(n).map(Stored::Candle)),
        extra_tensors,
    })
}

fn sha256_of(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in files {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p.display(), e))?;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(p.display(), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The tensors `quant` would round a second time: stored in one quantized block type,
/// asked for another.
fn requantizations(
    tensors: &[(String, Vec<usize>)],
    stored_types: &[Option<BlockType>],
    quant: Quant,
) -> Vec<Requantized> {
    tensors
        .iter()
        .zip(stored_types)
        .filter_map(|((name, shape), stored)| {
            let from = (*stored)?;
            let to = quant.target(name, shape, from);
            (from.is_quantized() && to.is_quantized() && to != from).then(|| Requantized {
                name: name.clone(),
                from,
                to,
            })
        })
        .collect()
}

/// Converts `src` (a `.gguf`/`.zse` file or a HF directory) into `out`. `progress` is
/// called with (tensors done, tensors total, current tensor name); an error
/// from it aborts the conversion. The output is
/// written to a temporary file beside `out` and renamed at the end, so a failed
/// conversion never leaves a half-written model behind.
pub fn convert(
    src: &Path,
    out: &Path,
    options: ConvertOptions,
    progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
) -> Result<ConvertReport> {
    let source = if src.is_dir() {
        hf_source(src)?
    } else if src.is_file() {
        gguf_source(src)?
    } else {
        return Err(Error::io(
            src.display(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    };
    let quant = options.quant.unwrap_or(source.default_quant);
    // Check the tokenizer before spending minutes on tensors.
    tokenizers::Tokenizer::from_str(&source.tokenizer_json)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;

    // Check names and shapes before spending minutes on tensors.
    check_tensor_set(&source.config, &source.tensors)?;
    let requantized = requantizations(&source.tensors, &source.stored_types, quant);
    if let (Some(first), false) = (requantized.first(), options.allow_requantize) {
        return Err(Error::invalid_argument(
            "quant",
            format!(
                "'{}' would quantize {} already quantized tensor(s) again ({} {} -> {}{}), \
                 which loses precision; keep the file's block types (quant 'keep', the \
                 default for GGUF files) or allow it explicitly (--allow-requantize)",
                quant.name(),
                requantized.len(),
                first.name,
                first.from,
                first.to,
                if requantized.len() > 1 { ", ..." } else { "" },
            ),
        ));
    }
    let total = source.tensors.len();
    let mut tensors: Vec<(String, Stored)> = Vec::with_capacity(total + source.extra_tensors.len());
    // Each tensor's type in the source, recorded for `zse info`.
    let mut source_types = serde_json::Map::new();
    for (i, (name, _)) in source.tensors.iter().enumerate() {
        progress(i, total, name)?;
        let t = (source.loader)(name)?;
        source_types.insert(name.clone(), t.dtype().to_string().into());
        let t = match quant.candle_target(name, t.shape(), t.dtype()) {
            Some(target) if BlockType::from(target) != t.dtype() => {
                Stored::Candle(QTensor::quantize(&t.dequantize()?, target)?)
            }
            _ => t,
        };
        tensors.push((name.clone(), t));
    }
    progress(total, total, "")?;
    tensors.extend(
        source
            .extra_tensors
            .into_iter()
            .map(|(n, t)| (n, Stored::Candle(t))),
    );

    let sha = sha256_of(&source.hashed_files)?;
    let c = &source.config;
    let config_json = serde_json::to_string(c).map_err(|e| Error::Compute(e.to_string()))?;
    let source_name = src.display().to_string();
    let mut md: Vec<(String, Value)> = source.passthrough;
    md.retain(|(k, _)| k != keys::MODEL_NAME);
    let chat_template = source.chat_template.clone();
    md.extend([
        (
            keys::MODEL_NAME.to_string(),
            Value::String(source.name.clone()),
        ),
        (keys::FORMAT_VERSION.to_string(), Value::U32(FORMAT_VERSION)),
        (keys::CONFIG.to_string(), Value::String(config_json)),
        (
            keys::TOKENIZER_JSON.to_string(),
            Value::String(source.tokenizer_json),
        ),
        (
            keys::QUANTIZATION.to_string(),
            Value::String(quant.name().to_string()),
        ),
        (keys::SOURCE_NAME.to_string(), Value::String(source_name)),
        (keys::SOURCE_SHA256.to_string(), Value::String(sha.clone())),
        (
            keys::SOURCE_TENSOR_TYPES.to_string(),
            Value::String(serde_json::Value::Object(source_types).to_string()),
        ),
        (
            keys::CONVERTER_REVISION.to_string(),
            Value::U32(CONVERTER_REVISION),
        ),
        (
            keys::ADD_BOS_TOKEN.to_string(),
            Value::Bool(source.add_bos_token),
        ),
        (
            keys::ZSE_VERSION.to_string(),
            Value::String(env!("CARGO_PKG_VERSION").to_string()),
        ),
        (
            keys::EOS_TOKEN_IDS.to_string(),
            Value::Array(
                source
                    .eos_token_ids
                    .iter()
                    .map(|&i| Value::U32(i))
                    .collect(),
            ),
        ),
    ]);
    if let Some(t) = chat_template {
        md.push((keys::CHAT_TEMPLATE.to_string(), Value::String(t)));
    }
    if let Some(b) = source.bos_token_id {
        md.push((keys::BOS_TOKEN_ID.to_string(), Value::U32(b)));
    }

    let tmp = out.with_extension("zse.partial");
    let result = (|| -> Result<u64> {
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(tmp.display(), e))?;
        let mut w = std::io::BufWriter::new(f);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let data = tensors
            .iter()
            .map(|(k, t)| t.data(k))
            .collect::<Result<Vec<_>>>()?;
        gguf_write::write(&mut w, &md_refs, &data)?;
        w.flush().map_err(|e| Error::io(tmp.display(), e))?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io(tmp.display(), e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(tmp.display(), e))?;
        Ok(f.metadata().map_err(|e| Error::io(tmp.display(), e))?.len())
    })();
    let bytes = match result {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out.display(), e))?;
    Ok(ConvertReport {
        output: out.to_path_buf(),
        tensors: tensors.len(),
        bytes,
        quantization: quant.name().to_string(),
        source_sha256: sha,
        requantized,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_targets() {
        use GgmlDType::*;
        assert_eq!(
            Quant::Int4.target("blk.0.attn_q.weight", &[576, 576], Q8_0),
            Q4_1
        );
        assert_eq!(
            Quant::Int4.target("blk.0.ffn_down.weight", &[576, 1536], F32),
            Q4K
        );
        assert_eq!(
            Quant::Int4.target("token_embd.weight", &[100, 64], F32),
            Q8_0
        );
        assert_eq!(Quant::Int8.target("x", &[4, 48], F32), F16);
        assert_eq!(Quant::Keep.target("x", &[4, 64], Q4_1), Q4_1);
        assert_eq!(
            Quant::Fp16.target("blk.0.attn_norm.weight", &[64], F32),
            F32
        );
        assert_eq!(
            Quant::Blocks(Q4_1).target("blk.0.ffn_down.weight", &[576, 1536], F32),
            Q4_1
        );
        assert_eq!(
            Quant::Blocks(Q4_1).target("token_embd.weight", &[100, 64], F32),
            Q8_0
        );
        assert_eq!("q4_k".parse::<Quant>().unwrap(), Quant::Blocks(Q4K));
        assert!("int3".parse::<Quant>().is_err());
    }

    fn requantized(
        tensors: &[(&str, &[usize], Option<GgmlDType>)],
        quant: Quant,
    ) -> Vec<Requantized> {
        let names: Vec<_> = tensors
            .iter()
            .map(|(n, s, _)| (n.to_string(), s.to_vec()))
            .collect();
        let types: Vec<_> = tensors
            .iter()
            .map(|(_, _, t)| t.map(BlockType::from))
            .collect();
        requantizations(&names, &types, quant)
    }

    #[test]
    fn only_quantized_to_another_quantized_type_counts_as_requantizing() {
        use GgmlDType::*;
        let s: &[(&str, &[usize], Option<GgmlDType>)] = &[
            ("token_embd.weight", &[100, 64], Some(Q8_0)),
            ("blk.0.attn_q.weight", &[64, 64], Some(Q4_1)),
            ("blk.0.ffn_down.weight", &[64, 256], Some(Q4_1)),
            ("blk.0.attn_norm.weight", &[64], Some(F32)),
        ];
        assert!(requantized(s, Quant::Keep).is_empty());
        // Widening to floats rounds nothing again.
        assert!(requantized(s, Quant::Fp16).is_empty());
        // int4: attn_q stays Q4_1 and the embedding Q8_0; ffn_down would become Q4_K.
        let r = requantized(s, Quant::Int4);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].name.as_str(), r[0].from, r[0].to),
            ("blk.0.ffn_down.weight", Q4_1.into(), Q4K.into())
        );
        let names: Vec<_> = requantized(s, Quant::Int8)
            .into_iter()
            .map(|q| q.name)
            .collect();
        assert_eq!(names, ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]);
        // Float sources (a HF directory) are never requantized.
        let hf: &[(&str, &[usize], Option<GgmlDType>)] =
            &[("blk.0.attn_q.weight", &[64, 64], None)];
        assert!(requantized(hf, Quant::Int4).is_empty());
    }
}

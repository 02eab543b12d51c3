//! Reads a Hugging Face model directory: `config.json`, `*.safetensors`,
//! `tokenizer.json` and `tokenizer_config.json` (plus `generation_config.json` when
//! present), and maps its tensors onto GGUF names and conventions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::model::config::{llama3_rope_factors, ModelConfig, RopeStyle};

/// A tensor found in one of the safetensors files.
struct Entry {
    file: usize,
    hf_name: String,
    shape: Vec<usize>,
}

pub struct HfDir {
    dir: PathBuf,
    maps: Vec<memmap2::Mmap>,
    entries: BTreeMap<String, Entry>,
    pub config: ModelConfig,
    pub rope_factors: Option<Vec<f32>>,
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub eos_token_ids: Vec<u32>,
    pub name: String,
    /// The files whose bytes identify the source (hashed for provenance).
    pub files: Vec<PathBuf>,
}

/// Whether the tokenizer's post-processor puts `bos` before a single text (as Llama 3's
/// `tokenizer.json` does where `tokenizer_config.json` does not say `add_bos_token`).
fn post_processor_adds(tokenizer: &tokenizers::Tokenizer, bos: u32) -> bool {
    tokenizer
        .post_process(tokenizers::Encoding::default(), None, true)
        .is_ok_and(|e| e.get_ids().first() == Some(&bos))
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::invalid_file(path.display(), format!("not valid JSON: {e}")))
}

/// GGUF name for a HF tensor name, or None for tensors ZSE ignores.
fn gguf_name(hf: &str) -> Result<Option<String>> {
    if hf.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    let simple = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Ok(Some(s.to_string()));
    }
    let unsupported =
        || Error::Unsupported(format!("unexpected tensor '{hf}' in the safetensors files"));
    let rest = hf.strip_prefix("model.layers.").ok_or_else(unsupported)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unsupported)?;
    let layer: usize = layer.parse().map_err(|_| unsupported())?;
    let (module, kind) = rest.rsplit_once('.').ok_or_else(unsupported)?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return Err(unsupported()),
    };
    Ok(Some(format!("blk.{layer}.{short}.{kind}")))
}

/// A special token given as a string or as an AddedToken object.
fn token_content(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

impl HfDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let shown = dir.display().to_string();
        let config_json = read_json(&dir.join("config.json"))?;
        let config = ModelConfig::from_hf_config(&config_json)?;
        let rope_factors = llama3_rope_factors(
            config.head_dim,
            config.rope_theta,
            &config_json["rope_scaling"],
        );
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_json =
            std::fs::read_to_string(&tok_path).map_err(|e| Error::io(tok_path.display(), e))?;
        let tokenizer = tokenizer_json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| Error::invalid_file(tok_path.display(), e))?;
        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config = if tok_config_path.exists() {
            read_json(&tok_config_path)?
        } else {
            Json::Null
        };
        let chat_template = match &tok_config["chat_template"] {
            Json::String(s) => Some(s.clone()),
            Json::Array(items) => items
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let id_of = |v: &Json| token_content(v).and_then(|t| tokenizer.token_to_id(t));
        let bos_token_id = id_of(&tok_config["bos_token"]);
        let add_bos_token = match &tok_config["add_bos_token"] {
            Json::Bool(b) => *b,
            _ => bos_token_id.is_some_and(|bos| post_processor_adds(&tokenizer, bos)),
        };
        let mut eos_token_ids: Vec<u32> = id_of(&tok_config["eos_token"]).into_iter().collect();
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen = read_json(&gen_path)?;
            let ids = match &gen["eos_token_id"] {
                Json::Number(n) => n.as_u64().into_iter().collect(),
                Json::Array(a) => a.iter().filter_map(Json::as_u64).collect(),
                _ => Vec::new(),
            };
            for id in ids {
                if !eos_token_ids.contains(&(id as u32)) {
                    eos_token_ids.push(id as u32);
                }
            }
        }

        let mut st_files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(&shown, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        st_files.sort();
        if st_files.is_empty() {
            return Err(Error::invalid_file(
                &shown,
                "no *.safetensors files in the model directory",
            ));
        }
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        for (i, path) in st_files.iter().enumerate() {
            let f = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
            // SAFETY: read-only private map of a file we only read.
            let map =
                unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path.display(), e))?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| Error::invalid_file(path.display(), e))?;
            for (name, view) in st.tensors() {
                if let Some(g) = gguf_name(&name)? {
                    let shape = view.shape().to_vec();
                    entries.insert(
                        g,
                        Entry {
                            file: i,
                            hf_name: name,
                            shape,
                        },
                    );
                }
            }
            maps.push(map);
        }
        if config.tied_embeddings {
            entries.remove("output.weight");
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let mut files = vec![dir.join("config.json"), tok_path];
        files.extend(st_files);
        Ok(Self {
            dir: dir.to_path_buf(),
            maps,
            entries,
            config,
            rope_factors,
            tokenizer_json,
            chat_template,
            bos_token_id,
            add_bos_token,
            eos_token_ids,
            name,
            files,
        })
    }

    /// GGUF names and shapes of the tensors found, in a stable order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.entries
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone()))
            .collect()
    }

    /// Loads a tensor in GGUF conventions: q/k rows permuted for interleaved RoPE,
    /// kept in its stored float type (F32, F16 or BF16).
    pub fn load(&self, gguf_name: &str) -> Result<QTensor> {
        let entry = self
            .entries
            .get(gguf_name)
            .ok_or_else(|| Error::Unsupported(format!("tensor '{gguf_name}' is missing")))?;
        let path = self.dir.display();
        let st = safetensors::SafeTensors::deserialize(&self.maps[entry.file])
            .map_err(|e| Error::invalid_file(&path, e))?;
        let view = st
            .tensor(&entry.hf_name)
            .map_err(|e| Error::invalid_file(&path, e))?;
        let (dtype, gdtype) = match view.dtype() {
            safetensors::Dtype::F32 => (DType::F32, GgmlDType::F32),
            safetensors::Dtype::F16 => (DType::F16, GgmlDType::F16),
            safetensors::Dtype::BF16 => (DType::BF16, GgmlDType::BF16),
            other => {
                return Err(Error::Unsupported(format!(
                    "tensor '{}' has dtype {other:?}",
                    entry.hf_name
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        let c = &self.config;
        let heads = if gguf_name.contains(".attn_q.") {
            Some(c.num_heads)
        } else if gguf_name.contains(".attn_k.") {
            Some(c.num_kv_heads)
        } else {
            None
        };
        let t = match heads {
            Some(h) if c.rope_style == RopeStyle::Interleaved => {
                permute_for_interleaved_rope(&t, h)?
            }
            _ => t,
        };
        let gdtype = if t.rank() < 2 { GgmlDType::F32 } else { gdtype };
        Ok(QTensor::quantize(&t.to_dtype(DType::F32)?, gdtype)?)
    }
}

/// HF stores q/k rows so that RoPE pairs dimension i with i + d/2; GGUF Llama files
/// reorder them so that pairs are adjacent. Same permutation llama.cpp's converter applies.
pub fn permute_for_interleaved_rope(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::Unsupported(format!(
            "cannot split {rows} rows into {heads} rotary heads"
        )));
    }
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias")
                .unwrap()
                .unwrap(),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight")
                .unwrap()
                .unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")
            .unwrap()
            .is_none());
        assert!(gguf_name("vision_tower.weight").is_err());
    }

    #[test]
    fn permutation_makes_rotary_pairs_adjacent() {
        // One head of dim 4: rows [a0, a1, b0, b1] (pairs (a0,b0), (a1,b1)) become [a0, b0, a1, b1].
        let t = Tensor::new(&[[0f32], [1.], [2.], [3.]], &Device::Cpu).unwrap();
        let p = permute_for_interleaved_rope(&t, 1).unwrap();
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3.]
        );
    }
}

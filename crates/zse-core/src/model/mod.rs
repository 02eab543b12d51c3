//! Model architectures. The Llama family (Llama, Mistral, SmolLM, Qwen2) shares one
//! implementation; `ModelConfig` carries the differences.

pub mod attention;
pub mod config;
pub mod cpu_ops;
pub mod llama;

pub use config::{ModelConfig, RopeStyle};
pub use llama::{Backend, BatchItem, Llama, Logits};

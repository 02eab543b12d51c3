//! Model files: the `.zse` container (GGUF + `zse.*` keys), reading GGUF safely,
//! and converting GGUF files and HF directories into `.zse`.

pub mod block_type;
pub mod convert;
pub mod fuzz;
pub mod gguf;
pub mod gguf_config;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod hf;
pub mod zse;

pub use block_type::BlockType;
pub use convert::{convert, ConvertOptions, ConvertReport, Quant, Requantized, CONVERTER_REVISION};
pub use zse::ZseFile;

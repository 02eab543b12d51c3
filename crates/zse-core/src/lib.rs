//! ZSE's engine core: pure Rust, no Python.
//!
//! - [`format`]: the `.zse` file (a GGUF container) and conversion into it;
//! - [`model`]: the Llama-family transformer on candle;
//! - [`kernels`]: quantized matmul kernels for the CPU, chosen at run time;
//! - [`kv`]: the block KV cache and its prefix index;
//! - [`sample`]: logits processing and token choice;
//! - [`sched`]: the scheduler (token budget, chunked prefill, admission, preemption);
//! - [`text`]: tokenizer, chat template, detokenization, stop strings;
//! - [`grammar`]: constrained decoding (structured outputs);
//! - [`engine`]: the engine thread that ties them together;
//! - [`device`]: CPU or GPU, and a GPU's memory.

pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub mod grammar;
pub mod heap;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod sample;
pub mod sched;
pub mod text;

pub use engine::{
    Engine, EngineLimits, EngineOptions, Event, EventSink, FinishReason, GenerationRequest,
    ModelInfo, Usage,
};
pub use error::{Error, Result};
pub use sample::SamplingParams;

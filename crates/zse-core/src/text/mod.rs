//! Text in and out of the model: tokenizer, chat template, incremental
//! detokenization and stop-string matching.

mod bpe_json;
pub mod detok;
mod pyjson;
pub mod stop;
pub mod template;
pub mod tokenizer;

pub use detok::IncrementalDecoder;
pub use stop::StopMatcher;
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;

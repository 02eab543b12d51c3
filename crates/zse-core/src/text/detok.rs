//! Incremental detokenization: turns a growing list of token ids into text deltas
//! without ever emitting half a UTF-8 character. Byte-level BPE tokens can end in
//! the middle of a character; the decoder then yields U+FFFD, so the delta is held
//! until a later token completes the character.

use super::tokenizer::Tokenizer;
use crate::error::Result;

#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that is decoded again for context (leading-space rules).
    prefix_offset: usize,
    /// Tokens before this index have been turned into emitted text.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = match full.get(prefix.len()..) {
            Some(d) if full.starts_with(&prefix) => d.to_string(),
            // A decoder that rewrote earlier text: emit what is new by character count.
            _ => full.chars().skip(prefix.chars().count()).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Text of tokens not yet emitted (at the end of generation), lossy if it ends
    /// in an incomplete character.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.chars().skip(prefix.chars().count()).collect())
    }
}

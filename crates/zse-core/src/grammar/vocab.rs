//! The model's vocabulary as the grammar engine sees it: every token's bytes in a
//! trie (special tokens marked, so that no grammar emits them as text), and the
//! model's own tokenizer for the text a grammar forces.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{Error, Result};
use crate::text::Tokenizer;

pub(super) struct Vocab {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl Vocab {
    /// The trie of `tokenizer`'s tokens over the model's `vocab_size` logits (ids the
    /// tokenizer does not name are never allowed); `eos` is what a grammar allows
    /// once the output is complete.
    pub(super) fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos: u32) -> Result<Self> {
        let doc = tokenizer.vocab_document();
        // llguidance's reader asserts on malformed byte tokens: a panic there is a
        // vocabulary it cannot read, not a crash.
        let words = std::panic::catch_unwind(AssertUnwindSafe(|| {
            llguidance::token_bytes_from_tokenizer_json(&doc)
        }))
        .map_err(|_| unreadable("a malformed byte token"))?
        .map_err(unreadable)?;
        if words.len() > vocab_size {
            return Err(unreadable(format!(
                "{} tokens, more than the model's {vocab_size}",
                words.len()
            )));
        }
        let mut words = words;
        words.resize(vocab_size, Vec::new());
        let info = TokRxInfo::new(vocab_size as u32, eos);
        Ok(Self {
            trie: TokTrie::from(&info, &words),
            tokenizer,
        })
    }
}

fn unreadable(why: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!(
        "the tokenizer does not give every token's bytes: {why}"
    ))
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // The bytes a grammar forces can end inside a character: the text goes to
        // the model's tokenizer, the broken tail byte by byte through the trie (a
        // lossy conversion would force U+FFFD's bytes instead). An encoding
        // failure just forces nothing.
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text).unwrap_or_default()
        })
    }
}

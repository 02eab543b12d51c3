//! The model's tokenizer: the `tokenizers` crate on the embedded `tokenizer.json`.

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The BOS token prompts start with, where the model file asks for one.
    prompt_bos: Option<u32>,
}

impl Tokenizer {
    pub fn from_json(json: &str) -> Result<Self> {
        // BPE documents (every GGUF vocabulary) the fast way; others as the crate reads.
        let inner = match super::bpe_json::read(json) {
            Some(read) => read.map_err(Error::Tokenizer)?,
            None => json
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| Error::Tokenizer(e.to_string()))?,
        };
        Ok(Self {
            inner,
            prompt_bos: None,
        })
    }

    /// Makes `encode_prompt` start every prompt with `bos` (the model file's
    /// `add_bos_token`).
    pub fn with_prompt_bos(mut self, bos: Option<u32>) -> Self {
        self.prompt_bos = bos;
        self
    }

    /// Token ids for `text`. Special tokens written in the text (`<|im_start|>`) are
    /// recognised; nothing (no BOS) is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids the model is fed for a prompt: `encode`, with the BOS the model asks
    /// for put first unless the text already starts with it (a chat template that
    /// writes `bos_token` itself), so it is never doubled. As llama.cpp's server does.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let Some(bos) = self.prompt_bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let n = self.vocab_size();
        match ids.iter().find(|&&i| i as usize >= n) {
            Some(bad) => Err(Error::invalid_argument(
                "token_ids",
                format!("token id {bad} is outside the vocabulary (size {n})"),
            )),
            None => Ok(()),
        }
    }

    /// The tokenization model's name as `tokenizer.json` gives it (`BPE`, ...).
    pub fn model_type(&self) -> &'static str {
        use tokenizers::models::ModelWrapper;
        match self.inner.get_model() {
            ModelWrapper::BPE(_) => "BPE",
            ModelWrapper::WordPiece(_) => "WordPiece",
            ModelWrapper::WordLevel(_) => "WordLevel",
            ModelWrapper::Unigram(_) => "Unigram",
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is an added special token (never shown in generated text).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// What each token stands for, in `tokenizer.json`'s own terms: the decoder,
    /// the added tokens and the model's vocabulary (no merges). The grammar engine
    /// reads the bytes of every token from it.
    pub fn vocab_document(&self) -> serde_json::Value {
        let added: Vec<serde_json::Value> = (self.inner.get_added_tokens_decoder().iter())
            .map(
                |(id, t)| serde_json::json!({"id": id, "content": t.content, "special": t.special}),
            )
            .collect();
        serde_json::json!({
            "decoder": self.inner.get_decoder(),
            "added_tokens": added,
            "model": {"vocab": self.inner.get_vocab(false)},
        })
    }
}

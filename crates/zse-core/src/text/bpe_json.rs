//! A BPE `tokenizer.json` read straight into the `tokenizers` crate's parts.
//!
//! The crate's own reader takes any model type, so it first buffers the whole model as
//! generic JSON values (twice: an untagged enum, then a flattened struct) and converts
//! those. For a BPE vocabulary the size of Gemma's (262k tokens, 513k merges) that is
//! most of a second and some 250 MiB of short-lived allocations at every load. Here
//! the document is read once with the parts typed: the vocabulary into the model's own
//! map, merges one by one (either JSON form), everything else with the crate's own
//! types; then the tokenizer is assembled as the crate's reader assembles it (model,
//! then added tokens, which take the model's ids). A document this does not read (its
//! model not BPE, or malformed) is left to the crate's reader, which reports what is
//! wrong in its own words.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams,
    PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder, TruncationParams,
};

/// The parts of a `tokenizer.json` the tokenizer is built from.
#[derive(Deserialize)]
struct Document {
    model: Model,
    #[serde(default)]
    normalizer: Option<NormalizerWrapper>,
    #[serde(default)]
    pre_tokenizer: Option<PreTokenizerWrapper>,
    #[serde(default)]
    post_processor: Option<PostProcessorWrapper>,
    #[serde(default)]
    decoder: Option<DecoderWrapper>,
    #[serde(default)]
    truncation: Option<TruncationParams>,
    #[serde(default)]
    padding: Option<PaddingParams>,
    /// Tokens beside the model's vocabulary (their `id`s are the model's or the
    /// next free ones, so they are not read: adding them assigns the same).
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

/// A BPE model's fields (`type` other than "BPE" fails the read).
#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type")]
    kind: String,
    vocab: Vocab,
    merges: Vec<Merge>,
    #[serde(default)]
    dropout: Option<f32>,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    fuse_unk: Option<bool>,
    #[serde(default)]
    byte_fallback: Option<bool>,
    #[serde(default)]
    ignore_merges: Option<bool>,
}

/// One merge, as a pair `["a", "b"]` or in the older form `"a b"`.
struct Merge(String, String);

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MergeVisitor;
        impl<'de> Visitor<'de> for MergeVisitor {
            type Value = Merge;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge: [left, right] or \"left right\"")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Merge, E> {
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| E::custom(format!("merge {s:?} has no space")))?;
                Ok(Merge(a.to_owned(), b.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                let a = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let b = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Merge(a, b))
            }
        }
        d.deserialize_any(MergeVisitor)
    }
}

/// The tokenizer `json` describes, if this reads it (else `None`); an error for a BPE
/// document that does not hold together (a merge of tokens not in the vocabulary).
pub fn read(json: &str) -> Option<Result<tokenizers::Tokenizer, String>> {
    let doc: Document = serde_json::from_str(json).ok()?;
    if doc.model.kind != "BPE" {
        return None;
    }
    Some(build(doc))
}

fn build(doc: Document) -> Result<tokenizers::Tokenizer, String> {
    let m = doc.model;
    let merges = m.merges.into_iter().map(|Merge(a, b)| (a, b)).collect();
    let mut bpe = BPE::builder().vocab_and_merges(m.vocab, merges);
    if let Some(p) = m.dropout {
        bpe = bpe.dropout(p);
    }
    if let Some(unk) = m.unk_token {
        bpe = bpe.unk_token(unk);
    }
    if let Some(prefix) = m.continuing_subword_prefix {
        bpe = bpe.continuing_subword_prefix(prefix);
    }
    if let Some(suffix) = m.end_of_word_suffix {
        bpe = bpe.end_of_word_suffix(suffix);
    }
    if let Some(v) = m.fuse_unk {
        bpe = bpe.fuse_unk(v);
    }
    if let Some(v) = m.byte_fallback {
        bpe = bpe.byte_fallback(v);
    }
    if let Some(v) = m.ignore_merges {
        bpe = bpe.ignore_merges(v);
    }
    let model = bpe.build().map_err(|e| e.to_string())?;
    let built = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(model.into())
    .with_normalizer(doc.normalizer)
    .with_pre_tokenizer(doc.pre_tokenizer)
    .with_post_processor(doc.post_processor)
    .with_decoder(doc.decoder)
    .with_truncation(doc.truncation)
    .with_padding(doc.padding)
    .build()
    .map_err(|e| e.to_string())?;
    let mut tokenizer = tokenizers::Tokenizer::from(built);
    tokenizer
        .add_tokens(doc.added_tokens)
        .map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small byte-fallback BPE with an added special token, in both merge forms.
    fn document(merges: &str) -> String {
        format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{{"id": 5, "content": "<s>", "single_word": false, "lstrip": false,
              "rstrip": false, "normalized": false, "special": true}}],
            "normalizer": {{"type": "Replace", "pattern": {{"String": " "}}, "content": "_"}},
            "pre_tokenizer": null, "post_processor": null,
            "decoder": {{"type": "Replace", "pattern": {{"String": "_"}}, "content": " "}},
            "model": {{"type": "BPE", "dropout": null, "unk_token": null,
              "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
              "byte_fallback": false, "ignore_merges": false,
              "vocab": {{"a": 0, "b": 1, "_": 2, "ab": 3, "_ab": 4, "<s>": 5}},
              "merges": {merges}}}}}"#
        )
    }

    #[test]
    fn reads_as_the_crates_own_reader_does() {
        for merges in [r#"[["a", "b"], ["_", "ab"]]"#, r#"["a b", "_ ab"]"#] {
            let json = document(merges);
            let ours = read(&json).expect("a BPE document").expect("valid");
            let theirs: tokenizers::Tokenizer = json.parse().expect("valid");
            for text in [" ab", "ab<s> ab b", "<s>", "ba a"] {
                let (a, b) = (
                    ours.encode(text, false).unwrap(),
                    theirs.encode(text, false).unwrap(),
                );
                assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
                assert_eq!(
                    ours.decode(a.get_ids(), false).unwrap(),
                    theirs.decode(b.get_ids(), false).unwrap()
                );
            }
            assert_eq!(ours.encode(" ab<s>", false).unwrap().get_ids(), [4, 5]);
            assert_eq!(ours.get_vocab_size(true), theirs.get_vocab_size(true));
        }
    }

    #[test]
    fn other_models_and_broken_documents_are_told_apart() {
        let wordpiece = r###"{"model": {"type": "WordPiece", "unk_token": "[UNK]",
            "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
            "vocab": {"[UNK]": 0}}}"###;
        assert!(read(wordpiece).is_none());
        let unknown_token = document(r#"[["a", "zz"]]"#);
        assert!(matches!(read(&unknown_token), Some(Err(_))));
        let three = document(r#"[["a", "b", "c"]]"#);
        assert!(read(&three).is_none());
    }
}

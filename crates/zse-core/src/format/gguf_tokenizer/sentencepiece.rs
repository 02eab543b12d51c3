//! SentencePiece BPE (`tokenizer.ggml.model = llama`: Gemma, Llama 2, Mistral v0.1).
//!
//! The GGUF gives each token a score instead of a merge list. llama.cpp (like
//! SentencePiece) splits the text into characters and keeps joining the adjacent pair
//! whose join is the highest-scoring token, leftmost first; characters that are not
//! tokens become their UTF-8 bytes (`<0xNN>` tokens). Spaces are `▁`, and a space is
//! put before the text where the file says so (`tokenizer.ggml.add_space_prefix`).
//!
//! BPE with merges ranked by the score of the token they make is the same algorithm,
//! so this writes the merges out (every split of a token into two tokens, best score
//! first, as `transformers` does for GGUF files) and the `tokenizers` crate runs it.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use super::{document, token_type, Vocab};

const SPACE: &str = "\u{2581}";

/// Every way to make a normal token from two normal tokens, in the order BPE must
/// try them: the made token's score, best first (ties by id, then by split point).
fn merges<'a>(vocab: &Vocab<'a>, scores: &[f32]) -> Vec<(&'a str, &'a str)> {
    let normal: HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == token_type::NORMAL)
        .map(|(id, (&tok, _))| (tok, id))
        .collect();
    let mut found: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (&tok, &id) in &normal {
        for (split, _) in tok.char_indices().skip(1) {
            let (left, right) = tok.split_at(split);
            if normal.contains_key(left) && normal.contains_key(right) {
                found.push((scores[id], id, left, right));
            }
        }
    }
    // Stable after sorting by (score, id): a token's splits stay in split-point order.
    found.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.len().cmp(&b.2.len()))
    });
    found.into_iter().map(|(_, _, l, r)| (l, r)).collect()
}

/// The tokenizer for a SentencePiece vocabulary with its per-token `scores`.
pub(super) fn tokenizer(
    vocab: &Vocab,
    scores: &[f32],
    add_space_prefix: bool,
    unk: Option<&str>,
) -> Json {
    let escape = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, escape]})
    } else {
        escape
    };
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true,
        "ignore_merges": false, "vocab": vocab.json_vocab(), "merges": merges(vocab, scores),
    });
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    document(
        vocab,
        normalizer,
        Json::Null,
        model,
        json!({"type": "Sequence", "decoders": decoders}),
    )
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    struct Spm {
        tokens: Vec<String>,
        types: Vec<i64>,
        scores: Vec<f32>,
    }

    impl Spm {
        fn vocab(&self) -> Vocab<'_> {
            Vocab {
                tokens: self.tokens.iter().map(String::as_str).collect(),
                types: self.types.clone(),
            }
        }

        fn id(&self, text: &str) -> Option<u32> {
            self.tokens.iter().position(|t| t == text).map(|i| i as u32)
        }

        fn tokenizer(&self, add_space_prefix: bool) -> tokenizers::Tokenizer {
            let json = tokenizer(&self.vocab(), &self.scores, add_space_prefix, Some("<unk>"));
            json.to_string().parse().expect("tokenizer.json")
        }

        /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on one text fragment,
        /// written plainly: join the best-scoring adjacent pair (leftmost on ties)
        /// until no join is a token, then spell out non-tokens as bytes.
        fn reference(&self, fragment: &str) -> Vec<u32> {
            let mut symbols: Vec<String> = fragment.chars().map(String::from).collect();
            loop {
                let mut best: Option<(f32, usize)> = None;
                for i in 0..symbols.len().saturating_sub(1) {
                    let joined = format!("{}{}", symbols[i], symbols[i + 1]);
                    if let Some(id) = self.id(&joined) {
                        let s = self.scores[id as usize];
                        if best.is_none_or(|(b, _)| s > b) {
                            best = Some((s, i));
                        }
                    }
                }
                let Some((_, i)) = best else { break };
                let right = symbols.remove(i + 1);
                symbols[i].push_str(&right);
            }
            let mut out = Vec::new();
            for s in symbols {
                match self.id(&s) {
                    Some(id) => out.push(id),
                    None => out.extend(
                        s.bytes()
                            .map(|b| self.id(&format!("<0x{b:02X}>")).expect("byte token")),
                    ),
                }
            }
            out
        }
    }

    /// A vocabulary over a few characters (one of them, `é`, left out so that it falls
    /// back to bytes): the control tokens, 256 byte tokens, single characters and
    /// random longer pieces, each with its own score; user-defined runs of spaces.
    fn random_spm(rng: &mut ChaCha8Rng) -> Spm {
        let mut spm = Spm {
            tokens: vec![
                "<pad>".into(),
                "<eos>".into(),
                "<bos>".into(),
                "<unk>".into(),
            ],
            types: vec![token_type::CONTROL; 3],
            scores: vec![-1000.0; 4],
        };
        spm.types.push(token_type::UNKNOWN);
        for b in 0..=255u8 {
            spm.tokens.push(format!("<0x{b:02X}>"));
            spm.types.push(token_type::BYTE);
            spm.scores.push(0.0);
        }
        for run in ["  ", "   "] {
            spm.tokens.push(run.into());
            spm.types.push(token_type::USER_DEFINED);
            spm.scores.push(-1000.0);
        }
        let alphabet = ['a', 'b', 'c', '▁'];
        for c in alphabet {
            spm.tokens.push(c.to_string());
        }
        while spm.tokens.len() < 300 {
            let len = rng.random_range(2..6);
            let piece: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if !spm.tokens.contains(&piece) {
                spm.tokens.push(piece);
            }
        }
        let first_normal = spm.types.len();
        let mut scores: Vec<f32> = (0..spm.tokens.len() - first_normal)
            .map(|i| -(i as f32))
            .collect();
        for i in (1..scores.len()).rev() {
            scores.swap(i, rng.random_range(0..=i));
        }
        spm.types.resize(spm.tokens.len(), token_type::NORMAL);
        spm.scores.extend(scores);
        spm
    }

    #[test]
    fn tokenizes_as_llama_cpp_does() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..20 {
            let spm = random_spm(&mut rng);
            let tok = spm.tokenizer(false);
            for _ in 0..50 {
                let len = rng.random_range(1..40);
                let text: String = (0..len)
                    .map(|_| ['a', 'b', 'c', ' ', 'é'][rng.random_range(0..5)])
                    .collect();
                // Runs of two or three spaces are user-defined tokens, split out first.
                let mut want = Vec::new();
                for (i, part) in text.split("   ").enumerate() {
                    if i > 0 {
                        want.push(spm.id("   ").unwrap());
                    }
                    for (j, part) in part.split("  ").enumerate() {
                        if j > 0 {
                            want.push(spm.id("  ").unwrap());
                        }
                        if !part.is_empty() {
                            want.extend(spm.reference(&part.replace(' ', SPACE)));
                        }
                    }
                }
                let got = tok.encode(text.as_str(), false).unwrap();
                assert_eq!(got.get_ids(), want, "text {text:?}");
                assert_eq!(tok.decode(&want, true).unwrap(), text);
            }
        }
    }

    #[test]
    fn merges_follow_scores_not_position() {
        // "abc": "bc" scores better than "ab", so SentencePiece makes a + bc.
        let spm = Spm {
            tokens: ["<unk>", "a", "b", "c", "ab", "bc"]
                .map(String::from)
                .to_vec(),
            types: vec![token_type::UNKNOWN, 1, 1, 1, 1, 1],
            scores: vec![0.0, -1.0, -2.0, -3.0, -5.0, -4.0],
        };
        let tok = spm.tokenizer(false);
        assert_eq!(tok.encode("abc", false).unwrap().get_ids(), [1, 5]);
        assert_eq!(spm.reference("abc"), [1, 5]);
    }

    #[test]
    fn space_prefix_is_added_and_stripped() {
        let spm = Spm {
            tokens: ["<unk>", "<s>", "▁", "h", "i", "hi", "▁hi"]
                .map(String::from)
                .to_vec(),
            types: vec![token_type::UNKNOWN, token_type::CONTROL, 1, 1, 1, 1, 1],
            scores: vec![0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
        };
        let tok = spm.tokenizer(true);
        // As llama.cpp: a space before the text and after every special token.
        let ids = tok.encode("hi<s>hi hi", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [6, 1, 6, 6]);
        assert_eq!(tok.decode(&[6, 6], true).unwrap(), "hi hi");
    }
}

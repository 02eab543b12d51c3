//! Constrained decoding: output held to a grammar (OpenAI's `response_format`) by
//! masking, at every step, the logits of each token the grammar forbids next. The
//! grammar engine is `llguidance`; its token trie is built once per model, on the
//! first request that needs it, and each choice of each request gets a matcher of
//! its own, so a sequence's mask never depends on what else runs beside it.
//!
//! - `vocab`: the model's tokens as bytes, for the grammar engine.

mod vocab;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::text::Tokenizer;
use vocab::Vocab;

/// The parameter a grammar's errors name (OpenAI's).
const PARAM: &str = "response_format";

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// JSON valid against this JSON Schema (OpenAI's `json_schema`).
    JsonSchema(Value),
    /// A llguidance Lark grammar (ZSE's `{"type": "lark", "lark": ..., "param": ...}`,
    /// for `zse.Engine`): what tool calls in a template's own markup and thoughts
    /// before an answer need, text around JSON (`%json {schema}` embeds one).
    /// `param` is the request field it was made from, which its errors name
    /// (`tools` for a call grammar; default `response_format`).
    Lark { grammar: String, param: String },
}

impl Grammar {
    /// The grammar an OpenAI `response_format` object asks for: None for `text`.
    pub fn from_response_format(v: &Value) -> Result<Option<Self>> {
        let bad = |why: &str| Error::invalid_argument(PARAM, why);
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Grammar::JsonObject)),
            Some("json_schema") => {
                let spec = v
                    .get("json_schema")
                    .ok_or_else(|| bad("type 'json_schema' needs a 'json_schema' object"))?;
                match spec.get("schema") {
                    Some(s @ Value::Object(_)) => Ok(Some(Grammar::JsonSchema(s.clone()))),
                    Some(_) => Err(bad("'json_schema.schema' must be an object")),
                    None => Err(bad("'json_schema.schema' is required")),
                }
            }
            Some("lark") => {
                let param = match v.get("param") {
                    None => PARAM,
                    Some(Value::String(p)) => p.as_str(),
                    Some(_) => return Err(bad("'param' must be a string")),
                };
                match v.get("lark") {
                    Some(Value::String(g)) => Ok(Some(Grammar::Lark {
                        grammar: g.clone(),
                        param: param.to_string(),
                    })),
                    _ => Err(bad("type 'lark' needs a 'lark' grammar string")),
                }
            }
            Some(other) => Err(bad(&format!(
                "unknown type {other:?} (expected 'text', 'json_object' or 'json_schema')"
            ))),
            None => Err(bad("needs a 'type'")),
        }
    }

    /// The request field this grammar's errors name.
    pub fn param(&self) -> &str {
        match self {
            Grammar::Lark { param, .. } => param,
            _ => PARAM,
        }
    }

    fn to_llguidance(&self) -> Result<TopLevelGrammar> {
        let mut schema = match self {
            Grammar::JsonObject => serde_json::json!({"type": "object"}),
            Grammar::JsonSchema(s) => s.clone(),
            Grammar::Lark { grammar, .. } => {
                return Ok(TopLevelGrammar::from_lark(grammar.clone()))
            }
        };
        let Some(fields) = schema.as_object_mut() else {
            return Err(Error::invalid_argument(
                PARAM,
                "the JSON schema must be an object",
            ));
        };
        // Whitespace is fixed, as Python's `json.dumps` writes it: free whitespace
        // lets a weak model loop on spaces and newlines until it runs out of tokens.
        let layout = serde_json::json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        });
        match fields.get_mut("x-guidance") {
            Some(Value::Object(own)) => {
                for (k, v) in layout.as_object().into_iter().flatten() {
                    own.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            _ => {
                fields.insert("x-guidance".into(), layout);
            }
        }
        Ok(TopLevelGrammar::from_json_schema(schema))
    }
}

/// One model's grammar engine: the token trie, built once, and the compiler.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos: Option<u32>,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos: Option<u32>) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        let built = self.factory.get_or_init(|| {
            let eos = self
                .eos
                .ok_or("the model has no end-of-sequence token to end a structured output")?;
            let vocab = Vocab::new(self.tokenizer.clone(), self.vocab_size, eos)
                .map_err(|e| e.to_string())?;
            let env: toktrie::TokEnv = Arc::new(vocab);
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.quiet();
            Ok(factory)
        });
        built.as_ref().map_err(|e| {
            Error::invalid_argument(PARAM, format!("is not available for this model: {e}"))
        })
    }

    /// A matcher for `grammar`, or why it cannot be one (a 400: the caller's schema).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let factory = self.factory()?;
        if let Grammar::JsonSchema(schema) = grammar {
            let trie = factory.tok_env().tok_trie();
            if let Some(c) = unspellable(trie, schema) {
                return Err(Error::invalid_argument(
                    PARAM,
                    format!(
                        "the schema's literal text has {c:?} (U+{:04X}), which this \
                         model's vocabulary cannot spell",
                        c as u32
                    ),
                ));
            }
        }
        let top = grammar.to_llguidance()?;
        // The caller's schema drives the compiler: a panic in it is a schema it
        // cannot take, never a crash of the caller's thread.
        let compiled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let parser = factory
                .create_parser(top)
                .map_err(|e| format!("cannot be compiled: {e}"))?;
            let mut matcher = Matcher::new(Ok(parser));
            if let Some(e) = matcher.get_error() {
                return Err(format!("cannot be compiled: {e}"));
            }
            // A grammar that admits nothing at all fails here, not at the first step.
            matcher
                .compute_mask()
                .map_err(|e| format!("admits no output: {e}"))?;
            Ok(matcher)
        }))
        .unwrap_or_else(|_| Err("cannot be compiled: the grammar engine failed on it".into()));
        let matcher = compiled.map_err(|e| Error::invalid_argument(grammar.param(), e))?;
        Ok(Constraint {
            matcher: Box::new(matcher),
        })
    }
}

/// A character of the schema's literal values (`enum`, `const`) that no sequence
/// of the vocabulary's tokens spells. Byte-level vocabularies can lack rare bytes
/// (SmolLM2's has no token for 0xF1 or 0xF2, lead bytes of U+40000..U+BFFFF): a
/// grammar that forces such a character could never be completed.
fn unspellable(trie: &toktrie::TokTrie, schema: &Value) -> Option<char> {
    let spells = |c: char| {
        let mut buf = [0u8; 4];
        let bytes = c.encode_utf8(&mut buf).as_bytes();
        trie.decode(&trie.greedy_tokenize(bytes)) == bytes
    };
    let literal = |v: &Value| v.to_string().chars().find(|&c| !c.is_ascii() && !spells(c));
    match schema {
        Value::Object(fields) => fields.iter().find_map(|(k, v)| match k.as_str() {
            "enum" => v.as_array()?.iter().find_map(literal),
            "const" => literal(v),
            // Property names are literal text too.
            "properties" => v.as_object()?.iter().find_map(|(name, sub)| {
                literal(&Value::String(name.clone())).or_else(|| unspellable(trie, sub))
            }),
            _ => unspellable(trie, v),
        }),
        Value::Array(items) => items.iter().find_map(|v| unspellable(trie, v)),
        _ => None,
    }
}

/// One sequence's place in its grammar.
pub struct Constraint {
    /// Boxed: a matcher is about 1.5 KiB, and requests move between queues.
    matcher: Box<Matcher>,
}

/// The tokens a grammar allows next: one bit per token id.
pub struct Allowed(toktrie::SimpleVob);

impl Constraint {
    /// The same grammar from the same place, for a sibling choice (`n > 1`).
    pub fn fork(&self) -> Self {
        Self {
            matcher: Box::new(self.matcher.deep_clone()),
        }
    }

    /// The tokens the grammar allows next (end-of-sequence once it is complete).
    pub fn allowed(&mut self) -> Result<Allowed> {
        let mask = self.matcher.compute_mask_or_eos().map_err(grammar_failed)?;
        Ok(Allowed(mask))
    }

    /// Takes the token that was sampled; true when the grammar is complete (no token
    /// but end-of-sequence may follow).
    pub fn commit(&mut self, token: u32) -> Result<bool> {
        self.matcher.consume_token(token).map_err(grammar_failed)?;
        Ok(self.matcher.is_stopped())
    }
}

impl Allowed {
    /// Sets the logit of every token not allowed to minus infinity.
    pub fn apply(&self, logits: &mut [f32]) {
        let n = self.0.len();
        for (id, l) in logits.iter_mut().enumerate() {
            if id >= n || !self.0.get(id) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

fn grammar_failed(e: impl std::fmt::Display) -> Error {
    Error::Grammar(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn response_format_objects_become_grammars_or_name_what_is_wrong() {
        let parse = |v: Value| Grammar::from_response_format(&v);
        assert_eq!(parse(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            parse(json!({"type": "json_object"})).unwrap(),
            Some(Grammar::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let spec = json!({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}});
        assert_eq!(parse(spec).unwrap(), Some(Grammar::JsonSchema(schema)));
        assert_eq!(
            parse(json!({"type": "lark", "lark": "start: \"a\""})).unwrap(),
            Some(Grammar::Lark {
                grammar: "start: \"a\"".into(),
                param: PARAM.into()
            })
        );
        assert_eq!(
            parse(json!({"type": "lark", "lark": "start: \"a\"", "param": "tools"}))
                .unwrap()
                .map(|g| g.param().to_string()),
            Some("tools".into())
        );
        for (bad, says) in [
            (json!({}), "needs a 'type'"),
            (json!({"type": "yaml"}), "unknown type \"yaml\""),
            (
                json!({"type": "json_schema"}),
                "needs a 'json_schema' object",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a"}}),
                "is required",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": true}}),
                "must be an object",
            ),
            (json!({"type": "lark"}), "needs a 'lark' grammar"),
        ] {
            let err = parse(bad.clone()).expect_err(&bad.to_string()).to_string();
            assert!(
                err.contains("'response_format'") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn whitespace_is_fixed_unless_the_schema_says_otherwise() {
        let layout = |g: &Grammar| {
            let grammar = serde_json::to_value(g.to_llguidance().unwrap()).unwrap();
            grammar["grammars"][0]["json_schema"]["x-guidance"].clone()
        };
        let fixed = layout(&Grammar::JsonObject);
        assert_eq!(fixed["whitespace_flexible"], json!(false));
        assert_eq!(fixed["item_separator"], json!(", "));
        let own = json!({"type": "object", "x-guidance": {"item_separator": ","}});
        let mixed = layout(&Grammar::JsonSchema(own));
        assert_eq!(mixed["item_separator"], json!(","));
        assert_eq!(mixed["key_separator"], json!(": "));
    }
}

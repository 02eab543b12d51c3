//! The engine thread on the tiny random Qwen2 reference model (from
//! `../shared/reference`, or `$ZSE_REFERENCE_DIR`): cancelling, fault isolation and
//! `n > 1`.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::*;
use crate::format::{convert, ConvertOptions};
use crate::grammar::Grammar;
use crate::sample::SamplingParams;

/// The engine on the tiny model, converted into a `.zse` file of its own that is
/// removed once loaded (the engine has read what it needs).
fn engine(fault_token: Option<u32>) -> Engine {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let refs = std::env::var_os("ZSE_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference")
        });
    let src = refs.join("qwen2-tiny-random-f32.gguf");
    assert!(
        src.exists(),
        "{} is missing (set ZSE_REFERENCE_DIR)",
        src.display()
    );
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("zse-engine-test-{}-{n}.zse", std::process::id()));
    convert(
        &src,
        &path,
        ConvertOptions::default(),
        &mut |_, _, _| Ok(()),
    )
    .unwrap_or_else(|e| panic!("converting {}: {e}", src.display()));
    let opts = EngineOptions {
        kv_dtype: candle_core::DType::F32,
        fault_token,
        ..Default::default()
    };
    let e = Engine::load(&path, opts);
    let _ = std::fs::remove_file(&path);
    e.unwrap_or_else(|e| panic!("loading the tiny model: {e}"))
}

fn request(prompt: &[u32], max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..GenerationRequest::new(prompt.to_vec())
    }
}

/// Every event of a request, to its last (which has `finish`).
fn collect(rx: &Receiver<Event>) -> (Vec<u32>, FinishReason, Usage) {
    let mut tokens = Vec::new();
    loop {
        let ev = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an event within a minute");
        tokens.extend(&ev.tokens);
        if let Some((reason, usage)) = ev.finish {
            return (tokens, reason, usage);
        }
    }
}

fn generate(e: &Engine, prompt: &[u32], max_tokens: usize) -> (Vec<u32>, FinishReason, Usage) {
    let (sink, rx) = EventSink::channel(None);
    e.submit(request(prompt, max_tokens), sink).unwrap();
    collect(&rx)
}

const PROMPT: [u32; 6] = [1, 504, 3458, 281, 253, 1345];

#[test]
fn cancel_ends_the_request_frees_its_blocks_and_spares_the_others() {
    let e = engine(None);
    let (alone, ..) = generate(&e, &PROMPT, 12);
    let (sink, long) = EventSink::channel(None);
    let id = e.submit(request(&[7, 8, 9], 1000), sink).unwrap();
    let (sink, short) = EventSink::channel(None);
    e.submit(request(&PROMPT, 12), sink).unwrap();
    long.recv_timeout(Duration::from_secs(60))
        .expect("a first token");
    e.cancel(id);
    let (tokens, reason, usage) = collect(&long);
    assert_eq!(reason, FinishReason::Cancelled);
    // The first token, then those sent before the cancel took effect.
    assert_eq!(usage.completion_tokens, 1 + tokens.len());
    assert!(usage.completion_tokens < 1000);
    // The other request ran beside it and gives what it gives alone.
    let (beside, reason, _) = collect(&short);
    assert_eq!((beside, reason), (alone, FinishReason::Length));
    // Cancelling what has ended, or never was, changes nothing.
    e.cancel(id);
    e.cancel(9999);
    assert_eq!(generate(&e, &PROMPT, 12).1, FinishReason::Length);
    assert_eq!(e.stats().kv_blocks_used.load(Ordering::Relaxed), 0);
    assert_eq!(e.stats().running.load(Ordering::Relaxed), 0);
}

#[test]
fn a_failing_sequence_fails_alone() {
    const FAULT: u32 = 4242;
    let reference = engine(None);
    let (alone, ..) = generate(&reference, &PROMPT, 8);
    let e = engine(Some(FAULT));
    let (bad_sink, bad) = EventSink::channel(None);
    let (good_sink, good) = EventSink::channel(None);
    e.submit(request(&[5, FAULT, 6], 8), bad_sink).unwrap();
    e.submit(request(&PROMPT, 8), good_sink).unwrap();
    let (tokens, reason, _) = collect(&bad);
    assert!(tokens.is_empty());
    assert!(
        matches!(&reason, FinishReason::Error(m) if m.contains("fault injected")),
        "{reason:?}"
    );
    assert_eq!(
        collect(&good),
        (
            alone,
            FinishReason::Length,
            Usage {
                prompt_tokens: 6,
                completion_tokens: 8
            }
        )
    );
    // The engine goes on serving.
    assert_eq!(generate(&e, &PROMPT, 8).1, FinishReason::Length);
}

#[test]
fn n_choices_share_the_prompt_and_end_on_their_own() {
    let e = engine(None);
    let (alone, ..) = generate(&e, &PROMPT, 10);
    let sinks: Vec<(EventSink, Receiver<Event>)> =
        (0..3).map(|_| EventSink::channel(None)).collect();
    let (sinks, rxs): (Vec<_>, Vec<_>) = sinks.into_iter().unzip();
    let ids = e.submit_n(request(&PROMPT, 10), sinks).unwrap();
    assert_eq!(ids.len(), 3);
    // The last choice is cancelled before it is born: it ends with no tokens.
    e.cancel(ids[2]);
    let results: Vec<_> = rxs.iter().map(collect).collect();
    for (tokens, reason, usage) in &results[..2] {
        // Greedy: each choice is the request's tokens alone.
        assert_eq!((tokens, reason), (&alone, &FinishReason::Length));
        assert_eq!(usage.prompt_tokens, PROMPT.len());
    }
    // Usually it was still unborn (no tokens); if the engine had begun it, it
    // stopped where the cancel found it, or had already finished.
    let (tokens, reason, usage) = &results[2];
    assert_eq!(usage.completion_tokens, tokens.len());
    match reason {
        FinishReason::Cancelled => assert!(tokens.len() < 10),
        FinishReason::Length => assert_eq!(tokens, &alone),
        other => panic!("the cancelled choice ended with {other:?}"),
    }
    assert_eq!(e.stats().kv_blocks_used.load(Ordering::Relaxed), 0);
}

/// A schema with the shapes structured outputs meet most: an enum, a bounded
/// integer, a bounded string, an optional field and a short list.
fn order_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "kind": {"enum": ["pickup", "delivery"]},
            "qty": {"type": "integer", "minimum": 1, "maximum": 9},
            "name": {"type": "string", "maxLength": 12},
            "note": {"type": "string", "maxLength": 8},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}
        },
        "required": ["kind", "qty", "name", "tags"],
        "additionalProperties": false
    })
}

/// Checks `text` against `order_schema` by hand (no validator crate in the engine).
fn check_order(text: &str) {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    let allowed = ["kind", "qty", "name", "note", "tags"];
    assert!(o.keys().all(|k| allowed.contains(&k.as_str())), "{text}");
    assert!(
        matches!(o["kind"].as_str(), Some("pickup" | "delivery")),
        "{text}"
    );
    assert!(matches!(o["qty"].as_i64(), Some(1..=9)), "{text}");
    assert!(
        o["name"].as_str().is_some_and(|s| s.chars().count() <= 12),
        "{text}"
    );
    if let Some(note) = o.get("note") {
        assert!(
            note.as_str().is_some_and(|s| s.chars().count() <= 8),
            "{text}"
        );
    }
    let tags = o["tags"].as_array().unwrap_or_else(|| panic!("{text}"));
    assert!(tags.len() <= 3, "{text}");
    assert!(tags
        .iter()
        .all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 6)));
}

fn constrained(prompt: &[u32], seed: u64, grammar: Grammar) -> GenerationRequest {
    GenerationRequest {
        max_tokens: Some(400),
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        grammar: Some(grammar),
        ..GenerationRequest::new(prompt.to_vec())
    }
}

#[test]
fn a_grammar_holds_every_choice_of_a_random_model_to_its_schema() {
    let e = engine(None);
    let tok = e.tokenizer();
    for seed in 0..3 {
        let (sinks, rxs): (Vec<_>, Vec<_>) = (0..4).map(|_| EventSink::channel(None)).unzip();
        let req = constrained(&PROMPT, seed, Grammar::JsonSchema(order_schema()));
        e.submit_n(req, sinks).unwrap();
        for rx in &rxs {
            let (tokens, reason, _) = collect(rx);
            assert_eq!(reason, FinishReason::Stop);
            check_order(&tok.decode(&tokens, true).unwrap());
        }
    }
    // Any JSON object, for `json_object`.
    let (sink, rx) = EventSink::channel(None);
    e.submit(constrained(&PROMPT, 7, Grammar::JsonObject), sink)
        .unwrap();
    let (tokens, reason, _) = collect(&rx);
    let text = tok.decode(&tokens, true).unwrap();
    assert_eq!(reason, FinishReason::Stop, "{text}");
    assert!(
        serde_json::from_str::<serde_json::Map<_, _>>(&text).is_ok(),
        "{text}"
    );
}

#[test]
fn a_constrained_sequence_is_the_same_alone_and_beside_fifteen_others() {
    let e = engine(None);
    let schema = || Grammar::JsonSchema(order_schema());
    let (sink, rx) = EventSink::channel(None);
    e.submit(constrained(&PROMPT, 11, schema()), sink).unwrap();
    let alone = collect(&rx);
    let mut others = Vec::new();
    for i in 0..15u32 {
        let (sink, rx) = EventSink::channel(None);
        // Half free text, half under the same grammar with other seeds.
        let req = if i % 2 == 0 {
            request(&[3 + i, 40 + i, 7], 30)
        } else {
            constrained(&[9, 8 + i], 100 + i as u64, schema())
        };
        e.submit(req, sink).unwrap();
        others.push(rx);
    }
    let (sink, rx) = EventSink::channel(None);
    e.submit(constrained(&PROMPT, 11, schema()), sink).unwrap();
    assert_eq!(collect(&rx), alone);
    for (i, rx) in others.iter().enumerate() {
        let (tokens, reason, _) = collect(rx);
        if i % 2 == 0 {
            assert_eq!(reason, FinishReason::Length);
        } else {
            assert_eq!(reason, FinishReason::Stop);
            check_order(&e.tokenizer().decode(&tokens, true).unwrap());
        }
    }
}

#[test]
fn a_schema_the_engine_cannot_use_is_refused_naming_response_format() {
    let e = engine(None);
    let bad = [
        serde_json::json!({"type": "string", "pattern": "(?<=a)b"}),
        serde_json::json!({"type": "integer", "minimum": 5, "maximum": 1}),
        serde_json::json!({"$ref": "https://example.com/schema.json"}),
        // SmolLM2's vocabulary (the tiny model's) has no token for byte 0xF1.
        serde_json::json!({"enum": ["a\u{4AE3F}"]}),
        serde_json::json!({"type": "object", "properties": {"\u{4AE3F}": {"type": "null"}}}),
    ];
    for schema in bad {
        let (sink, _rx) = EventSink::channel(None);
        let err = e
            .submit(
                constrained(&PROMPT, 0, Grammar::JsonSchema(schema.clone())),
                sink,
            )
            .expect_err(&schema.to_string());
        assert!(
            matches!(&err, Error::InvalidArgument { param, .. } if param == "response_format"),
            "{schema}: {err}"
        );
    }
    // Nothing was queued, and the engine goes on serving.
    assert_eq!(e.stats().waiting.load(Ordering::Relaxed), 0);
    assert_eq!(generate(&e, &PROMPT, 4).1, FinishReason::Length);
}

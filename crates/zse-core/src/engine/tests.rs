//! The engine thread on the tiny random Qwen2 reference model (from
//! `../shared/reference`, or `$ZSE_REFERENCE_DIR`): cancelling, fault isolation and
//! `n > 1`.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::*;
use crate::format::{convert, ConvertOptions};
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

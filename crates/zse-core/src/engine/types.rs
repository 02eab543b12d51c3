//! What callers hand the engine and get back: options, requests, events and their
//! sinks, the model's description, limits and counters.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::mpsc::{self, Receiver, Sender};

use candle_core::{DType, Device};

use crate::format::zse::Provenance;
use crate::grammar::Grammar;
use crate::model::ModelConfig;
use crate::sample::SamplingParams;

pub type RequestId = u64;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Serving context length; at most the model's, which is the default.
    pub context_length: Option<usize>,
    pub device: Device,
    /// Precision of the KV cache: F16 (half the memory; llama.cpp's default) or F32.
    pub kv_dtype: DType,
    /// Most sequences generated at once; more wait in the queue.
    pub max_running: usize,
    /// Most requests waiting to start; beyond it `submit` fails with `Overloaded`.
    pub max_waiting: usize,
    /// KV-cache memory budget in bytes. None: room for `max_running` sequences of
    /// the full context. A smaller budget also caps the context length.
    pub kv_cache_bytes: Option<usize>,
    /// Tokens per step, over all sequences: prompts are processed in chunks of
    /// what the decoding sequences leave of it.
    pub max_batch_tokens: usize,
    /// On a GPU without `kv_cache_bytes`: the share of the GPU's free memory (as
    /// found before loading) that weights and KV cache may take together.
    pub gpu_memory_fraction: f64,
    /// On the CPU: `generic`, `avx2`, `avx512`, `candle` or `auto`. None: what
    /// `ZSE_CPU_KERNELS` names, else `auto` (see `model::Backend::select`).
    pub cpu_kernels: Option<String>,
    /// Test hook: every forward pass over this token fails (by a panic, the worst
    /// case), to show that one failing request fails alone. None: what
    /// `ZSE_FAULT_TOKEN` names, else none.
    pub fault_token: Option<u32>,
    /// A chat template (Jinja) to use instead of the file's, or where it has none.
    pub chat_template: Option<String>,
}

/// Positions per KV block: small enough that little is wasted at a sequence's end,
/// large enough that block tables and prefix hashing stay cheap.
pub const KV_BLOCK_SIZE: usize = 16;

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            context_length: None,
            device: Device::Cpu,
            kv_dtype: DType::F16,
            max_running: 16,
            max_waiting: 256,
            kv_cache_bytes: None,
            max_batch_tokens: 256,
            gpu_memory_fraction: 0.9,
            cpu_kernels: None,
            fault_token: None,
            chat_template: None,
        }
    }
}

/// What a caller asks the engine to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// None: until the context is full.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// None: no log-probabilities; Some(n): the chosen token's and n alternatives.
    pub logprobs: Option<usize>,
    /// None: free text; else every choice's output is held to this grammar.
    pub grammar: Option<Grammar>,
}

impl GenerationRequest {
    pub fn new(prompt: Vec<u32>) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            grammar: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The caller cancelled (or went away).
    Cancelled,
    /// The engine failed while computing this request.
    Error(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error(_) => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One step's output for one request. The last event carries `finish`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<(FinishReason, Usage)>,
}

/// Where a request's events go: a channel, plus an optional wake-up call made after
/// each send (the Python bindings use it to wake an asyncio loop).
pub struct EventSink {
    tx: Sender<Event>,
    notify: Option<Box<dyn Fn() + Send>>,
}

impl EventSink {
    pub fn channel(notify: Option<Box<dyn Fn() + Send>>) -> (Self, Receiver<Event>) {
        let (tx, rx) = mpsc::channel();
        (Self { tx, notify }, rx)
    }

    /// False when the receiver is gone (the caller dropped the request).
    pub(super) fn send(&self, ev: Event) -> bool {
        let ok = self.tx.send(ev).is_ok();
        if ok {
            if let Some(n) = &self.notify {
                n();
            }
        }
        ok
    }
}

/// Everything about the loaded model a caller may want to show.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub path: String,
    pub config: ModelConfig,
    pub context_length: usize,
    pub quantization: String,
    pub provenance: Provenance,
    pub file_size: usize,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token_ids: Vec<u32>,
    pub limits: EngineLimits,
    /// Bytes of weights held in memory, all of which a decode step reads.
    pub weight_bytes: usize,
    /// How the model computes: ZSE's CPU kernels (`generic`, `avx2`, `avx512`) or
    /// candle's operations (`candle`, always so on a GPU).
    pub cpu_kernels: String,
    /// Matrices ZSE's kernels do not run (candle's matmul does), by block type.
    pub matrices_without_kernel: std::collections::BTreeMap<String, usize>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Where the KV budget came from: the caller, the default, or the GPU's memory.
    pub kv_budget: KvBudgetSource,
}

/// Where the KV-cache budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvBudgetSource {
    /// `kv_cache_bytes`.
    Given,
    /// Room for `max_running` sequences of the full context (CPU default).
    FullContexts,
    /// `gpu_memory_fraction` of the GPU's free memory, less the weights.
    GpuMemory,
}

impl KvBudgetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            KvBudgetSource::Given => "given",
            KvBudgetSource::FullContexts => "full contexts",
            KvBudgetSource::GpuMemory => "gpu memory",
        }
    }
}

/// The scheduling limits the engine runs under, as resolved at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineLimits {
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_batch_tokens: usize,
    /// The KV budget: blocks of `kv_block_size` positions, and what one position
    /// costs in bytes (in every layer).
    pub kv_blocks: usize,
    pub kv_block_size: usize,
    pub kv_bytes_per_token: usize,
    /// The pool's bytes (both pools' where there are two).
    pub kv_bytes: usize,
    /// Where some layers attend within a sliding window: the blocks of their own
    /// pool and the window (`kv_blocks` then counts the other layers' blocks).
    pub kv_window: Option<KvWindow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvWindow {
    pub window: usize,
    pub blocks: usize,
    /// How many layers attend within it (of the model's all).
    pub layers: usize,
}

impl EngineLimits {
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_blocks * self.kv_block_size
    }
}

/// Per position, the most likely next tokens with their log-probabilities.
pub type PositionLogprobs = Vec<Vec<(u32, f32)>>;

/// Counters the engine thread keeps for callers (`/health`, metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    /// Submitted and not yet started (counted at submission, so the bound is exact).
    pub waiting: AtomicUsize,
    pub finished: AtomicU64,
    /// KV blocks held by sequences (cached blocks nobody uses do not count), and
    /// those held in the windowed layers' pool.
    pub kv_blocks_used: AtomicUsize,
    pub kv_window_blocks_used: AtomicUsize,
    /// Positions computed and held by running sequences.
    pub kv_used_tokens: AtomicUsize,
    /// Prompt positions looked up in the prefix cache, and those found there.
    pub prefix_query_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Sequences sent back to the queue for lack of KV blocks.
    pub preemptions: AtomicU64,
}

//! The engine thread: one per model. Requests come in through a channel; every step
//! runs one forward pass over all running sequences (new prompts and decode steps
//! together), samples a token for each, and sends each request its events through
//! its own channel. Callers never hold a lock on the model, and a failure inside a
//! step fails the requests of that step, never the thread.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::format::zse::{Provenance, ZseTensors};
use crate::format::ZseFile;
use crate::kv::SeqKvCache;
use crate::model::{BatchItem, Llama, ModelConfig};
use crate::sample::{log_softmax, top_n, Sampler, SamplingParams, MAX_TOP_LOGPROBS};
use crate::sched::Admission;
use crate::text::stop::StopStatus;
use crate::text::{ChatMessage, ChatTemplate, IncrementalDecoder, StopMatcher, Tokenizer};

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
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            context_length: None,
            device: Device::Cpu,
            kv_dtype: DType::F16,
            max_running: 16,
            max_waiting: 256,
            kv_cache_bytes: None,
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
    fn send(&self, ev: Event) -> bool {
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
}

/// The scheduling limits the engine runs under, as resolved at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineLimits {
    pub max_running: usize,
    pub max_waiting: usize,
    /// KV budget in token positions, and what one position costs in bytes.
    pub kv_capacity_tokens: usize,
    pub kv_bytes_per_token: usize,
}

/// Per position, the most likely next tokens with their log-probabilities.
pub type PositionLogprobs = Vec<Vec<(u32, f32)>>;

enum Command {
    Submit(RequestId, Box<GenerationRequest>, EventSink),
    Cancel(RequestId),
    Score(Vec<u32>, usize, Sender<Result<PositionLogprobs>>),
}

/// Counters the engine thread keeps for callers (`/health`, metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    /// Submitted and not yet started (counted at submission, so the bound is exact).
    pub waiting: AtomicUsize,
    pub finished: AtomicU64,
    /// KV positions reserved by running sequences, and those actually filled.
    pub kv_reserved_tokens: AtomicUsize,
    pub kv_used_tokens: AtomicUsize,
}

pub struct Engine {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    stats: Arc<EngineStats>,
    cmd: Mutex<Option<Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
}

impl Engine {
    /// Opens a `.zse` file, loads the model and starts its engine thread.
    pub fn load(path: &Path, opts: EngineOptions) -> Result<Self> {
        let file = ZseFile::open(path)?;
        let model_ctx = file.config.context_length;
        let mut context_length = match opts.context_length {
            Some(0) => {
                return Err(Error::invalid_argument(
                    "context_length",
                    "must be at least 1",
                ))
            }
            Some(n) => n.min(model_ctx),
            None => model_ctx,
        };
        let limits = resolve_limits(&file.config, &opts, context_length)?;
        context_length = context_length.min(limits.kv_capacity_tokens);
        let tokenizer = Arc::new(Tokenizer::from_json(&file.tokenizer_json)?);
        if tokenizer.vocab_size() > file.config.vocab_size {
            return Err(Error::invalid_file(
                path.display(),
                format!(
                    "tokenizer has {} tokens but the model only {}",
                    tokenizer.vocab_size(),
                    file.config.vocab_size
                ),
            ));
        }
        let template = file
            .chat_template
            .as_deref()
            .map(ChatTemplate::new)
            .transpose()?;
        let tensors = ZseTensors {
            file: &file,
            device: &opts.device,
        };
        let model = Llama::load(
            &file.config,
            &tensors,
            context_length,
            opts.kv_dtype,
            &opts.device,
        )?;
        let info = ModelInfo {
            name: file.name.clone(),
            path: path.display().to_string(),
            config: file.config.clone(),
            context_length,
            quantization: file.quantization.clone(),
            provenance: file.provenance.clone(),
            file_size: file.gguf().file_size(),
            chat_template: file.chat_template.clone(),
            bos_token: file.bos_token_id.and_then(|id| tokenizer.id_to_token(id)),
            eos_token_ids: file.eos_token_ids.clone(),
            limits: limits.clone(),
        };
        drop(file);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            eos: info.eos_token_ids.clone(),
            stats: stats.clone(),
            admission: Admission::new(limits.max_running, limits.kv_capacity_tokens),
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("zse-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::EngineStopped(e.to_string()))?;
        Ok(Self {
            info,
            tokenizer,
            template,
            stats,
            cmd: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The prompt text for a chat, from the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self
            .template
            .as_ref()
            .ok_or_else(|| Error::Template("the model file has no chat template".into()))?;
        let eos = self
            .info
            .eos_token_ids
            .first()
            .and_then(|&id| self.tokenizer.id_to_token(id))
            .unwrap_or_default();
        t.render(
            messages,
            add_generation_prompt,
            self.info.bos_token.as_deref().unwrap_or(""),
            &eos,
        )
    }

    fn send(&self, cmd: Command) -> Result<()> {
        let guard = self
            .cmd
            .lock()
            .map_err(|_| Error::EngineStopped("engine lock poisoned".into()))?;
        let tx = guard
            .as_ref()
            .ok_or_else(|| Error::EngineStopped("the engine was shut down".into()))?;
        tx.send(cmd)
            .map_err(|_| Error::EngineStopped("the engine thread has exited".into()))
    }

    /// Checks a request and queues it; its events arrive through `sink`. Fails with
    /// `Overloaded` when `max_waiting` requests are already waiting to start.
    pub fn submit(&self, req: GenerationRequest, sink: EventSink) -> Result<RequestId> {
        self.validate(&req)?;
        let max_waiting = self.info.limits.max_waiting;
        self.stats
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max_waiting).then_some(w + 1)
            })
            .map_err(|waiting| Error::Overloaded { waiting })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.send(Command::Submit(id, Box::new(req), sink)) {
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(id)
    }

    fn validate(&self, req: &GenerationRequest) -> Result<()> {
        if req.prompt.is_empty() {
            return Err(Error::invalid_argument("prompt", "must not be empty"));
        }
        self.tokenizer.check_ids(&req.prompt)?;
        if req.prompt.len() >= self.info.context_length {
            return Err(Error::ContextLengthExceeded {
                prompt_tokens: req.prompt.len(),
                context_length: self.info.context_length,
            });
        }
        if req.max_tokens == Some(0) {
            return Err(Error::invalid_argument("max_tokens", "must be at least 1"));
        }
        if let Some(n) = req.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(Error::invalid_argument(
                    "top_logprobs",
                    format!("{n} is more than {MAX_TOP_LOGPROBS}"),
                ));
            }
        }
        self.tokenizer.check_ids(&req.stop_token_ids)?;
        req.sampling.validate(self.info.config.vocab_size)
    }

    /// Stops a request at the next step; its last event has `Cancelled`.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.send(Command::Cancel(id));
    }

    /// Teacher-forced log-probabilities: for every position of `tokens`, the `top`
    /// most likely next tokens. Runs on the engine thread between steps.
    pub fn score(&self, tokens: &[u32], top: usize) -> Result<PositionLogprobs> {
        if tokens.is_empty() {
            return Err(Error::invalid_argument("tokens", "must not be empty"));
        }
        if tokens.len() > self.info.context_length {
            return Err(Error::ContextLengthExceeded {
                prompt_tokens: tokens.len(),
                context_length: self.info.context_length,
            });
        }
        self.tokenizer.check_ids(tokens)?;
        let (tx, rx) = mpsc::channel();
        self.send(Command::Score(tokens.to_vec(), top, tx))?;
        rx.recv()
            .map_err(|_| Error::EngineStopped("the engine thread has exited".into()))?
    }

    /// Stops the engine thread and waits for it; requests still running end with
    /// `Cancelled`. Call it without holding locks the engine's notify hooks need.
    pub fn shutdown(&self) {
        if let Ok(mut g) = self.cmd.lock() {
            g.take();
        }
        if let Ok(mut t) = self.thread.lock() {
            if let Some(h) = t.take() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Engine {
    /// Closes the command channel; the thread finishes its requests and exits on its
    /// own. No join here: a drop may run where waiting would deadlock (a Python
    /// finaliser holding the GIL that a notify hook needs).
    fn drop(&mut self) {
        if let Ok(mut g) = self.cmd.lock() {
            g.take();
        }
    }
}

/// A request being generated.
struct Sequence {
    id: RequestId,
    sink: EventSink,
    cache: SeqKvCache,
    sampler: Sampler,
    /// Tokens to feed at the next step: the prompt, then each sampled token.
    pending: Vec<u32>,
    prompt_len: usize,
    generated: usize,
    max_tokens: usize,
    /// KV positions held for it while it runs (`sched`).
    reserved: usize,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    detok: IncrementalDecoder,
    stop: StopMatcher,
}

struct Worker {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    stats: Arc<EngineStats>,
    admission: Admission,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.finish_all(FinishReason::Cancelled);
                        return;
                    }
                }
            }
            self.admit();
            // Published before the step too, so callers that see a step's first event
            // also see the admission that led to it.
            self.publish_stats();
            if !self.running.is_empty() {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.step()));
                let failure = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(panic) => Some(panic_message(&panic)),
                };
                if let Some(msg) = failure {
                    self.finish_running(FinishReason::Error(msg));
                }
            }
            self.publish_stats();
        }
        self.finish_all(FinishReason::Cancelled);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(id, req, sink) => {
                let max_room = self.model.max_positions() - req.prompt.len();
                let max_tokens = req.max_tokens.unwrap_or(max_room).min(max_room);
                self.waiting.push_back(Sequence {
                    id,
                    sink,
                    cache: self.model.new_cache(),
                    sampler: Sampler::new(req.sampling, &req.prompt),
                    prompt_len: req.prompt.len(),
                    reserved: req.prompt.len() + max_tokens,
                    pending: req.prompt,
                    generated: 0,
                    max_tokens,
                    stop_token_ids: req.stop_token_ids,
                    ignore_eos: req.ignore_eos,
                    logprobs: req.logprobs,
                    detok: IncrementalDecoder::new(),
                    stop: StopMatcher::new(req.stop),
                });
            }
            Command::Cancel(id) => {
                if let Some(i) = self.running.iter().position(|s| s.id == id) {
                    let s = self.running.swap_remove(i);
                    self.admission.release(s.reserved);
                    self.finish(s, FinishReason::Cancelled);
                } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
                    if let Some(s) = self.waiting.remove(i) {
                        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                        self.finish(s, FinishReason::Cancelled);
                    }
                }
            }
            Command::Score(tokens, top, reply) => {
                let result =
                    std::panic::catch_unwind(AssertUnwindSafe(|| self.score(&tokens, top)))
                        .unwrap_or_else(|p| Err(Error::Compute(panic_message(&p))));
                let _ = reply.send(result);
            }
        }
    }

    /// Moves waiting requests to running, in arrival order, while the limits allow.
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            if !self.admission.try_admit(front.reserved) {
                break;
            }
            if let Some(seq) = self.waiting.pop_front() {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                self.running.push(seq);
            }
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.kv_reserved_tokens
            .store(self.admission.budget().reserved(), Ordering::Relaxed);
        let used = self.running.iter().map(|q| q.cache.len()).sum();
        s.kv_used_tokens.store(used, Ordering::Relaxed);
    }

    fn score(&self, tokens: &[u32], top: usize) -> Result<PositionLogprobs> {
        let mut cache = self.model.new_cache();
        let mut items = [BatchItem {
            tokens,
            cache: &mut cache,
            all_logits: true,
        }];
        let logits = self.model.forward(&mut items)?.remove(0).to_vec2::<f32>()?;
        Ok(logits
            .iter()
            .map(|row| top_n(&log_softmax(row), top))
            .collect())
    }

    fn step(&mut self) -> Result<()> {
        let mut items: Vec<BatchItem<'_>> = self
            .running
            .iter_mut()
            .map(|s| BatchItem {
                tokens: &s.pending,
                cache: &mut s.cache,
                all_logits: false,
            })
            .collect();
        let logits = self.model.forward(&mut items)?;
        drop(items);
        let mut done = Vec::new();
        for (i, (seq, logits)) in self.running.iter_mut().zip(logits).enumerate() {
            let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
            match advance(&self.tokenizer, &self.eos, &self.model, seq, &mut row)? {
                Advance::Continue => {}
                Advance::Finished | Advance::Gone => done.push(i),
            }
        }
        for i in done.into_iter().rev() {
            let s = self.running.swap_remove(i);
            self.admission.release(s.reserved);
            self.stats.finished.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Ends a request that is no longer in either queue: its last event.
    fn finish(&self, seq: Sequence, reason: FinishReason) {
        let usage = Usage {
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated,
        };
        seq.sink.send(Event {
            finish: Some((reason, usage)),
            ..Default::default()
        });
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
    }

    fn finish_running(&mut self, reason: FinishReason) {
        for s in std::mem::take(&mut self.running) {
            self.admission.release(s.reserved);
            self.finish(s, reason.clone());
        }
    }

    fn finish_all(&mut self, reason: FinishReason) {
        self.finish_running(reason.clone());
        for s in std::mem::take(&mut self.waiting) {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            self.finish(s, reason.clone());
        }
        self.publish_stats();
    }
}

/// Samples the next token of `seq`, sends its event, and says whether it ended.
fn advance(
    tokenizer: &Tokenizer,
    eos: &[u32],
    model: &Llama,
    seq: &mut Sequence,
    logits: &mut [f32],
) -> Result<Advance> {
    let s = seq.sampler.sample(logits, seq.logprobs);
    let token = s.token;
    seq.generated += 1;
    let mut ev = Event {
        tokens: vec![token],
        ..Default::default()
    };
    if let Some(lp) = s.logprob {
        ev.logprobs.push(TokenLogprob {
            token,
            logprob: lp,
            top: s.top,
        });
    }
    let is_stop_token =
        !seq.ignore_eos && (eos.contains(&token) || seq.stop_token_ids.contains(&token));
    let mut reason = None;
    if is_stop_token {
        reason = Some(FinishReason::Stop);
    } else {
        let delta = seq.detok.push(tokenizer, token)?;
        match seq.stop.push(&delta) {
            StopStatus::Continue(t) => ev.text = t,
            StopStatus::Stopped(t) => {
                ev.text = t;
                reason = Some(FinishReason::Stop);
            }
        }
    }
    let context_full = seq.prompt_len + seq.generated >= model.max_positions();
    if reason.is_none() && (seq.generated >= seq.max_tokens || context_full) {
        reason = Some(FinishReason::Length);
    }
    if reason.is_some() && (is_stop_token || reason == Some(FinishReason::Length)) {
        // Ended by a token or a limit: release the text still held back (an
        // incomplete character, a possible stop-string prefix), unless it
        // completes a stop string after all.
        let rest = seq.detok.flush(tokenizer)?;
        match seq.stop.push(&rest) {
            StopStatus::Continue(t) => {
                ev.text.push_str(&t);
                ev.text.push_str(&seq.stop.flush());
            }
            StopStatus::Stopped(t) => {
                ev.text.push_str(&t);
                reason = Some(FinishReason::Stop);
            }
        }
    }
    if let Some(r) = &reason {
        let usage = Usage {
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated,
        };
        ev.finish = Some((r.clone(), usage));
    }
    seq.pending.clear();
    seq.pending.push(token);
    if !seq.sink.send(ev) {
        return Ok(Advance::Gone);
    }
    Ok(if reason.is_some() {
        Advance::Finished
    } else {
        Advance::Continue
    })
}

enum Advance {
    Continue,
    Finished,
    /// The caller dropped its receiver: stop computing for it.
    Gone,
}

/// The limits for `opts`: the KV budget in positions (at least one full context
/// when no budget is given per sequence) and the bounds of both queues.
fn resolve_limits(
    config: &ModelConfig,
    opts: &EngineOptions,
    context_length: usize,
) -> Result<EngineLimits> {
    if opts.max_running == 0 {
        return Err(Error::invalid_argument("max_running", "must be at least 1"));
    }
    let per_token = 2
        * config.num_layers
        * config.num_kv_heads
        * config.head_dim
        * opts.kv_dtype.size_in_bytes();
    let capacity = match opts.kv_cache_bytes {
        Some(bytes) => bytes / per_token.max(1),
        None => opts.max_running.saturating_mul(context_length),
    };
    // A context needs room for at least one prompt token and one generated token.
    if capacity < 2 {
        return Err(Error::invalid_argument(
            "kv_cache_bytes",
            format!(
                "{} bytes hold no useful context: one position takes {per_token} bytes",
                opts.kv_cache_bytes.unwrap_or(0)
            ),
        ));
    }
    Ok(EngineLimits {
        max_running: opts.max_running,
        max_waiting: opts.max_waiting,
        kv_capacity_tokens: capacity,
        kv_bytes_per_token: per_token,
    })
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error in the engine: {msg}")
}

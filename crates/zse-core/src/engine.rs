//! The engine thread: one per model. Requests come in through a channel; every step
//! runs one forward pass over all running sequences (new prompts and decode steps
//! together), samples a token for each, and sends each request its events through
//! its own channel. Callers never hold a lock on the model, and a failure inside a
//! step fails the requests of that step, never the thread.

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
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            context_length: None,
            device: Device::Cpu,
            kv_dtype: DType::F16,
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
    pub finished: AtomicU64,
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
        let context_length = match opts.context_length {
            Some(0) => {
                return Err(Error::invalid_argument(
                    "context_length",
                    "must be at least 1",
                ))
            }
            Some(n) => n.min(model_ctx),
            None => model_ctx,
        };
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
        };
        drop(file);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            eos: info.eos_token_ids.clone(),
            stats: stats.clone(),
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

    /// Checks a request and queues it; its events arrive through `sink`.
    pub fn submit(&self, req: GenerationRequest, sink: EventSink) -> Result<RequestId> {
        self.validate(&req)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(Command::Submit(id, Box::new(req), sink))?;
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
}

impl Worker {
    fn run(self, rx: Receiver<Command>) {
        let mut running: Vec<Sequence> = Vec::new();
        loop {
            if running.is_empty() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd, &mut running),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd, &mut running),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.finish_all(&mut running, FinishReason::Cancelled);
                        return;
                    }
                }
            }
            if !running.is_empty() {
                let outcome =
                    std::panic::catch_unwind(AssertUnwindSafe(|| self.step(&mut running)));
                let failure = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(panic) => Some(panic_message(&panic)),
                };
                if let Some(msg) = failure {
                    self.finish_all(&mut running, FinishReason::Error(msg));
                }
            }
            self.stats.running.store(running.len(), Ordering::Relaxed);
        }
        self.finish_all(&mut running, FinishReason::Cancelled);
    }

    fn handle(&self, cmd: Command, running: &mut Vec<Sequence>) {
        match cmd {
            Command::Submit(id, req, sink) => {
                let max_room = self.model.max_positions() - req.prompt.len();
                running.push(Sequence {
                    id,
                    sink,
                    cache: self.model.new_cache(),
                    sampler: Sampler::new(req.sampling, &req.prompt),
                    prompt_len: req.prompt.len(),
                    pending: req.prompt,
                    generated: 0,
                    max_tokens: req.max_tokens.unwrap_or(max_room).min(max_room),
                    stop_token_ids: req.stop_token_ids,
                    ignore_eos: req.ignore_eos,
                    logprobs: req.logprobs,
                    detok: IncrementalDecoder::new(),
                    stop: StopMatcher::new(req.stop),
                });
            }
            Command::Cancel(id) => {
                if let Some(i) = running.iter().position(|s| s.id == id) {
                    let s = running.swap_remove(i);
                    self.finish(s, FinishReason::Cancelled, String::new());
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

    fn step(&self, running: &mut Vec<Sequence>) -> Result<()> {
        let mut items: Vec<BatchItem<'_>> = running
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
        for (i, (seq, logits)) in running.iter_mut().zip(logits).enumerate() {
            let mut row = logits.squeeze(0)?.to_vec1::<f32>()?;
            match self.advance(seq, &mut row)? {
                Advance::Continue => {}
                Advance::Finished | Advance::Gone => done.push(i),
            }
        }
        for i in done.into_iter().rev() {
            running.swap_remove(i);
            self.stats.finished.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Samples the next token of `seq`, sends its event, and says whether it ended.
    fn advance(&self, seq: &mut Sequence, logits: &mut [f32]) -> Result<Advance> {
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
            !seq.ignore_eos && (self.eos.contains(&token) || seq.stop_token_ids.contains(&token));
        let mut reason = None;
        if is_stop_token {
            reason = Some(FinishReason::Stop);
        } else {
            let delta = seq.detok.push(&self.tokenizer, token)?;
            match seq.stop.push(&delta) {
                StopStatus::Continue(t) => ev.text = t,
                StopStatus::Stopped(t) => {
                    ev.text = t;
                    reason = Some(FinishReason::Stop);
                }
            }
        }
        let context_full = seq.prompt_len + seq.generated >= self.model.max_positions();
        if reason.is_none() && (seq.generated >= seq.max_tokens || context_full) {
            reason = Some(FinishReason::Length);
        }
        if reason.is_some() && (is_stop_token || reason == Some(FinishReason::Length)) {
            // Ended by a token or a limit: release the text still held back (an
            // incomplete character, a possible stop-string prefix), unless it
            // completes a stop string after all.
            let rest = seq.detok.flush(&self.tokenizer)?;
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

    fn finish(&self, seq: Sequence, reason: FinishReason, text: String) {
        let usage = Usage {
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated,
        };
        seq.sink.send(Event {
            text,
            finish: Some((reason, usage)),
            ..Default::default()
        });
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
    }

    fn finish_all(&self, running: &mut Vec<Sequence>, reason: FinishReason) {
        for s in running.drain(..) {
            self.finish(s, reason.clone(), String::new());
        }
        self.stats.running.store(0, Ordering::Relaxed);
    }
}

enum Advance {
    Continue,
    Finished,
    /// The caller dropped its receiver: stop computing for it.
    Gone,
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error in the engine: {msg}")
}

//! The engine thread: one per model. Requests come in through a channel; every step
//! asks the scheduler (`sched`) what to run, runs one forward pass over it (prompt
//! chunks and decode steps together), samples a token for each sequence whose known
//! tokens are all computed, and sends each request its events through its own
//! channel. Callers never hold a lock on the model, and a failure inside a
//! step fails the requests of that step, never the thread.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{DType, Device};

use crate::device::{device_name, gpu_memory, GpuMemory};
use crate::error::{Error, Result};
use crate::format::zse::{Provenance, ZseTensors};
use crate::format::ZseFile;
use crate::kv::{BlockTable, KvPool};
use crate::model::{Backend, BatchItem, Logits, Model, ModelConfig};
use crate::sample::{log_softmax, top_n, Sampler, SamplingParams, MAX_TOP_LOGPROBS};
use crate::sched::{Entry, Plan, Scheduler, SchedulerConfig, SeqState};
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
    /// Tokens per step, over all sequences: prompts are processed in chunks of
    /// what the decoding sequences leave of it.
    pub max_batch_tokens: usize,
    /// On a GPU without `kv_cache_bytes`: the share of the GPU's free memory (as
    /// found before loading) that weights and KV cache may take together.
    pub gpu_memory_fraction: f64,
    /// On the CPU: `generic`, `avx2`, `avx512`, `candle` or `auto`. None: what
    /// `ZSE_CPU_KERNELS` names, else `auto` (see `model::Backend::select`).
    pub cpu_kernels: Option<String>,
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
    /// Bytes of weights held in memory, all of which a decode step reads.
    pub weight_bytes: usize,
    /// How the model computes: ZSE's CPU kernels (`generic`, `avx2`, `avx512`) or
    /// candle's operations (`candle`, always so on a GPU).
    pub cpu_kernels: String,
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
    /// costs in bytes.
    pub kv_blocks: usize,
    pub kv_block_size: usize,
    pub kv_bytes_per_token: usize,
}

impl EngineLimits {
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_blocks * self.kv_block_size
    }
}

/// Per position, the most likely next tokens with their log-probabilities.
pub type PositionLogprobs = Vec<Vec<(u32, f32)>>;

enum Command {
    /// One request with `n` choices: ids and sinks, one per choice.
    Submit(Vec<RequestId>, Box<GenerationRequest>, Vec<EventSink>),
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
    /// KV blocks held by sequences (cached blocks nobody uses do not count).
    pub kv_blocks_used: AtomicUsize,
    /// Positions computed and held by running sequences.
    pub kv_used_tokens: AtomicUsize,
    /// Prompt positions looked up in the prefix cache, and those found there.
    pub prefix_query_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Sequences sent back to the queue for lack of KV blocks.
    pub preemptions: AtomicU64,
}

pub struct Engine {
    info: ModelInfo,
    device: Device,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    stats: Arc<EngineStats>,
    cmd: Mutex<Option<Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
}

impl Engine {
    /// Opens a `.zse` file, loads the model and starts its engine thread.
    pub fn load(path: &Path, mut opts: EngineOptions) -> Result<Self> {
        // Checked on every device, so that a bad value fails where it is written.
        let fraction = opts.gpu_memory_fraction;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::invalid_argument(
                "gpu_memory_fraction",
                format!("{fraction} (expected more than 0, at most 1)"),
            ));
        }
        let file = ZseFile::open(path)?;
        let kv_budget = match opts.kv_cache_bytes {
            Some(_) => KvBudgetSource::Given,
            None => match gpu_memory(&opts.device)? {
                None => KvBudgetSource::FullContexts,
                Some(mem) => {
                    opts.kv_cache_bytes = Some(gpu_kv_budget(
                        mem,
                        opts.gpu_memory_fraction,
                        file.gguf().file_size(),
                    )?);
                    KvBudgetSource::GpuMemory
                }
            },
        };
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
        context_length = context_length.min(limits.kv_capacity_tokens());
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
        let backend = Backend::select(&opts.device, opts.cpu_kernels.as_deref())?;
        let model = Model::load(
            &file.config,
            &tensors,
            context_length,
            opts.kv_dtype,
            &opts.device,
            backend,
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
            weight_bytes: model.weight_bytes(),
            cpu_kernels: model.backend().name().to_string(),
            device: device_name(&opts.device),
            kv_budget,
        };
        drop(file);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let pool = model.new_kv_pool(limits.kv_blocks, limits.kv_block_size)?;
        let sched = Scheduler::new(SchedulerConfig {
            max_running: limits.max_running,
            max_batch_tokens: limits.max_batch_tokens,
            num_blocks: limits.kv_blocks,
            block_size: limits.kv_block_size,
            max_positions: context_length,
        });
        let worker = Worker {
            model,
            pool,
            sched,
            tokenizer: tokenizer.clone(),
            eos: info.eos_token_ids.clone(),
            stats: stats.clone(),
            fault_token: fault_token()?,
        };
        let thread = std::thread::Builder::new()
            .name("zse-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::EngineStopped(e.to_string()))?;
        Ok(Self {
            info,
            device: opts.device.clone(),
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

    /// The memory of the GPU the engine runs on; None on the CPU.
    pub fn gpu_memory(&self) -> Result<Option<GpuMemory>> {
        gpu_memory(&self.device)
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
        Ok(self.submit_n(req, vec![sink])?[0])
    }

    /// Like `submit`, with one choice per sink (OpenAI's `n`): the prompt is computed
    /// once and its KV blocks are shared. With a seed, choice `i` samples with
    /// `seed + i`. Each choice has its own id and can be cancelled alone.
    pub fn submit_n(
        &self,
        req: GenerationRequest,
        sinks: Vec<EventSink>,
    ) -> Result<Vec<RequestId>> {
        if sinks.is_empty() {
            return Err(Error::invalid_argument("n", "must be at least 1"));
        }
        self.validate(&req)?;
        let max_waiting = self.info.limits.max_waiting;
        self.stats
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max_waiting).then_some(w + 1)
            })
            .map_err(|waiting| Error::Overloaded { waiting })?;
        let first = self
            .next_id
            .fetch_add(sinks.len() as u64, Ordering::Relaxed);
        let ids: Vec<RequestId> = (first..first + sinks.len() as u64).collect();
        if let Err(e) = self.send(Command::Submit(ids.clone(), Box::new(req), sinks)) {
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(ids)
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

/// A choice waiting for its parent's prompt (`n > 1`): it becomes a sequence of its
/// own, sharing the parent's blocks, when the parent samples its first token.
struct Fork {
    id: RequestId,
    sink: EventSink,
    sampler: Sampler,
}

/// What the engine keeps per sequence besides its cache state (`sched::SeqState`).
struct Request {
    id: RequestId,
    sink: EventSink,
    sampler: Sampler,
    /// Admitted at least once (it no longer counts as waiting, even if preempted).
    started: bool,
    prompt_len: usize,
    generated: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    detok: IncrementalDecoder,
    stop: StopMatcher,
    forks: Vec<Fork>,
}

impl Request {
    /// A sibling choice: the same request with its own id, sink and sampler.
    fn sibling(&self, fork: Fork) -> Self {
        Request {
            id: fork.id,
            sink: fork.sink,
            sampler: fork.sampler,
            started: true,
            prompt_len: self.prompt_len,
            generated: 0,
            max_tokens: self.max_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            detok: IncrementalDecoder::new(),
            stop: self.stop.fresh(),
            forks: Vec::new(),
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
        }
    }

    /// Sends the last event of a request (and of its unborn siblings) that ends
    /// without a new token.
    fn end(self, reason: FinishReason) {
        let usage = self.usage();
        let last = |sink: &EventSink, usage: Usage| {
            sink.send(Event {
                finish: Some((reason.clone(), usage)),
                ..Default::default()
            });
        };
        last(&self.sink, usage);
        for f in &self.forks {
            let unborn = Usage {
                completion_tokens: 0,
                ..usage
            };
            last(&f.sink, unborn);
        }
    }
}

/// Per running sequence, the logits row to sample from (None: nothing to sample).
type LogitRows = Vec<Option<Vec<f32>>>;

/// A running sequence (its index) that failed, and why.
type Failure = (usize, String);

struct Worker {
    model: Model,
    pool: KvPool,
    sched: Scheduler<Request>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    stats: Arc<EngineStats>,
    /// Test hook (`ZSE_FAULT_TOKEN`): a forward pass over this token fails.
    fault_token: Option<u32>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            if self.sched.is_idle() {
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
            if !self.sched.is_idle() {
                // The whole step runs on a worker of the one rayon pool, so that its
                // serial parts and the parallel kernels share the pool's threads; on
                // a thread of its own the step would compete with workers spinning
                // between kernels (one more runnable thread than cores).
                let outcome =
                    std::panic::catch_unwind(AssertUnwindSafe(|| rayon::scope(|_| self.step())));
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
            Command::Submit(ids, req, sinks) => self.enqueue(ids, *req, sinks),
            Command::Cancel(id) => self.cancel(id),
            Command::Score(tokens, top, reply) => {
                // On the pool like a step; `&mut` because the worker is Send, not Sync.
                let worker = &mut *self;
                let result = std::panic::catch_unwind(AssertUnwindSafe(move || {
                    rayon::scope(move |_| worker.score(&tokens, top))
                }))
                .unwrap_or_else(|p| Err(Error::Compute(panic_message(&p))));
                let _ = reply.send(result);
            }
        }
    }

    fn enqueue(&mut self, ids: Vec<RequestId>, req: GenerationRequest, sinks: Vec<EventSink>) {
        let max_room = self.model.max_positions() - req.prompt.len();
        let max_tokens = req.max_tokens.unwrap_or(max_room).min(max_room);
        let sampler = |i: usize| {
            let mut params = req.sampling.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            Sampler::new(params, &req.prompt)
        };
        let mut choices = ids.into_iter().zip(sinks).enumerate();
        let Some((_, (id, sink))) = choices.next() else {
            return;
        };
        let forks = choices
            .map(|(i, (id, sink))| Fork {
                id,
                sink,
                sampler: sampler(i),
            })
            .collect();
        let request = Request {
            id,
            sink,
            sampler: sampler(0),
            started: false,
            prompt_len: req.prompt.len(),
            generated: 0,
            max_tokens,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            detok: IncrementalDecoder::new(),
            stop: StopMatcher::new(req.stop),
            forks,
        };
        self.sched.enqueue(SeqState::new(req.prompt), request);
    }

    fn cancel(&mut self, id: RequestId) {
        let all = self
            .sched
            .running
            .iter_mut()
            .chain(self.sched.waiting.iter_mut());
        for e in all {
            // A choice not yet born leaves its parent's list.
            if let Some(i) = e.data.forks.iter().position(|f| f.id == id) {
                let f = e.data.forks.remove(i);
                let usage = Usage {
                    prompt_tokens: e.data.prompt_len,
                    completion_tokens: 0,
                };
                f.sink.send(Event {
                    finish: Some((FinishReason::Cancelled, usage)),
                    ..Default::default()
                });
                return;
            }
            // A parent with unborn siblings: the first sibling takes its place.
            if e.data.id == id && !e.data.forks.is_empty() {
                let next = e.data.forks.remove(0);
                let old = std::mem::replace(&mut e.data.sink, next.sink);
                e.data.sampler = next.sampler;
                e.data.id = next.id;
                old.send(Event {
                    finish: Some((FinishReason::Cancelled, e.data.usage())),
                    ..Default::default()
                });
                return;
            }
        }
        if let Some(e) = self.sched.remove(|r| r.id == id) {
            self.retire(e, FinishReason::Cancelled);
        }
    }

    /// Ends a request that has left the scheduler.
    fn retire(&self, e: Entry<Request>, reason: FinishReason) {
        if !e.data.started {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        self.stats.finished.fetch_add(1, Ordering::Relaxed);
        e.data.end(reason);
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let st = &self.sched.stats;
        s.running.store(self.sched.running.len(), Ordering::Relaxed);
        s.kv_blocks_used
            .store(self.sched.blocks().in_use(), Ordering::Relaxed);
        s.kv_used_tokens
            .store(self.sched.computed_tokens(), Ordering::Relaxed);
        s.prefix_query_tokens
            .store(st.prefix_query_tokens, Ordering::Relaxed);
        s.prefix_hit_tokens
            .store(st.prefix_hit_tokens, Ordering::Relaxed);
        s.preemptions.store(st.preemptions, Ordering::Relaxed);
    }

    /// Teacher-forced log-probabilities, in a cache of their own.
    fn score(&self, tokens: &[u32], top: usize) -> Result<PositionLogprobs> {
        let bs = self.sched.config().block_size;
        let pool = self
            .model
            .new_kv_pool(BlockTable::blocks_for(bs, tokens.len()), bs)?;
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        let item = BatchItem {
            tokens,
            past: 0,
            slots: &slots,
            logits: Logits::All,
        };
        let logits = self
            .model
            .forward(&[item], &pool)?
            .remove(0)
            .ok_or_else(|| Error::Compute("no logits for scoring".into()))?
            .to_vec2::<f32>()?;
        Ok(logits
            .iter()
            .map(|row| top_n(&log_softmax(row), top))
            .collect())
    }

    fn step(&mut self) -> Result<()> {
        let mut plan = self.sched.schedule();
        for e in &mut self.sched.running {
            if !e.data.started {
                e.data.started = true;
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // Published before the step too, so that a caller who sees a step's first
        // event also sees the admission that led to it.
        self.publish_stats();
        for &(from, to, rows) in &plan.copies {
            self.pool.copy_block(from, to, rows)?;
        }
        let (mut logits, mut failed) = self.forward_isolating(&mut plan);
        self.sched.commit(&plan);
        // Sample where every known token is now computed. Unborn siblings are born
        // first, sharing the blocks, and sample from the same logits.
        let mut ends = Vec::new();
        let mut i = 0;
        while i < self.sched.running.len() {
            let Some(mut row) = logits.get_mut(i).and_then(Option::take) else {
                i += 1;
                continue;
            };
            let forks = std::mem::take(&mut self.sched.running[i].data.forks);
            for fork in forks {
                let sibling = self.sched.running[i].data.sibling(fork);
                self.sched.fork(i, sibling);
                logits.push(Some(row.clone()));
            }
            let entry = &mut self.sched.running[i];
            match advance(&self.tokenizer, &self.eos, &self.model, entry, &mut row) {
                Ok(Advance::Continue) => {}
                Ok(Advance::Finished(last)) => ends.push((i, End::Last(last))),
                Ok(Advance::Gone) => ends.push((i, End::Gone)),
                Err(e) => failed.push((i, e.to_string())),
            }
            i += 1;
        }
        ends.extend(failed.into_iter().map(|(i, msg)| (i, End::Failed(msg))));
        // `finish` swaps the last entry in: remove from the back.
        ends.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        let ended: Vec<_> = (ends.into_iter())
            .map(|(i, end)| (self.sched.finish(i), end))
            .collect();
        self.stats
            .finished
            .fetch_add(ended.len() as u64, Ordering::Relaxed);
        // A caller who sees a request's last event sees its sequence and blocks gone.
        self.publish_stats();
        for (e, end) in ended {
            match end {
                End::Last(event) => {
                    e.data.sink.send(event);
                }
                End::Gone => {}
                End::Failed(msg) => e.data.end(FinishReason::Error(msg)),
            }
        }
        Ok(())
    }

    /// The forward pass of a plan, in which a failure fails only the sequences it
    /// comes from. When the batch fails, each sequence's chunk is run alone (its
    /// results do not depend on the batch, so they are the batch's); those that
    /// fail alone are returned with their error, and their chunks are taken out of
    /// the plan so that nothing they wrote is committed or shared.
    fn forward_isolating(&self, plan: &mut Plan) -> (LogitRows, Vec<Failure>) {
        let failure = match guarded(|| self.forward(plan, None)) {
            Ok(rows) => return (rows, Vec::new()),
            Err(msg) => msg,
        };
        let mut rows = vec![None; plan.chunks.len()];
        let mut failed = Vec::new();
        let ran: Vec<usize> = (0..plan.chunks.len())
            .filter(|&i| plan.chunks[i] > 0)
            .collect();
        if ran.len() == 1 {
            failed.push((ran[0], failure));
        } else {
            for &i in &ran {
                match guarded(|| self.forward(plan, Some(i))) {
                    Ok(mut alone) => rows[i] = alone[i].take(),
                    Err(msg) => failed.push((i, msg)),
                }
            }
        }
        for &(i, _) in &failed {
            plan.chunks[i] = 0;
        }
        (rows, failed)
    }

    /// The forward pass of a plan (of its sequence `only` where given): per running
    /// sequence, the logits row to sample from if its chunk completes every token
    /// it knows.
    fn forward(&self, plan: &Plan, only: Option<usize>) -> Result<LogitRows> {
        let bs = self.sched.config().block_size;
        let running = &self.sched.running;
        let runs = |i: usize| plan.chunks[i] > 0 && only.is_none_or(|o| o == i);
        // Only the sequences that run need their slots.
        let slots: Vec<Vec<u32>> = (running.iter().enumerate())
            .map(|(i, e)| match runs(i) {
                true => e.seq.table.slots(bs, e.seq.computed + plan.chunks[i]),
                false => Vec::new(),
            })
            .collect();
        let mut items = Vec::new();
        let mut index = Vec::new();
        for (i, (e, &chunk)) in running.iter().zip(&plan.chunks).enumerate() {
            if !runs(i) {
                continue;
            }
            let seq = &e.seq;
            let end = seq.computed + chunk;
            items.push(BatchItem {
                tokens: &seq.tokens[seq.computed..end],
                past: seq.computed,
                slots: &slots[i],
                logits: if end == seq.tokens.len() {
                    Logits::Last
                } else {
                    Logits::None
                },
            });
            index.push(i);
        }
        let mut rows = vec![None; running.len()];
        if items.is_empty() {
            return Ok(rows);
        }
        if let Some(t) = self.fault_token {
            if items.iter().any(|item| item.tokens.contains(&t)) {
                panic!("fault injected by {FAULT_TOKEN_VAR}: the batch holds token {t}");
            }
        }
        let logits = self.model.forward(&items, &self.pool)?;
        for (i, l) in index.into_iter().zip(logits) {
            if let Some(l) = l {
                rows[i] = Some(l.squeeze(0)?.to_vec1::<f32>()?);
            }
        }
        Ok(rows)
    }

    fn finish_running(&mut self, reason: FinishReason) {
        while !self.sched.running.is_empty() {
            let e = self.sched.finish(0);
            self.retire(e, reason.clone());
        }
    }

    fn finish_all(&mut self, reason: FinishReason) {
        self.finish_running(reason.clone());
        while let Some(e) = self.sched.waiting.pop_front() {
            self.retire(e, reason.clone());
        }
        self.publish_stats();
    }
}

/// Samples the next token of a sequence, sends its event (or returns it, when it is
/// the last), and says whether it ended.
fn advance(
    tokenizer: &Tokenizer,
    eos: &[u32],
    model: &Model,
    entry: &mut Entry<Request>,
    logits: &mut [f32],
) -> Result<Advance> {
    let req = &mut entry.data;
    let s = req.sampler.sample(logits, req.logprobs);
    let token = s.token;
    req.generated += 1;
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
        !req.ignore_eos && (eos.contains(&token) || req.stop_token_ids.contains(&token));
    let mut reason = None;
    if is_stop_token {
        reason = Some(FinishReason::Stop);
    } else {
        let delta = req.detok.push(tokenizer, token)?;
        match req.stop.push(&delta) {
            StopStatus::Continue(t) => ev.text = t,
            StopStatus::Stopped(t) => {
                ev.text = t;
                reason = Some(FinishReason::Stop);
            }
        }
    }
    let context_full = req.prompt_len + req.generated >= model.max_positions();
    if reason.is_none() && (req.generated >= req.max_tokens || context_full) {
        reason = Some(FinishReason::Length);
    }
    if reason.is_some() && (is_stop_token || reason == Some(FinishReason::Length)) {
        // Ended by a token or a limit: release the text still held back (an
        // incomplete character, a possible stop-string prefix), unless it
        // completes a stop string after all.
        let rest = req.detok.flush(tokenizer)?;
        match req.stop.push(&rest) {
            StopStatus::Continue(t) => {
                ev.text.push_str(&t);
                ev.text.push_str(&req.stop.flush());
            }
            StopStatus::Stopped(t) => {
                ev.text.push_str(&t);
                reason = Some(FinishReason::Stop);
            }
        }
    }
    if let Some(r) = &reason {
        ev.finish = Some((r.clone(), req.usage()));
    }
    entry.seq.tokens.push(token);
    if reason.is_some() {
        return Ok(Advance::Finished(ev));
    }
    if !req.sink.send(ev) {
        return Ok(Advance::Gone);
    }
    Ok(Advance::Continue)
}

enum Advance {
    Continue,
    /// The sequence ended; its last event is sent once it has left the scheduler.
    Finished(Event),
    /// The caller dropped its receiver: stop computing for it.
    Gone,
}

/// How a running sequence left in a step.
enum End {
    /// Finished: its last event, to send.
    Last(Event),
    /// Its caller went away.
    Gone,
    /// Its computation failed.
    Failed(String),
}

/// The KV budget on a GPU: `fraction` of its free memory less the weights (the
/// file's size bounds them: they stay as stored).
fn gpu_kv_budget(mem: GpuMemory, fraction: f64, weights: usize) -> Result<usize> {
    let usable = (mem.free as f64 * fraction) as usize;
    usable.checked_sub(weights).ok_or_else(|| {
        Error::DeviceUnavailable(format!(
            "the model ({weights} bytes) does not fit {fraction} of the GPU's free memory \
             ({} of {} bytes free)",
            mem.free, mem.total
        ))
    })
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
    // A context needs room for at least one prompt token and one generated token,
    // in whole blocks.
    if capacity < KV_BLOCK_SIZE {
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
        max_batch_tokens: opts.max_batch_tokens.max(opts.max_running),
        kv_blocks: capacity / KV_BLOCK_SIZE,
        kv_block_size: KV_BLOCK_SIZE,
        kv_bytes_per_token: per_token,
    })
}

/// The environment variable that names a token whose forward pass fails (by a
/// panic, the worst case): how the tests prove that one failing request fails alone.
pub const FAULT_TOKEN_VAR: &str = "ZSE_FAULT_TOKEN";

/// The fault token the environment names, announced on stderr: a server that fails
/// requests on purpose must never pass for a healthy one.
fn fault_token() -> Result<Option<u32>> {
    let Ok(v) = std::env::var(FAULT_TOKEN_VAR) else {
        return Ok(None);
    };
    let token = v.trim().parse().map_err(|_| {
        Error::invalid_argument(FAULT_TOKEN_VAR, format!("{v:?} is not a token id"))
    })?;
    eprintln!(
        "WARNING: {FAULT_TOKEN_VAR}={token} is set: every forward pass over token {token} \
         fails on purpose (a test hook). Unset it to serve normally."
    );
    Ok(Some(token))
}

/// Runs `f`, turning an error or a panic into its message.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic_message(&panic)),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error in the engine: {msg}")
}

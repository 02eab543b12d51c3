//! The engine thread: one per model. Requests come in through a channel; every step
//! asks the scheduler (`sched`) what to run, runs one forward pass over it (prompt
//! chunks and decode steps together), samples a token for each sequence whose known
//! tokens are all computed, and sends each request its events through its own
//! channel. Callers never hold a lock on the model, and a failure inside a
//! step fails the requests of that step, never the thread.
//!
//! - [`types`]: options, requests, events, the model's description, limits, counters;
//! - [`limits`]: the KV budget and queue bounds an engine's options come to;
//! - `worker`: the engine thread's loop and steps, and fault isolation;
//! - `output`: a sampled token into its event (detokenization, stop strings, ends).

mod limits;
mod output;
pub mod types;
mod worker;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::Device;

use crate::device::{device_name, gpu_memory, GpuMemory};
use crate::error::{Error, Result};
use crate::format::zse::ZseTensors;
use crate::format::ZseFile;
use crate::grammar::{Constraint, Grammars};
use crate::model::{Backend, Model};
use crate::sample::MAX_TOP_LOGPROBS;
use crate::sched::{Scheduler, SchedulerConfig, WindowConfig};
use crate::text::{ChatMessage, ChatTemplate, Tokenizer};

pub use types::*;
pub use worker::FAULT_TOKEN_VAR;

use limits::{gpu_kv_budget, resolve_limits, split_kv};
use worker::{fault_token, Worker};

enum Command {
    /// One request with `n` choices: ids and sinks, one per choice, and its
    /// compiled grammar (each choice gets its own copy).
    Submit(
        Vec<RequestId>,
        Box<GenerationRequest>,
        Vec<EventSink>,
        Option<Constraint>,
    ),
    Cancel(RequestId),
    Score(Vec<u32>, usize, Sender<Result<PositionLogprobs>>),
}

pub struct Engine {
    info: ModelInfo,
    device: Device,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    grammars: Grammars,
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
        let mut file = ZseFile::open(path)?;
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
        let mut limits = resolve_limits(&file.config, &opts, context_length)?;
        context_length = context_length.min(limits.kv_capacity_tokens());
        let prompt_bos = file.bos_token_id.filter(|_| file.add_bos_token);
        let chat_template = opts.chat_template.clone().or(file.chat_template.clone());
        let template = chat_template
            .as_deref()
            .map(ChatTemplate::new)
            .transpose()?;
        // The tokenizer is built before the weights load, not beside them: its build
        // is short-lived garbage of twice its size (Gemma 3's 262k tokens: some 110
        // MiB over 50), which beside the weights would set the load's peak memory.
        // The JSON is moved out of the file and freed once read, and the garbage is
        // handed back before the first weight is read.
        let tokenizer = Tokenizer::from_json(&std::mem::take(&mut file.tokenizer_json))?;
        crate::heap::trim();
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
        let tokenizer = Arc::new(tokenizer.with_prompt_bos(prompt_bos));
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
        split_kv(&mut limits, &model.layer_windows(), context_length);
        let info = ModelInfo {
            name: file.name.clone(),
            path: path.display().to_string(),
            config: file.config.clone(),
            context_length,
            quantization: file.quantization.clone(),
            provenance: file.provenance.clone(),
            file_size: file.gguf().file_size(),
            chat_template,
            bos_token: file.bos_token_id.and_then(|id| tokenizer.id_to_token(id)),
            eos_token_ids: file.eos_token_ids.clone(),
            limits: limits.clone(),
            weight_bytes: model.weight_bytes(),
            cpu_kernels: model.backend().name().to_string(),
            matrices_without_kernel: model.matrices_without_kernel(),
            device: device_name(&opts.device),
            kv_budget,
        };
        drop(file);
        crate::heap::trim();
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let window_blocks = limits.kv_window.map_or(0, |w| w.blocks);
        let pool = model.new_kv_pool(limits.kv_blocks, window_blocks, limits.kv_block_size)?;
        let sched = Scheduler::new(SchedulerConfig {
            max_running: limits.max_running,
            max_batch_tokens: limits.max_batch_tokens,
            num_blocks: limits.kv_blocks,
            block_size: limits.kv_block_size,
            max_positions: context_length,
            window: limits.kv_window.map(|w| WindowConfig {
                window: w.window,
                num_blocks: w.blocks,
            }),
        });
        let worker = Worker {
            model,
            pool,
            sched,
            tokenizer: tokenizer.clone(),
            eos: info.eos_token_ids.clone(),
            stats: stats.clone(),
            fault_token: match opts.fault_token {
                Some(t) => Some(t),
                None => fault_token()?,
            },
        };
        let thread = std::thread::Builder::new()
            .name("zse-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::EngineStopped(e.to_string()))?;
        let grammars = Grammars::new(
            tokenizer.clone(),
            info.config.vocab_size,
            info.eos_token_ids.first().copied(),
        );
        Ok(Self {
            info,
            device: opts.device.clone(),
            tokenizer,
            template,
            grammars,
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

    /// The prompt text for a chat, from the model's chat template; `extra` are more
    /// variables for it (`chat_template_kwargs`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| {
            Error::Template(
                "the model has no chat template: complete raw text instead \
                     (/v1/completions), or give one (--chat-template FILE, \
                     zse.Engine(chat_template=...))"
                    .into(),
            )
        })?;
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
            extra,
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
        // Compiled here, so that a schema the engine cannot use fails the call.
        let constraint = (req.grammar.as_ref())
            .map(|g| self.grammars.compile(g))
            .transpose()?;
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
        if let Err(e) = self.send(Command::Submit(
            ids.clone(),
            Box::new(req),
            sinks,
            constraint,
        )) {
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

#[cfg(test)]
mod tests;

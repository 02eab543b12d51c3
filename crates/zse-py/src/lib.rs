//! `zse._core`: the PyO3 bindings. Thin by design: argument conversion, error
//! mapping, and releasing the GIL while the engine works. The Python API with its
//! documentation lives in `python/zse/`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyException, PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::{create_exception, PyErr};
use zse_core::device::{parse_device, resolve_device_name};
use zse_core::engine::{Event, EventSink, RequestId};
use zse_core::format::{self, ConvertOptions, Quant, ZseFile, CONVERTER_REVISION};
use zse_core::grammar::Grammar;
use zse_core::{EngineOptions, Error, GenerationRequest, SamplingParams};

mod notify;

create_exception!(
    _core,
    ZseError,
    PyException,
    "Base class of ZSE's own errors."
);
create_exception!(
    _core,
    ModelFileError,
    ZseError,
    "A model file that is missing pieces, truncated or corrupt."
);
create_exception!(
    _core,
    UnsupportedModelError,
    ZseError,
    "A model ZSE cannot run (architecture, tensor type)."
);
create_exception!(
    _core,
    DeviceUnavailableError,
    ZseError,
    "The device asked for cannot be used: not in this build, absent, or too small."
);
create_exception!(
    _core,
    EngineStoppedError,
    ZseError,
    "The engine was shut down or failed."
);
create_exception!(
    _core,
    EngineOverloadedError,
    ZseError,
    "Too many requests are waiting to start; retry later."
);
create_exception!(
    _core,
    ContextLengthExceededError,
    PyValueError,
    "The prompt does not fit the context length."
);
create_exception!(
    _core,
    TemplateError,
    PyValueError,
    "The chat template failed to render."
);

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument { .. } | Error::Tokenizer(_) => PyValueError::new_err(msg),
        Error::InvalidFile { .. } => ModelFileError::new_err(msg),
        Error::Unsupported(_) => UnsupportedModelError::new_err(msg),
        Error::DeviceUnavailable(_) => DeviceUnavailableError::new_err(msg),
        Error::ContextLengthExceeded { .. } => ContextLengthExceededError::new_err(msg),
        Error::Template(_) => TemplateError::new_err(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::EngineStopped(_) => EngineStoppedError::new_err(msg),
        Error::Overloaded { .. } => EngineOverloadedError::new_err(msg),
        Error::Cancelled(_) | Error::Compute(_) | Error::Grammar(_) => ZseError::new_err(msg),
    }
}

fn json_err(e: serde_json::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// How often a blocked `RequestStream.__next__` lets Python handle signals.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Per token: (token id, logprob, [(alternative id, logprob), ...]).
type TokenLogprobTuple = (u32, f32, Vec<(u32, f32)>);

/// One event of a request: new text and tokens, and on the last one the finish.
#[pyclass(frozen, get_all, module = "zse._core")]
struct Chunk {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<TokenLogprobTuple>,
    finish_reason: Option<String>,
    error: Option<String>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl From<Event> for Chunk {
    fn from(ev: Event) -> Self {
        let (finish_reason, error, usage) = match ev.finish {
            Some((reason, usage)) => {
                let err = match &reason {
                    zse_core::FinishReason::Error(m) => Some(m.clone()),
                    _ => None,
                };
                (Some(reason.as_str().to_string()), err, usage)
            }
            None => (None, None, Default::default()),
        };
        Chunk {
            text: ev.text,
            token_ids: ev.tokens,
            logprobs: ev
                .logprobs
                .into_iter()
                .map(|l| (l.token, l.logprob, l.top))
                .collect(),
            finish_reason,
            error,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        }
    }
}

/// The events of one request. Iterating blocks (without the GIL) until the next
/// event; `try_next` never blocks. Dropping it cancels the request.
#[pyclass(module = "zse._core")]
struct RequestStream {
    id: RequestId,
    engine: Arc<zse_core::Engine>,
    rx: Mutex<Receiver<Event>>,
    finished: bool,
}

impl RequestStream {
    fn deliver(&mut self, ev: Event) -> Chunk {
        if ev.finish.is_some() {
            self.finished = true;
        }
        ev.into()
    }
}

fn stopped() -> PyErr {
    EngineStoppedError::new_err("the engine stopped before the request finished")
}

#[pymethods]
impl RequestStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Chunk>> {
        if self.finished {
            return Ok(None);
        }
        loop {
            let rx = &self.rx;
            let ev = py.detach(|| {
                rx.lock()
                    .map_err(|_| RecvTimeoutError::Disconnected)
                    .and_then(|r| r.recv_timeout(SIGNAL_CHECK_INTERVAL))
            });
            match ev {
                Ok(ev) => return Ok(Some(self.deliver(ev))),
                // Wake up now and then so that Ctrl-C reaches a waiting caller.
                Err(RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(RecvTimeoutError::Disconnected) => return Err(stopped()),
            }
        }
    }

    /// The next event if one is ready, else None.
    fn try_next(&mut self) -> PyResult<Option<Chunk>> {
        if self.finished {
            return Ok(None);
        }
        let ev = self.rx.lock().map_err(|_| stopped())?.try_recv();
        match ev {
            Ok(ev) => Ok(Some(self.deliver(ev))),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(stopped()),
        }
    }

    #[getter]
    fn finished(&self) -> bool {
        self.finished
    }

    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// Stops generation at the next step; a last chunk with finish_reason
    /// "cancelled" follows.
    fn cancel(&self) {
        if !self.finished {
            self.engine.cancel(self.id);
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.cancel(self.id);
        }
    }
}

#[pyclass(frozen, module = "zse._core")]
struct Engine {
    inner: Arc<zse_core::Engine>,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (
        path, *, context_length=None, kv_cache_dtype="f16", max_sequences=16, max_queue=256,
        kv_cache_bytes=None, max_batch_tokens=256, device="auto", gpu_memory_fraction=0.9,
        cpu_kernels=None, chat_template=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        context_length: Option<usize>,
        kv_cache_dtype: &str,
        max_sequences: usize,
        max_queue: usize,
        kv_cache_bytes: Option<usize>,
        max_batch_tokens: usize,
        device: &str,
        gpu_memory_fraction: f64,
        cpu_kernels: Option<String>,
        chat_template: Option<String>,
    ) -> PyResult<Self> {
        let kv_dtype = match kv_cache_dtype {
            "f16" => candle_core::DType::F16,
            "f32" => candle_core::DType::F32,
            other => {
                return Err(PyValueError::new_err(format!(
                    "invalid value for 'kv_cache_dtype': '{other}' (expected 'f16' or 'f32')"
                )))
            }
        };
        let device = parse_device(device).map_err(to_py)?;
        let opts = EngineOptions {
            context_length,
            device,
            gpu_memory_fraction,
            kv_dtype,
            max_running: max_sequences,
            max_waiting: max_queue,
            kv_cache_bytes,
            max_batch_tokens,
            cpu_kernels,
            fault_token: None,
            chat_template,
        };
        let inner = py
            .detach(|| zse_core::Engine::load(&path, opts))
            .map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Model metadata as a JSON object string.
    fn info_json(&self) -> String {
        let i = self.inner.info();
        serde_json::json!({
            "name": i.name,
            "path": i.path,
            "config": i.config,
            "context_length": i.context_length,
            "quantization": i.quantization,
            "source": i.provenance,
            "file_size": i.file_size,
            "chat_template": i.chat_template,
            "bos_token": i.bos_token,
            "eos_token_ids": i.eos_token_ids,
            "parameters": i.config.parameter_count(),
            "weight_bytes": i.weight_bytes,
            "cpu_kernels": i.cpu_kernels,
            "matrices_without_kernel": i.matrices_without_kernel,
            "device": i.device,
            "kv_budget": i.kv_budget.as_str(),
            "limits": {
                "max_sequences": i.limits.max_running,
                "max_queue": i.limits.max_waiting,
                "max_batch_tokens": i.limits.max_batch_tokens,
                "kv_cache_tokens": i.limits.kv_capacity_tokens(),
                "kv_blocks": i.limits.kv_blocks,
                "kv_block_size": i.limits.kv_block_size,
                "kv_bytes_per_token": i.limits.kv_bytes_per_token,
                "kv_bytes": i.limits.kv_bytes,
                "kv_window": i.limits.kv_window.map(|w| serde_json::json!({
                    "window": w.window, "blocks": w.blocks, "layers": w.layers,
                })),
            },
        })
        .to_string()
    }

    #[pyo3(signature = (text, add_bos=false))]
    fn tokenize(&self, text: &str, add_bos: bool) -> PyResult<Vec<u32>> {
        let tok = self.inner.tokenizer();
        match add_bos {
            true => tok.encode_prompt(text),
            false => tok.encode(text),
        }
        .map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens=true))]
    fn detokenize(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.inner
            .tokenizer()
            .decode(&ids, skip_special_tokens)
            .map_err(to_py)
    }

    /// The vocabulary entry of one token, raw (e.g. "Ġthe"), or None.
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tokenizer().id_to_token(id)
    }

    /// Renders `messages` (a JSON list of OpenAI-shaped messages) with the chat
    /// template; `kwargs_json`, a JSON object, gives the template more variables.
    #[pyo3(signature = (messages_json, add_generation_prompt, kwargs_json=None))]
    fn apply_chat_template(
        &self,
        messages_json: &str,
        add_generation_prompt: bool,
        kwargs_json: Option<&str>,
    ) -> PyResult<String> {
        let v: serde_json::Value = serde_json::from_str(messages_json).map_err(json_err)?;
        let msgs = zse_core::text::ChatMessage::parse_list(&v).map_err(to_py)?;
        let extra = match kwargs_json {
            None => serde_json::Map::new(),
            Some(text) => match serde_json::from_str(text).map_err(json_err)? {
                serde_json::Value::Object(m) => m,
                _ => {
                    return Err(PyValueError::new_err(
                        "invalid value for 'chat_template_kwargs': must be an object",
                    ))
                }
            },
        };
        self.inner
            .apply_chat_template(&msgs, add_generation_prompt, &extra)
            .map_err(to_py)
    }

    #[pyo3(signature = (
        prompt_ids, *, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, seed=None, max_tokens=None,
        stop=None, stop_token_ids=None, ignore_eos=false, logprobs=None, n=1, notify=None,
        response_format=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        prompt_ids: Vec<u32>,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        min_p: f32,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        logit_bias: Option<Vec<(u32, f32)>>,
        seed: Option<u64>,
        max_tokens: Option<usize>,
        stop: Option<Vec<String>>,
        stop_token_ids: Option<Vec<u32>>,
        ignore_eos: bool,
        logprobs: Option<usize>,
        n: usize,
        notify: Option<Py<PyAny>>,
        response_format: Option<&str>,
    ) -> PyResult<Vec<RequestStream>> {
        let grammar = match response_format {
            Some(text) => {
                let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    PyValueError::new_err(format!("invalid value for 'response_format': {e}"))
                })?;
                Grammar::from_response_format(&v).map_err(to_py)?
            }
            None => None,
        };
        let req = GenerationRequest {
            prompt: prompt_ids,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                logit_bias: logit_bias.unwrap_or_default(),
                seed,
            },
            max_tokens,
            stop: stop.unwrap_or_default(),
            stop_token_ids: stop_token_ids.unwrap_or_default(),
            ignore_eos,
            logprobs,
            grammar,
        };
        if n == 0 {
            return Err(PyValueError::new_err(
                "invalid value for 'n': must be at least 1",
            ));
        }
        // One callback for all `n` choices, called on the notifier thread.
        let notify = notify.map(Arc::new);
        let mut sinks = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let hook = notify.as_ref().map(notify::hook).transpose()?;
            let (sink, rx) = EventSink::channel(hook);
            sinks.push(sink);
            receivers.push(rx);
        }
        // Without the GIL: the first request with a grammar builds the vocabulary's
        // token trie (about a second for Gemma 3's 262k tokens).
        let ids = py
            .detach(|| self.inner.submit_n(req, sinks))
            .map_err(to_py)?;
        Ok(ids
            .into_iter()
            .zip(receivers)
            .map(|(id, rx)| RequestStream {
                id,
                engine: self.inner.clone(),
                rx: Mutex::new(rx),
                finished: false,
            })
            .collect())
    }

    /// Teacher-forced top-`top` log-probabilities for every position of `tokens`.
    fn score(
        &self,
        py: Python<'_>,
        tokens: Vec<u32>,
        top: usize,
    ) -> PyResult<Vec<Vec<(u32, f32)>>> {
        py.detach(|| self.inner.score(&tokens, top)).map_err(to_py)
    }

    /// The engine's counters now: running and waiting sequences, finished requests,
    /// KV blocks in use and positions filled, prefix-cache lookups and hits (in
    /// positions), preemptions.
    /// `(used, total)` bytes of the GPU the engine runs on (every process's use, as
    /// the driver reports it); None on the CPU.
    fn gpu_memory(&self) -> PyResult<Option<(usize, usize)>> {
        let mem = self.inner.gpu_memory().map_err(to_py)?;
        Ok(mem.map(|m| (m.used(), m.total)))
    }

    fn stats(&self) -> HashMap<&'static str, u64> {
        let s = self.inner.stats();
        let get = |a: &AtomicUsize| a.load(Ordering::Relaxed) as u64;
        HashMap::from([
            ("running", get(&s.running)),
            ("waiting", get(&s.waiting)),
            ("finished", s.finished.load(Ordering::Relaxed)),
            ("kv_blocks_used", get(&s.kv_blocks_used)),
            ("kv_window_blocks_used", get(&s.kv_window_blocks_used)),
            ("kv_used_tokens", get(&s.kv_used_tokens)),
            (
                "prefix_query_tokens",
                s.prefix_query_tokens.load(Ordering::Relaxed),
            ),
            (
                "prefix_hit_tokens",
                s.prefix_hit_tokens.load(Ordering::Relaxed),
            ),
            ("preemptions", s.preemptions.load(Ordering::Relaxed)),
        ])
    }

    /// Stops the engine thread and waits for it (the GIL released meanwhile).
    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.inner.shutdown());
    }
}

/// Converts a GGUF file or HF directory to `.zse`. `progress(done, total, name)` is
/// called per tensor; an exception it raises (KeyboardInterrupt) aborts the work.
#[pyfunction]
#[pyo3(signature = (src, out, quant=None, progress=None, allow_requantize=false))]
fn convert(
    py: Python<'_>,
    src: PathBuf,
    out: PathBuf,
    quant: Option<&str>,
    progress: Option<Py<PyAny>>,
    allow_requantize: bool,
) -> PyResult<String> {
    let options = ConvertOptions {
        quant: quant.map(str::parse::<Quant>).transpose().map_err(to_py)?,
        allow_requantize,
    };
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut cb = |done: usize, total: usize, name: &str| -> zse_core::Result<()> {
            let Some(p) = &progress else { return Ok(()) };
            Python::attach(|py| p.call1(py, (done, total, name)).map(|_| ())).map_err(|e| {
                raised = Some(e);
                Error::Cancelled("conversion stopped by the progress callback".into())
            })
        };
        format::convert(&src, &out, options, &mut cb)
    });
    if let Some(e) = raised {
        return Err(e);
    }
    let r = result.map_err(to_py)?;
    Ok(serde_json::json!({
        "output": r.output, "tensors": r.tensors, "bytes": r.bytes,
        "quantization": r.quantization, "source_sha256": r.source_sha256,
        "requantized": r.requantized.iter().map(|q| serde_json::json!({
            "name": q.name, "from": q.from.to_string(), "to": q.to.to_string(),
        })).collect::<Vec<_>>(),
    })
    .to_string())
}

/// What is inside a `.zse` file, as a JSON object string, without loading weights;
/// the tokenizer's type and size only where `tokenizer` asks (reading Gemma 3's
/// 262k-token vocabulary takes most of a second, which checking a cached file's
/// provenance before loading it should not spend).
#[pyfunction]
#[pyo3(signature = (path, tokenizer = true))]
fn inspect(py: Python<'_>, path: PathBuf, tokenizer: bool) -> PyResult<String> {
    let f = py.detach(|| ZseFile::open(&path)).map_err(to_py)?;
    let tokenizer = if tokenizer {
        let tok = py
            .detach(|| zse_core::text::Tokenizer::from_json(&f.tokenizer_json))
            .map_err(to_py)?;
        serde_json::json!({"type": tok.model_type(), "vocab_size": tok.vocab_size()})
    } else {
        serde_json::Value::Null
    };
    let types = f.tensor_types();
    Ok(serde_json::json!({
        "name": f.name,
        "config": f.config,
        "parameters": f.config.parameter_count(),
        "quantization": f.quantization,
        "tensor_types": types,
        "file_size": f.gguf().file_size(),
        "tokenizer": tokenizer,
        "chat_template": f.chat_template,
        "bos_token_id": f.bos_token_id,
        "eos_token_ids": f.eos_token_ids,
        "source": f.provenance,
    })
    .to_string())
}

/// The device a spec (`cpu`, `cuda`, `cuda:N`, `auto`) resolves to here, as
/// `cpu` or `cuda:N`, without opening it.
#[pyfunction]
fn resolve_device(spec: &str) -> PyResult<String> {
    resolve_device_name(spec).map_err(to_py)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Engine>()?;
    m.add_class::<RequestStream>()?;
    m.add_class::<Chunk>()?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_device, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add("ZseError", py.get_type::<ZseError>())?;
    m.add("ModelFileError", py.get_type::<ModelFileError>())?;
    m.add(
        "UnsupportedModelError",
        py.get_type::<UnsupportedModelError>(),
    )?;
    m.add(
        "DeviceUnavailableError",
        py.get_type::<DeviceUnavailableError>(),
    )?;
    m.add("EngineStoppedError", py.get_type::<EngineStoppedError>())?;
    m.add(
        "EngineOverloadedError",
        py.get_type::<EngineOverloadedError>(),
    )?;
    m.add(
        "ContextLengthExceededError",
        py.get_type::<ContextLengthExceededError>(),
    )?;
    m.add("TemplateError", py.get_type::<TemplateError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CONVERTER_REVISION", CONVERTER_REVISION)?;
    // Wake-up hooks stop before the interpreter finalizes (see `notify`).
    py.import("atexit")?
        .call_method1("register", (wrap_pyfunction!(notify::close, m)?,))?;
    Ok(())
}

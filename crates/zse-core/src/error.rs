//! One error type for the whole engine. Every failure a user can cause (a bad file,
//! a bad argument, a template that does not render) is a value of this type, never a
//! panic, so that the Python bindings and the server can turn it into a clean error.

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument from the caller is out of range or malformed; `param` names it.
    #[error("invalid value for '{param}': {message}")]
    InvalidArgument { param: String, message: String },

    /// A model file that is not what it claims to be: truncated, corrupt, wrong magic.
    #[error("invalid model file {path}: {message}")]
    InvalidFile { path: String, message: String },

    /// A well-formed model that ZSE cannot run (architecture, tensor type, shape).
    #[error("unsupported model: {0}")]
    Unsupported(String),

    /// The device asked for cannot be used: not in this build, not present, or too
    /// small for the model.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),

    /// The prompt (plus at least one generated token) does not fit the context.
    #[error(
        "the prompt has {prompt_tokens} tokens but the model's context length is {context_length}"
    )]
    ContextLengthExceeded {
        prompt_tokens: usize,
        context_length: usize,
    },

    #[error("chat template error: {0}")]
    Template(String),

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },

    /// The queue of requests waiting to start is full; the caller may retry later.
    #[error("the engine is overloaded: {waiting} requests are already waiting")]
    Overloaded { waiting: usize },

    /// The engine thread is gone (shut down, or it failed).
    #[error("engine is not running: {0}")]
    EngineStopped(String),

    /// The caller stopped a long operation (e.g. Ctrl-C during a conversion).
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// The grammar engine failed on a sequence it had accepted: a bug, never the
    /// caller's fault (a grammar the caller got wrong is `InvalidArgument`).
    #[error("the output grammar failed: {0}")]
    Grammar(String),

    /// A failure inside the tensor library: a bug, never the caller's fault.
    #[error("tensor computation failed: {0}")]
    Compute(String),
}

impl Error {
    pub fn invalid_argument(param: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            param: param.into(),
            message: message.to_string(),
        }
    }

    pub fn invalid_file(path: impl fmt::Display, message: impl fmt::Display) -> Self {
        Error::InvalidFile {
            path: path.to_string(),
            message: message.to_string(),
        }
    }

    pub fn io(path: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_string(),
            source,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Compute(e.to_string())
    }
}

//! The model crate's error type.
//!
//! Every failure that comes from outside the process (a config file, a
//! checkpoint on disk, a token id from a user) is a [`ModelError`] value with a
//! message that names the file, tensor or field at fault; nothing here panics
//! on such input.

use std::path::PathBuf;

/// What went wrong, in a closed set that callers (and later the services'
/// `kind()` tables) can act on without reading messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller asked for something impossible (bad token id, empty prompt).
    InvalidInput,
    /// The model folder is unusable (bad config, missing or malformed tensor).
    BadCheckpoint,
    /// The operating system refused (file missing, unreadable, mmap failed).
    Io,
    /// A remote part (an expert worker) could not do its share.
    Unavailable,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },

    /// Display shows the context only; the OS error is the `source()` that
    /// error reporters print after it.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Routed experts could not be run where they live (names layer and worker).
    #[error("{0}")]
    Unavailable(String),
}

impl ModelError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ModelError::InvalidInput(_) => ErrorKind::InvalidInput,
            ModelError::Io { .. } => ErrorKind::Io,
            ModelError::Unavailable(_) => ErrorKind::Unavailable,
            ModelError::Config { .. }
            | ModelError::Checkpoint { .. }
            | ModelError::Tensor { .. }
            | ModelError::Tokenizer(_) => ErrorKind::BadCheckpoint,
        }
    }

    pub(crate) fn tensor(name: &str, message: impl Into<String>) -> Self {
        ModelError::Tensor { name: name.to_string(), message: message.into() }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ModelError::Io { context: context.into(), source }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

//! The model crate's one error type. Every variant names the file (and, where
//! it applies, the tensor or field) so that a user can see what to fix.

use std::path::PathBuf;

/// Errors from loading backbones, tokenizers and running the alignment step.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: tensor `{name}` is missing (expected {what})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        what: String,
    },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    #[error("{path}: malformed {format} file: {message}")]
    Format {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenizer {path} has {tokenizer} tokens but the model's embedding has {model} rows")]
    VocabMismatch {
        path: PathBuf,
        tokenizer: usize,
        model: usize,
    },
    #[error("BLAS library {library}: {message}")]
    Blas { library: String, message: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn format(
        path: impl Into<PathBuf>,
        format: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self::Format {
            path: path.into(),
            format,
            message: message.into(),
        }
    }
}

//! fedcmp-data: image-caption corpora, image preprocessing and caption
//! templates. (Manifests, the feature cache, partitioners and scenarios
//! arrive with issue 3.)
//!
//! - [`idx`]: the IDX format of MNIST and Fashion-MNIST (gzip or raw);
//! - [`preprocess`]: resize, center crop and normalisation for an encoder;
//! - [`templates`]: caption templates per domain, as TOML data.

pub mod idx;
pub mod preprocess;
pub mod record;
pub mod templates;

use std::path::PathBuf;

/// Errors from reading corpora and templates.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

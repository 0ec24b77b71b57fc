//! fedcmp-data: everything between raw image-caption data and the features
//! a federated client trains on.
//!
//! - [`record`]: the one record type, and the skip report for bad input;
//! - [`corpus`]: readers (LLaVA JSON, JSONL/CSV manifests, the offline
//!   registry sources) producing records;
//! - [`idx`]: the IDX format of MNIST and Fashion-MNIST (gzip or raw);
//! - [`preprocess`]: resize, center crop and normalisation for an encoder;
//! - [`templates`]: caption templates per domain, as TOML data;
//! - [`cache`]: the frozen-feature cache (each image encoded once);
//! - [`scenario`]: the four standard scenarios as TOML data, resolved into
//!   clients' shards;
//! - [`partition`]: seeded splits and partitioners (iid, Dirichlet,
//!   by-source, power-law) and k-means concepts.

pub mod cache;
pub mod corpus;
pub mod idx;
pub mod partition;
pub mod preprocess;
pub mod record;
pub mod scenario;
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
    /// A scenario file (configuration, not data) that is missing or invalid.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Partition(#[from] partition::PartitionError),
    #[error(transparent)]
    Model(#[from] fedcmp_model::ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

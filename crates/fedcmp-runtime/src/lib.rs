//! fedcmp-runtime: everything between a scenario and a trained projector,
//! shared by simulation and deployment.
//!
//! - [`convert`]: the projector's candle variables <-> the `ParamSet` that
//!   travels;
//! - [`client`]: a client's private data, its persistent state (one-pass
//!   cursor, optimiser moments, control variate) and local training;
//! - [`transport`]: how instructions reach clients and updates come back
//!   (in-process here; gRPC in the network crate);
//! - [`engine`]: the round loop: sample, instruct, train, aggregate,
//!   evaluate, record.

pub mod checkpoint;
pub mod client;
pub mod convert;
pub mod engine;
pub mod eval;
pub mod suite;
pub mod transport;

use std::path::PathBuf;

/// Errors from running a federation.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Model(#[from] fedcmp_model::ModelError),
    #[error(transparent)]
    Data(#[from] fedcmp_data::DataError),
    #[error(transparent)]
    Strategy(#[from] fedcmp_strategy::StrategyError),
    #[error(transparent)]
    Core(#[from] fedcmp_core::CoreError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid run configuration: {0}")]
    Config(String),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

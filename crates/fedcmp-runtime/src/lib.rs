//! fedcmp-runtime: everything between a scenario and a trained projector,
//! shared by simulation and deployment.
//!
//! - [`convert`]: the projector's candle variables <-> the `ParamSet` that
//!   travels;
//! - [`client`]: a client's private data, its state between rounds
//!   (one-pass cursor, optimiser moments, control variate) and local
//!   training of one round task;
//! - [`local`]: one round of local training for any loss, with the local
//!   objectives (FedProx, SCAFFOLD) kept true under AdamW;
//! - [`node`]: a client node answering round tasks and status queries,
//!   with its own state store ([`client_store`]);
//! - [`transport`]: how round tasks reach clients and replies come back
//!   (in process here; over Flower for real sites), and
//!   [`simulation`]: dropouts and stragglers as a wrapper around one,
//!   [`hostile`]: clients that send corrupted updates, another;
//! - [`round_loop`]: the server's loop: sample, send tasks, aggregate,
//!   evaluate, record; [`checkpoint`]: its state on disk;
//! - [`eval`], [`suite`]: held-out evaluation.

pub mod checkpoint;
pub mod client;
pub mod client_store;
pub mod convert;
pub mod eval;
pub mod hostile;
pub mod local;
pub mod node;
pub mod round_loop;
pub mod simulation;
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

/// An I/O error that names its path.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

//! fedcmp-experiment: everything between a user's settings and trained,
//! evaluated projectors, as a library that the `fedcmp` binary, the tests
//! and a Python or site process call alike. It never prints: progress and
//! results reach the caller as [`events`] and return values.
//!
//! - [`settings`]: run settings in two tiers, raw options merged from
//!   flags, a TOML file and the environment, then resolved and validated
//!   once ([`RunSettings`]);
//! - [`assets`], [`backbones`], [`federation`]: fetching what a scenario
//!   needs, loading the frozen backbones, building a scenario's federation
//!   (with k-means concepts for unlabelled images);
//! - [`assembly`]: a scenario assembled on its data and backbones
//!   ([`Experiment`]: shards, held-out splits, feature cache, evaluation
//!   suite);
//! - [`init_suite`]: the untrained projector's suite, memoised per seed;
//! - [`training`]: the three kinds of training (federated, centralized,
//!   local-only) through the one round loop;
//! - [`pilot`]: single-source scenarios for quick centralized checks;
//! - [`probe`]: the linear probe of the frozen features (the ceiling);
//! - [`run_folder`]: a run's folder (pinned settings, metrics, checkpoints,
//!   client states, resume, summary) and `fedcmp run` as a function;
//! - [`compare`]: the comparison protocol (typed tuning grids, seeds,
//!   resumable cells);
//! - [`harness`]: the counterfactual harness that scores aggregation
//!   rules on recorded client updates;
//! - [`sites`] and [`server`]: a federation across sites (a site answering
//!   round tasks on its own data; the server's round loop over any
//!   transport; a scenario dealt into site folders);
//! - [`saved`], [`export`] and [`use_saved`]: a trained projector found in
//!   a run or comparison folder, written in the LLaVA and Hugging Face
//!   layouts, captioning a user's images, evaluated on any scenario;
//! - [`files`]: atomic writes and settings pinning, in one place.

pub mod assembly;
pub mod assets;
pub mod backbones;
pub mod compare;
pub mod events;
pub mod export;
pub mod federation;
pub mod files;
pub mod harness;
pub mod init_suite;
pub mod pilot;
pub mod probe;
pub mod run_folder;
pub mod saved;
pub mod server;
pub mod settings;
pub mod sites;
pub mod training;
pub mod use_saved;

use std::path::PathBuf;

pub use assembly::Experiment;
pub use events::{Event, Observer, Silent};
pub use settings::{Layers, RunOptions, RunSettings, Training};

/// Errors from preparing, running and recording experiments.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error(transparent)]
    Runtime(#[from] fedcmp_runtime::RuntimeError),
    #[error(transparent)]
    Model(#[from] fedcmp_model::ModelError),
    #[error(transparent)]
    Data(#[from] fedcmp_data::DataError),
    #[error(transparent)]
    Strategy(#[from] fedcmp_strategy::StrategyError),
    #[error(transparent)]
    Core(#[from] fedcmp_core::CoreError),
    #[error(transparent)]
    Assets(#[from] fedcmp_assets::AssetError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A setting with a bad value: the field, where it was set, and what
    /// was expected.
    #[error("{field} = {value} ({origin}): {reason}")]
    Setting {
        field: String,
        value: String,
        origin: String,
        reason: String,
    },
    /// A file that is not what it should be (a config file that does not
    /// parse, a folder made with other settings, ...).
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    /// A failure of fedcmp itself (a value that cannot be encoded, a thread
    /// pool that cannot start), not of anything the user gave.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<ExperimentError>,
    },
}

impl ExperimentError {
    /// This error with what was being done when it happened.
    pub fn context(self, context: impl Into<String>) -> Self {
        Self::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = ExperimentError> = std::result::Result<T, E>;

/// An I/O error that names its path.
pub(crate) fn io_error(
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> ExperimentError + '_ {
    move |source| ExperimentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

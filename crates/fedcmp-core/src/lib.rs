//! fedcmp-core: the types every federated component shares, and nothing
//! heavy: no candle, no tokio, no network.
//!
//! - [`params`]: a projector's parameters as named f32 tensors (what travels);
//! - [`update`]: client ids, the typed instruction a client gets each round,
//!   and the update it sends back;
//! - [`schedule`]: the learning-rate schedule (plain data: it travels);
//! - [`task`]: the round protocol (the task a client gets, its reply and
//!   status, failures);
//! - [`metrics`]: named numbers a round reports, and their names;
//! - [`wire`]: tasks and replies as a JSON header plus named arrays, for
//!   transports that carry arrays (Flower).

pub mod metrics;
pub mod params;
pub mod schedule;
pub mod task;
pub mod update;
pub mod wire;

pub use metrics::RoundMetrics;
pub use params::{ParamSet, ParamTensor};
pub use schedule::WarmupCosine;
pub use task::{ClientFailure, ClientReply, ClientStatus, FailureKind, RoundTask};
pub use update::{ClientId, ClientInstruction, ClientUpdate, LocalObjective};

/// An error and its sources on one line, joined by `: `, each text once:
/// many errors already put their source in their own message (`{context}:
/// {source}`) and return it as their source too. What users see, from
/// the command line and from the Python package alike.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Errors from combining parameter sets and updates.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error("parameter `{name}`: shape {got:?} does not match {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(
        "parameter sets differ: `{got}` where `{expected}` was expected (position {position})"
    )]
    NameMismatch {
        position: usize,
        expected: String,
        got: String,
    },
    #[error("parameter sets have {expected} and {got} entries")]
    LengthMismatch { expected: usize, got: usize },
    #[error("parameter `{name}`: {len} values cannot have shape {shape:?}")]
    BadTensor {
        name: String,
        shape: Vec<usize>,
        len: usize,
    },
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

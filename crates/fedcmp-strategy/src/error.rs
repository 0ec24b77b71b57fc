//! The crate's one error type. Every variant that concerns a client's
//! update names the client (and the parameter, where there is one), so a
//! failed round says whom to look at.

use fedcmp_core::{ClientId, CoreError};

/// Errors from configuring, running or restoring a strategy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    #[error(transparent)]
    Core(#[from] CoreError),

    #[error("round {round}: no client updates to aggregate")]
    NoUpdates { round: u64 },

    #[error("round {round}: the updates carry no samples (every num_samples is 0)")]
    NoSamples { round: u64 },

    #[error("client {}: sent more than one update this round", .client.0)]
    DuplicateClient { client: ClientId },

    #[error("client {}: parameters do not match the global model: {detail}", .client.0)]
    LayoutMismatch { client: ClientId, detail: CoreError },

    #[error("client {}: non-finite value in `{parameter}`", .client.0)]
    NonFinite { client: ClientId, parameter: String },

    #[error("client {}: {reason}", .client.0)]
    InvalidUpdate { client: ClientId, reason: String },

    #[error("global parameter `{parameter}` holds a non-finite value")]
    NonFiniteGlobal { parameter: String },

    #[error("the server step produced a non-finite value in `{parameter}`; state left unchanged")]
    NonFiniteResult { parameter: String },

    #[error(
        "round {round}: {participants} clients participated but the federation has only {total}"
    )]
    TooManyClients {
        round: u64,
        participants: usize,
        total: usize,
    },

    /// The rule cannot aggregate this round's updates (too few clients
    /// for its guarantee); the state is unchanged.
    #[error("round {round}: {reason}")]
    RoundRefused { round: u64, reason: String },

    #[error("strategy state: {reason}")]
    State { reason: String },

    #[error("strategy state `{key}` does not match the global model: {detail}")]
    StateLayout { key: String, detail: CoreError },

    #[error("invalid strategy configuration: `{field}` {reason}")]
    Config { field: String, reason: String },

    /// Two working vectors of different lengths met in an operation; this
    /// is a bug in the caller, reported instead of silently truncating.
    #[error("internal: {what} has {got} values where {expected} were expected")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = StrategyError> = std::result::Result<T, E>;

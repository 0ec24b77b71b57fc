//! fedcmp-strategy: the server side of federated pretraining of the
//! projector. Pure and synchronous: no candle, no tokio, no I/O.
//!
//! A [`Strategy`] tells clients what to optimise ([`Strategy::configure_round`]),
//! turns their updates into the next global model ([`Strategy::aggregate`]),
//! and exposes all the state it carries between rounds
//! ([`Strategy::state`] / [`Strategy::load_state`]).
//!
//! Layout:
//! - [`ops`]: the only place shared math lives (f64 accumulation, fixed
//!   order);
//! - [`round`]: validation of a round's updates, deltas, common metrics;
//! - [`compose`]: a strategy = client protocol + aggregator + server
//!   optimiser ([`Composed`]);
//! - [`mean`]: the weighted mean of deltas; [`server_opt`]: SGD, heavy-ball
//!   momentum, Adagrad/Adam/Yogi;
//! - one file per algorithm: [`fedavg`], [`fedprox`], [`fedavgm`],
//!   [`fedopt`] (FedAdagrad/FedAdam/FedYogi), [`scaffold`], [`fednova`],
//!   [`ties`], [`cra`] (Fed-CMP's canonical reliability-aware
//!   aggregation), [`opm`] (its orthogonality-preserved momentum; Fed-CMP);
//! - [`privacy`]: differential privacy (the RDP accountant);
//! - [`robust`]: byzantine-robust rules (median, trimmed mean, Krum, norm
//!   bounding), each with a plain or momentum server step;
//! - [`config`]: [`StrategyConfig`], by name, validated, built (the
//!   registry; the checks it and the algorithms share are in `validate`).

pub mod compose;
pub mod config;
pub mod cra;
pub mod dense;
mod error;
pub mod fedavg;
pub mod fedavgm;
pub mod fednova;
pub mod fedopt;
pub mod fedprox;
pub mod mean;
pub mod opm;
pub mod ops;
pub mod privacy;
pub mod robust;
pub mod round;
pub mod scaffold;
pub mod server_opt;
mod state;
pub mod ties;
mod validate;

use std::fmt;

use fedcmp_core::{ClientId, ClientInstruction, ClientUpdate, ParamSet, RoundMetrics};

pub use compose::Composed;
pub use config::StrategyConfig;
pub use error::{Result, StrategyError};
pub use state::StrategyState;

/// The outcome of one aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The next global model.
    pub params: ParamSet,
    /// The round's diagnostics (see [`round`] for the names).
    pub metrics: RoundMetrics,
}

/// A federated server algorithm.
///
/// The global model is passed in explicitly; between calls a strategy keeps
/// only what [`Strategy::state`] returns. `aggregate` is transactional: on
/// error, the state is unchanged.
pub trait Strategy: fmt::Debug + Send {
    /// The config name (`fedavg`, `scaffold`, ...).
    fn name(&self) -> &str;

    /// One typed instruction per client, in the order given.
    fn configure_round(&self, round: u64, clients: &[ClientId]) -> Vec<ClientInstruction>;

    /// The next global model from `global` (what the clients started from)
    /// and their updates (in any order; the result does not depend on it).
    fn aggregate(
        &mut self,
        round: u64,
        global: &ParamSet,
        updates: &[ClientUpdate],
    ) -> Result<Aggregate>;

    /// Everything carried to the next round.
    fn state(&self) -> StrategyState;

    /// Restores what [`Strategy::state`] returned (same algorithm); the next
    /// round is then bit-identical to an uninterrupted run.
    fn load_state(&mut self, state: StrategyState) -> Result<()>;
}

//! FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep
//! Networks from Decentralized Data"), with a server learning rate:
//!
//! ```text
//! theta_{t+1} = theta_t + eta_s * sum_k p_k (theta_k - theta_t),
//! p_k = n_k / sum_j n_j
//! ```
//!
//! = [`WeightedMean`] (data weights) + [`Sgd`]. `eta_s = 1` is the paper's
//! weighted average of client models. Sends `LocalObjective::Plain`; keeps
//! no state.

use serde::{Deserialize, Serialize};

use crate::compose::{Composed, Plain};
use crate::mean::{WeightedMean, Weighting};
use crate::server_opt::Sgd;
use crate::validate::positive;
use crate::Result;

/// The config name.
pub const NAME: &str = "fedavg";

/// FedAvg's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FedAvgConfig {
    /// `eta_s` (> 0).
    pub server_lr: f64,
}

impl Default for FedAvgConfig {
    fn default() -> Self {
        Self { server_lr: 1.0 }
    }
}

impl FedAvgConfig {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)
    }
}

/// FedAvg as composed parts.
pub type FedAvg = Composed<Plain, WeightedMean, Sgd>;

/// Builds FedAvg after validating `config`.
pub fn fedavg(config: &FedAvgConfig) -> Result<FedAvg> {
    config.validate()?;
    Ok(Composed::new(
        NAME,
        Plain,
        WeightedMean::new(Weighting::Samples),
        Sgd::new(config.server_lr),
    ))
}

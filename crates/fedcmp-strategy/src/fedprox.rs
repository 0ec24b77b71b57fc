//! FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous
//! Networks"): FedAvg on the server, and a proximal term on every client:
//!
//! ```text
//! client k minimises  F_k(theta) + (mu / 2) ||theta - theta_t||^2
//! theta_{t+1} = theta_t + eta_s * sum_k p_k (theta_k - theta_t)
//! ```
//!
//! = [`Proximal`] instructions + FedAvg's [`WeightedMean`] + [`Sgd`].
//! Sends `LocalObjective::Proximal { mu }` (also for `mu = 0`, where the
//! client's objective, and so the whole algorithm, is exactly FedAvg).
//! Keeps no state.

use fedcmp_core::{ClientId, LocalObjective};
use serde::{Deserialize, Serialize};

use crate::compose::{ClientProtocol, Composed};
use crate::mean::{WeightedMean, Weighting};
use crate::server_opt::Sgd;
use crate::validate::{non_negative, positive};
use crate::Result;

/// The config name.
pub const NAME: &str = "fedprox";

/// FedProx's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FedProxConfig {
    /// Proximal weight `mu` (>= 0).
    pub mu: f64,
    /// `eta_s` (> 0).
    pub server_lr: f64,
}

impl Default for FedProxConfig {
    fn default() -> Self {
        Self {
            mu: 0.01,
            server_lr: 1.0,
        }
    }
}

impl FedProxConfig {
    pub fn validate(&self) -> Result<()> {
        non_negative("mu", self.mu)?;
        positive("server-lr", self.server_lr)
    }
}

/// Tells every client to add `(mu / 2) ||theta - theta_t||^2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Proximal {
    pub mu: f64,
}

impl ClientProtocol for Proximal {
    fn objective(&self, _round: u64, _client: ClientId) -> LocalObjective {
        LocalObjective::Proximal { mu: self.mu }
    }
}

/// FedProx as composed parts.
pub type FedProx = Composed<Proximal, WeightedMean, Sgd>;

/// Builds FedProx after validating `config`.
pub fn fedprox(config: &FedProxConfig) -> Result<FedProx> {
    config.validate()?;
    Ok(Composed::new(
        NAME,
        Proximal { mu: config.mu },
        WeightedMean::new(Weighting::Samples),
        Sgd::new(config.server_lr),
    ))
}

//! FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated
//! Optimization", Algorithm 2): an adaptive optimiser on the server, plain
//! local training on the clients.
//!
//! ```text
//! Delta_t = sum_k p_k (theta_k - theta_t)
//! m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
//! v_t = (Adagrad | Adam | Yogi rule, see `server_opt::Adaptive`)
//! theta_{t+1} = theta_t + eta * m_t / (sqrt(v_t) + tau)
//! ```
//!
//! = [`WeightedMean`] + [`Adaptive`]. No bias correction (the paper has
//! none). Algorithm 2 writes the uniform mean `1/|S| sum Delta_k`; here the
//! mean is data-weighted like every other baseline (ALGORITHMS.md §2), which
//! is the same thing when clients consume equal sample counts.
//! Sends `LocalObjective::Plain`. State: `m` and `v` (keys `first_moment`,
//! `second_moment`).
//!
//! The defaults (eta = 1e-2, beta1 = 0.9, beta2 = 0.99, tau = 1e-3) are the
//! paper's usual ranges, a starting point for the tuning ALGORITHMS.md §5
//! requires, not a recommendation.

use serde::{Deserialize, Serialize};

use crate::compose::{Composed, Plain};
use crate::mean::{WeightedMean, Weighting};
use crate::server_opt::{Adaptive, AdaptiveRule};
use crate::validate::{positive, unit_interval};
use crate::Result;

/// Config names.
pub const FEDADAGRAD: &str = "fedadagrad";
pub const FEDADAM: &str = "fedadam";
pub const FEDYOGI: &str = "fedyogi";

/// FedAdagrad's hyper-parameters (no `beta2`: Adagrad does not decay `v`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FedAdagradConfig {
    /// `eta` (> 0).
    pub server_lr: f64,
    /// `beta1` in [0, 1) (0 = no first-moment averaging).
    pub beta1: f64,
    /// `tau` (> 0), the adaptivity floor.
    pub tau: f64,
}

impl Default for FedAdagradConfig {
    fn default() -> Self {
        Self {
            server_lr: 1e-2,
            beta1: 0.9,
            tau: 1e-3,
        }
    }
}

impl FedAdagradConfig {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)?;
        unit_interval("beta1", self.beta1)?;
        positive("tau", self.tau)
    }
}

/// FedAdam's and FedYogi's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FedAdaptiveConfig {
    /// `eta` (> 0).
    pub server_lr: f64,
    /// `beta1` in [0, 1).
    pub beta1: f64,
    /// `beta2` in [0, 1).
    pub beta2: f64,
    /// `tau` (> 0), the adaptivity floor.
    pub tau: f64,
}

impl Default for FedAdaptiveConfig {
    fn default() -> Self {
        Self {
            server_lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

impl FedAdaptiveConfig {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)?;
        unit_interval("beta1", self.beta1)?;
        unit_interval("beta2", self.beta2)?;
        positive("tau", self.tau)
    }
}

/// FedAdagrad / FedAdam / FedYogi as composed parts.
pub type FedOpt = Composed<Plain, WeightedMean, Adaptive>;

fn compose(name: &'static str, optimizer: Adaptive) -> FedOpt {
    Composed::new(
        name,
        Plain,
        WeightedMean::new(Weighting::Samples),
        optimizer,
    )
}

/// Builds FedAdagrad after validating `config`.
pub fn fedadagrad(config: &FedAdagradConfig) -> Result<FedOpt> {
    config.validate()?;
    Ok(compose(FEDADAGRAD, config.optimizer()))
}

/// Builds FedAdam after validating `config`.
pub fn fedadam(config: &FedAdaptiveConfig) -> Result<FedOpt> {
    config.validate()?;
    Ok(compose(FEDADAM, adaptive(AdaptiveRule::Adam, config)))
}

/// Builds FedYogi after validating `config`.
pub fn fedyogi(config: &FedAdaptiveConfig) -> Result<FedOpt> {
    config.validate()?;
    Ok(compose(FEDYOGI, adaptive(AdaptiveRule::Yogi, config)))
}

/// The adaptive server step of `rule` configured by `c` (also the server
/// step of these strategies under privacy).
pub(crate) fn adaptive(rule: AdaptiveRule, c: &FedAdaptiveConfig) -> Adaptive {
    Adaptive::new(rule, c.server_lr, c.beta1, c.beta2, c.tau)
}

impl FedAdagradConfig {
    /// FedAdagrad's server step (no `beta2`).
    pub(crate) fn optimizer(&self) -> Adaptive {
        Adaptive::new(
            AdaptiveRule::Adagrad,
            self.server_lr,
            self.beta1,
            0.0,
            self.tau,
        )
    }
}

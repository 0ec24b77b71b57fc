//! FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem
//! in Heterogeneous Federated Optimization"), normalised averaging, in the
//! paper's general form
//!
//! ```text
//! x_{t+1} = x_t - tau_eff * sum_i p_i * eta * d_i,
//! d_i = G_i a_i / ||a_i||_1,   tau_eff = sum_i p_i ||a_i||_1
//! ```
//!
//! with a_i = (1, ..., 1) over the client's tau_i local steps, so that
//! `||a_i||_1 = tau_i` (`num_steps`) and `eta * G_i a_i = x_t - x_i`
//! (the learning rates are already in the client's model change):
//!
//! ```text
//! eta * d_i = (x_t - x_i) / tau_i
//! x_{t+1} = x_t + eta_s * tau_eff * sum_i p_i (x_i - x_t) / tau_i,
//! p_i = n_i / sum_j n_j,   tau_eff = sum_i p_i tau_i
//! ```
//!
//! (`eta_s = 1` is the paper). = [`NormalizedMean`] (a weighted mean with
//! weights `p_i tau_eff / tau_i`) + [`Sgd`]. Sends `LocalObjective::Plain`;
//! keeps no state; reports `tau_eff`. With equal step counts it is FedAvg.

use fedcmp_core::metrics::names;
use fedcmp_core::RoundMetrics;
use serde::{Deserialize, Serialize};

use crate::compose::{Aggregator, Composed, Plain};
use crate::round::RoundInput;
use crate::server_opt::Sgd;
use crate::validate::positive;
use crate::{ops, Result, StrategyError};

/// The config name.
pub const NAME: &str = "fednova";

/// FedNova's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FedNovaConfig {
    /// `eta_s` (> 0).
    pub server_lr: f64,
}

impl Default for FedNovaConfig {
    fn default() -> Self {
        Self { server_lr: 1.0 }
    }
}

impl FedNovaConfig {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)
    }
}

/// `tau_eff * sum_i p_i Delta_i / tau_i`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NormalizedMean;

impl Aggregator for NormalizedMean {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        let mut taus = Vec::with_capacity(input.len());
        for u in &input.updates {
            if u.num_steps == 0 {
                return Err(StrategyError::InvalidUpdate {
                    client: u.client,
                    reason: "took 0 local steps; FedNova normalises by the step count".to_string(),
                });
            }
            taus.push(u.num_steps as f64);
        }
        let tau_eff = ops::weighted_mean(&taus, &input.sample_weights)?;
        let weights: Vec<f64> = input
            .sample_weights
            .iter()
            .zip(&taus)
            .map(|(p, tau)| p * tau_eff / tau)
            .collect();
        metrics.set(names::TAU_EFF, tau_eff);
        ops::weighted_sum(&input.deltas, &weights)
    }
}

/// FedNova as composed parts.
pub type FedNova = Composed<Plain, NormalizedMean, Sgd>;

/// Builds FedNova after validating `config`.
pub fn fednova(config: &FedNovaConfig) -> Result<FedNova> {
    config.validate()?;
    Ok(Composed::new(
        NAME,
        Plain,
        NormalizedMean,
        Sgd::new(config.server_lr),
    ))
}

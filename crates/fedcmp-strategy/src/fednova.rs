//! FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem
//! in Heterogeneous Federated Optimization"), normalised averaging, in the
//! paper's general form
//!
//! ```text
//! x_{t+1} = x_t - tau_eff * sum_i p_i * d_i,
//! d_i = G_i a_i / ||a_i||_1,   tau_eff = sum_i p_i ||a_i||_1
//! ```
//!
//! where client i's local change is `x_t - x_i = G_i a_i`, its gradients
//! weighted by the coefficients `a_i`. With local step sizes `lr_k` the
//! coefficients are the step sizes themselves, so `||a_i||_1` is the
//! client's effective step, `lr_sum` (under a constant rate it is
//! `tau_i * lr`, the paper's step count up to a constant that cancels):
//!
//! ```text
//! x_{t+1} = x_t + eta_s * tau_eff * sum_i p_i (x_i - x_t) / s_i,
//! s_i = lr_sum_i,   p_i = n_i / sum_j n_j,   tau_eff = sum_i p_i s_i
//! ```
//!
//! (`eta_s = 1` is the paper). Normalising by the effective step rather
//! than the step count keeps FedNova's meaning under a learning-rate
//! schedule: a client whose steps came late in the decay moved less per
//! step, and is not mistaken for a lazy one. A client that moved at rate 0
//! (the federation past its schedule's end) made no step: it is left out,
//! data weight included (its change is zero anyway); when none moved, the
//! update is zero.
//!
//! It is [`NormalizedMean`] (a weighted mean with weights
//! `p_i tau_eff / s_i`) and [`Sgd`]. Sends `LocalObjective::Plain`; keeps
//! no state; reports `tau_eff` (in learning-rate units). With equal
//! effective steps it is FedAvg.

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
        let mut steps = Vec::with_capacity(input.len());
        for u in &input.updates {
            if !(u.lr_sum.is_finite() && u.lr_sum >= 0.0) {
                return Err(StrategyError::InvalidUpdate {
                    client: u.client,
                    reason: format!(
                        "effective step lr_sum = {}; FedNova normalises by it",
                        u.lr_sum
                    ),
                });
            }
            steps.push(u.lr_sum);
        }
        // Data weights over the clients that made a step.
        let moved: f64 = input
            .sample_weights
            .iter()
            .zip(&steps)
            .filter(|(_, s)| **s > 0.0)
            .map(|(p, _)| p)
            .sum();
        let p: Vec<f64> = if steps.iter().all(|s| *s > 0.0) {
            input.sample_weights.clone()
        } else {
            input
                .sample_weights
                .iter()
                .zip(&steps)
                .map(|(p, s)| if *s > 0.0 { p / moved } else { 0.0 })
                .collect()
        };
        let tau_eff = if moved > 0.0 {
            ops::weighted_mean(&steps, &p)?
        } else {
            0.0
        };
        let weights: Vec<f64> = p
            .iter()
            .zip(&steps)
            .map(|(p, s)| if *s > 0.0 { p * tau_eff / s } else { 0.0 })
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

//! FedAvgM (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical
//! Data Distribution for Federated Visual Classification"): heavy-ball
//! momentum on the server, applied to the data-weighted mean delta:
//!
//! ```text
//! Delta_t = sum_k p_k (theta_k - theta_t)
//! v_t = beta * v_{t-1} + Delta_t,   v_{-1} = 0
//! theta_{t+1} = theta_t + eta_s * v_t
//! (nesterov: theta_{t+1} = theta_t + eta_s * (beta * v_t + Delta_t))
//! ```
//!
//! `momentum-form = "ema"`: the bias-corrected exponential average of
//! [`MomentumForm::Ema`] instead (`v_t = beta v_{t-1} + (1 - beta)
//! Delta_t`, step `eta_s v_t / (1 - beta^t)`).
//!
//! = [`WeightedMean`] + [`HeavyBall`]. Sends `LocalObjective::Plain`.
//! State: the server velocity `v` (key `momentum`).

use serde::{Deserialize, Serialize};

use crate::compose::{Composed, Plain};
use crate::mean::{WeightedMean, Weighting};
use crate::server_opt::{HeavyBall, MomentumForm};
use crate::validate::{positive, unit_interval};
use crate::Result;

/// The config name.
pub const NAME: &str = "fedavgm";

/// FedAvgM's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FedAvgMConfig {
    /// `eta_s` (> 0).
    pub server_lr: f64,
    /// `beta` in [0, 1).
    pub momentum: f64,
    /// Nesterov's look-ahead form (heavy ball only).
    pub nesterov: bool,
    /// `heavy-ball` (default) or `ema` (bias-corrected).
    #[serde(skip_serializing_if = "MomentumForm::is_heavy_ball")]
    pub momentum_form: MomentumForm,
}

impl Default for FedAvgMConfig {
    fn default() -> Self {
        Self {
            server_lr: 1.0,
            momentum: 0.9,
            nesterov: false,
            momentum_form: MomentumForm::HeavyBall,
        }
    }
}

impl FedAvgMConfig {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)?;
        unit_interval("momentum", self.momentum)?;
        self.momentum_form.check_nesterov(self.nesterov)
    }
}

/// FedAvgM as composed parts.
pub type FedAvgM = Composed<Plain, WeightedMean, HeavyBall>;

/// Builds FedAvgM after validating `config`.
pub fn fedavgm(config: &FedAvgMConfig) -> Result<FedAvgM> {
    config.validate()?;
    Ok(Composed::new(
        NAME,
        Plain,
        WeightedMean::new(Weighting::Samples),
        config.optimizer(),
    ))
}

impl FedAvgMConfig {
    /// FedAvgM's server step (also its server step under privacy).
    pub(crate) fn optimizer(&self) -> HeavyBall {
        HeavyBall::with_form(
            self.server_lr,
            self.momentum,
            self.nesterov,
            self.momentum_form,
        )
    }
}

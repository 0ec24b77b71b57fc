//! SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
//! Averaging for Federated Learning", Algorithm 1 with option II).
//!
//! Client i (the runtime's local round, `fedcmp_runtime::local`), from
//! `y_i = x`, for K steps with step sizes `eta_k`:
//!
//! ```text
//! y_i <- step(y_i, g_i(y_i) - c_i + c)      (the corrected raw gradient
//!                                            feeds the local optimiser)
//! c_i+ = sum_k eta_k g_i(y_k) / sum_k eta_k (the step-size-weighted mean of
//!                                            the raw gradients)
//! sends Delta y_i = y_i - x (its parameters) and
//!       Delta c_i = c_i+ - c_i (`control_delta`)
//! ```
//!
//! Under SGD the control update is exactly option II,
//! `c_i - c + (x - y_i) / sum_k eta_k`; computed from the raw gradients it
//! keeps the control variates in gradient units under AdamW too.
//!
//! Server, over the participating set S of a federation of N clients:
//!
//! ```text
//! x <- x + eta_g * (1/|S|) sum_{i in S} Delta y_i
//! c <- c + (|S|/N) * (1/|S|) sum_{i in S} Delta c_i
//! ```
//!
//! = [`ControlVariates`] + [`WeightedMean`] + [`Sgd`] with `eta_g`. The
//! model mean is uniform as in the paper; `weighting = "samples"` uses data
//! weights instead. The control update is always uniform: it keeps c equal
//! to the mean of all N client control variates.
//!
//! Sends `LocalObjective::Scaffold { server_control: c }`. Before the first
//! aggregation the server does not know the model layout yet and sends an
//! EMPTY `server_control`, which stands for `c_0 = 0` (the paper's
//! initialisation); clients start with `c_i = 0` too. State: c (key
//! `server_control`). Reports `control_norm` (`||c||`).

use fedcmp_core::metrics::names;
use fedcmp_core::{ClientId, LocalObjective, ParamSet, RoundMetrics};
use serde::{Deserialize, Serialize};

use crate::compose::{state_or, ClientProtocol, Composed};
use crate::mean::{WeightedMean, Weighting};
use crate::round::RoundInput;
use crate::server_opt::Sgd;
use crate::validate::positive;
use crate::{ops, Result, StrategyError, StrategyState};

/// The config name.
pub const NAME: &str = "scaffold";

const KEY: &str = "server_control";

/// SCAFFOLD's hyper-parameters (N, the federation size, comes from
/// [`crate::StrategyConfig::build`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScaffoldConfig {
    /// Global step size `eta_g` (> 0).
    pub server_lr: f64,
    /// Weights of the model mean (`uniform`, the paper's, or `samples`).
    pub weighting: Weighting,
}

impl Default for ScaffoldConfig {
    fn default() -> Self {
        Self {
            server_lr: 1.0,
            weighting: Weighting::Uniform,
        }
    }
}

impl ScaffoldConfig {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)
    }
}

/// The server control variate c and the federation size N.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVariates {
    num_clients: usize,
    control: Option<ParamSet>,
}

impl ControlVariates {
    /// Zero control (`c_0 = 0`) for a federation of `num_clients`.
    pub fn new(num_clients: usize) -> Self {
        Self {
            num_clients,
            control: None,
        }
    }

    /// The current c (None = zero, before the first aggregation).
    pub fn control(&self) -> Option<&ParamSet> {
        self.control.as_ref()
    }
}

impl ClientProtocol for ControlVariates {
    fn objective(&self, _round: u64, _client: ClientId) -> LocalObjective {
        LocalObjective::Scaffold {
            server_control: self.control.clone().unwrap_or_default(),
        }
    }

    fn observe(&mut self, input: &RoundInput<'_>, metrics: &mut RoundMetrics) -> Result<()> {
        let s = input.len();
        if s > self.num_clients {
            return Err(StrategyError::TooManyClients {
                round: input.round,
                participants: s,
                total: self.num_clients,
            });
        }
        let mut deltas = Vec::with_capacity(s);
        for u in &input.updates {
            let Some(dc) = &u.control_delta else {
                return Err(StrategyError::InvalidUpdate {
                    client: u.client,
                    reason: "SCAFFOLD needs `control_delta` (c_i+ - c_i) in every update"
                        .to_string(),
                });
            };
            input
                .global
                .check_same_layout(dc)
                .map_err(|e| StrategyError::InvalidUpdate {
                    client: u.client,
                    reason: format!("`control_delta` does not match the global model: {e}"),
                })?;
            if let Some(p) = ops::first_non_finite(dc) {
                return Err(StrategyError::NonFinite {
                    client: u.client,
                    parameter: format!("control_delta.{p}"),
                });
            }
            deltas.push(ops::flatten(dc));
        }
        let mean = ops::weighted_sum(&deltas, &ops::uniform_weights(s))?;
        let mut c = state_or(KEY, self.control.as_ref(), input, 0.0)?;
        ops::axpy(s as f64 / self.num_clients as f64, &mean, &mut c)?;
        let control = ops::unflatten(input.global, &c)?;
        if let Some(p) = ops::first_non_finite(&control) {
            return Err(StrategyError::NonFiniteResult {
                parameter: format!("{KEY}.{p}"),
            });
        }
        metrics.set(names::CONTROL_NORM, ops::norm(&c));
        self.control = Some(control);
        Ok(())
    }

    fn save(&self, state: &mut StrategyState) {
        state.put_tensor(KEY, self.control.as_ref());
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        self.control = state.take_tensor(KEY);
        Ok(())
    }
}

/// SCAFFOLD as composed parts.
pub type Scaffold = Composed<ControlVariates, WeightedMean, Sgd>;

/// Builds SCAFFOLD for a federation of `num_clients` after validation.
pub fn scaffold(config: &ScaffoldConfig, num_clients: usize) -> Result<Scaffold> {
    config.validate()?;
    if num_clients == 0 {
        return Err(StrategyError::Config {
            field: "num_clients".to_string(),
            reason: "must be at least 1 (SCAFFOLD scales the control update by |S|/N)".to_string(),
        });
    }
    Ok(Composed::new(
        NAME,
        ControlVariates::new(num_clients),
        WeightedMean::new(config.weighting),
        Sgd::new(config.server_lr),
    ))
}

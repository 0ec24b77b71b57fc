//! Byzantine-robust aggregation: rules that bound what a faulty or hostile
//! client can do to the global model, one file each, by their papers'
//! definitions.
//!
//! - [`median`]: coordinate-wise median (Yin et al. 2018);
//! - [`trimmed_mean`]: coordinate-wise trimmed mean (Yin et al. 2018);
//! - [`krum`]: Krum and Multi-Krum (Blanchard et al. 2017);
//! - [`norm_bound`]: each update clipped to a norm bound, then the mean
//!   (Sun et al. 2019).
//!
//! Each is an [`crate::compose::Aggregator`] over the round's deltas
//! (every client starts from the same global model, so the coordinate-wise
//! rules and Krum's distances give the same result on parameters or on
//! deltas), composed with the server step of [`ServerStep`]: any server
//! optimiser of [`crate::server_opt`] (plain SGD with a server learning
//! rate, server momentum in FedAvgM's heavy-ball or bias-corrected EMA
//! form, or FedAdagrad/FedAdam/FedYogi's adaptive step), so a robust rule
//! replaces the mean of FedAvg, FedAvgM or FedOpt and keeps the rest.
//!
//! Weighting: the median, the trimmed mean and Krum's selection and
//! average are unweighted, as in their papers: a client's sample count is
//! its own claim, and weighting by it would let one hostile client outvote
//! the rest. The norm bound keeps FedAvg's data weights by default (Sun et
//! al. clip before FedAvg's weighted mean), with `weighting = "uniform"`
//! for federations that do not trust the counts.

pub mod krum;
pub mod median;
pub mod norm_bound;
pub mod trimmed_mean;

use serde::{Deserialize, Serialize};

use fedcmp_core::RoundMetrics;

use crate::compose::{Aggregator, Composed, Plain, ServerOptimizer};
use crate::round::RoundInput;
use crate::server_opt::{Adaptive, AdaptiveRule, HeavyBall, MomentumForm};
use crate::validate::{positive, unit_interval};
use crate::{Result, StrategyError, StrategyState};

/// Which server optimiser takes the robust aggregate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerOptimizerKind {
    /// `theta += eta_s Delta`, with momentum when `server-momentum > 0`.
    #[default]
    Sgd,
    Adagrad,
    Adam,
    Yogi,
}

/// The server step after a robust aggregate (the fields every robust
/// rule's configuration carries, flattened into it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ServerStep {
    /// `eta_s` (> 0): the server learning rate, or the adaptive step size.
    pub server_lr: f64,
    /// `sgd` (default), `adagrad`, `adam` or `yogi`.
    pub server_optimizer: ServerOptimizerKind,
    /// Server momentum `beta` in [0, 1) of the SGD step; 0 (default) is
    /// the plain step.
    pub server_momentum: f64,
    /// `heavy-ball` (default) or `ema` (bias-corrected).
    pub momentum_form: MomentumForm,
    /// The adaptive optimisers' `beta1`, `beta2` in [0, 1) and `tau` > 0
    /// (FedOpt's defaults; unused by SGD).
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

impl Default for ServerStep {
    fn default() -> Self {
        Self {
            server_lr: 1.0,
            server_optimizer: ServerOptimizerKind::Sgd,
            server_momentum: 0.0,
            momentum_form: MomentumForm::HeavyBall,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

impl ServerStep {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)?;
        unit_interval("server-momentum", self.server_momentum)?;
        unit_interval("beta1", self.beta1)?;
        unit_interval("beta2", self.beta2)?;
        positive("tau", self.tau)?;
        if self.server_optimizer != ServerOptimizerKind::Sgd && self.server_momentum != 0.0 {
            return Err(StrategyError::Config {
                field: "server-momentum".to_string(),
                reason: format!(
                    "applies to server-optimizer = \"sgd\" (the adaptive ones have beta1), got {}",
                    self.server_momentum
                ),
            });
        }
        Ok(())
    }

    /// The optimiser: for SGD heavy ball (or EMA) with `beta =
    /// server_momentum`, which at `beta = 0` is the plain step `theta +=
    /// eta_s Delta`; otherwise Reddi et al.'s adaptive step.
    pub fn optimizer(&self) -> StepOptimizer {
        let adaptive = |rule| {
            StepOptimizer::Adaptive(Adaptive::new(
                rule,
                self.server_lr,
                self.beta1,
                self.beta2,
                self.tau,
            ))
        };
        match self.server_optimizer {
            ServerOptimizerKind::Sgd => StepOptimizer::Momentum(HeavyBall::with_form(
                self.server_lr,
                self.server_momentum,
                false,
                self.momentum_form,
            )),
            ServerOptimizerKind::Adagrad => adaptive(AdaptiveRule::Adagrad),
            ServerOptimizerKind::Adam => adaptive(AdaptiveRule::Adam),
            ServerOptimizerKind::Yogi => adaptive(AdaptiveRule::Yogi),
        }
    }
}

/// The server optimiser a [`ServerStep`] builds.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOptimizer {
    Momentum(HeavyBall),
    Adaptive(Adaptive),
}

impl ServerOptimizer<Vec<f64>> for StepOptimizer {
    fn step(
        &mut self,
        input: &RoundInput<'_>,
        update: &Vec<f64>,
        metrics: &mut RoundMetrics,
    ) -> Result<Vec<f64>> {
        match self {
            StepOptimizer::Momentum(o) => o.step(input, update, metrics),
            StepOptimizer::Adaptive(o) => o.step(input, update, metrics),
        }
    }

    fn save(&self, state: &mut StrategyState) {
        match self {
            StepOptimizer::Momentum(o) => o.save(state),
            StepOptimizer::Adaptive(o) => o.save(state),
        }
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        match self {
            StepOptimizer::Momentum(o) => o.load(state),
            StepOptimizer::Adaptive(o) => o.load(state),
        }
    }
}

/// A robust rule with its server step.
pub type Robust<A> = Composed<Plain, A, StepOptimizer>;

/// Wires a validated rule.
pub(crate) fn compose<A: Aggregator>(name: &'static str, rule: A, step: &ServerStep) -> Robust<A> {
    Composed::new(name, Plain, rule, step.optimizer())
}

/// The value at the middle of sorted `values` (the mean of the two middle
/// values for an even count, as NumPy's median); `values` is sorted in
/// place (total order, so the result does not depend on input order).
pub(crate) fn median_of(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

/// Applies `per_coordinate` to each coordinate's values across the
/// clients' `deltas` (in client order), in parallel over fixed-size
/// blocks of coordinates (each coordinate independent, so the result does
/// not depend on the thread count).
pub(crate) fn coordinatewise(
    deltas: &[Vec<f64>],
    per_coordinate: impl Fn(&mut [f64]) -> f64 + Sync,
) -> Vec<f64> {
    use rayon::prelude::*;
    const BLOCK: usize = 4096;
    let len = deltas.first().map_or(0, Vec::len);
    let k = deltas.len();
    let mut out = vec![0.0; len];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut column = vec![0.0; k];
            for (i, slot) in chunk.iter_mut().enumerate() {
                let p = b * BLOCK + i;
                for (c, d) in column.iter_mut().zip(deltas) {
                    *c = d.get(p).copied().unwrap_or(0.0);
                }
                *slot = per_coordinate(&mut column);
            }
        });
    out
}

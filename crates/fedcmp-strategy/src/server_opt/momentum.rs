//! Heavy-ball server momentum (FedAvgM: Hsu, Qi and Brown 2019, "Measuring
//! the Effects of Non-Identical Data Distribution for Federated Visual
//! Classification", Sec. 3):
//!
//! ```text
//! v_t = beta * v_{t-1} + Delta_t          (v_{-1} = 0)
//! theta_{t+1} = theta_t + eta_s * v_t
//! ```
//!
//! Option `nesterov`: `theta_{t+1} = theta_t + eta_s * (beta * v_t + Delta_t)`.
//! State: the velocity `v` (key `momentum`), absent before the first step.
//! Reports `momentum_norm` (`||v_t||`).

use fedcmp_core::metrics::names;
use fedcmp_core::{ParamSet, RoundMetrics};

use crate::compose::{state_or, ServerOptimizer};
use crate::round::RoundInput;
use crate::{ops, Result, StrategyState};

const KEY: &str = "momentum";

/// Heavy-ball momentum on the aggregated update.
#[derive(Debug, Clone, PartialEq)]
pub struct HeavyBall {
    pub lr: f64,
    pub beta: f64,
    pub nesterov: bool,
    velocity: Option<ParamSet>,
}

impl HeavyBall {
    pub fn new(lr: f64, beta: f64, nesterov: bool) -> Self {
        Self {
            lr,
            beta,
            nesterov,
            velocity: None,
        }
    }

    /// The stored velocity (None before the first step).
    pub fn velocity(&self) -> Option<&ParamSet> {
        self.velocity.as_ref()
    }
}

impl ServerOptimizer<Vec<f64>> for HeavyBall {
    fn step(
        &mut self,
        input: &RoundInput<'_>,
        update: &Vec<f64>,
        metrics: &mut RoundMetrics,
    ) -> Result<Vec<f64>> {
        let mut v = state_or(KEY, self.velocity.as_ref(), input, 0.0)?;
        ops::scale(self.beta, &mut v);
        ops::axpy(1.0, update, &mut v)?;
        let mut next = input.global_flat.clone();
        if self.nesterov {
            ops::axpy(self.lr * self.beta, &v, &mut next)?;
            ops::axpy(self.lr, update, &mut next)?;
        } else {
            ops::axpy(self.lr, &v, &mut next)?;
        }
        metrics.set(names::MOMENTUM_NORM, ops::norm(&v));
        self.velocity = Some(ops::unflatten(input.global, &v)?);
        Ok(next)
    }

    fn save(&self, state: &mut StrategyState) {
        state.put_tensor(KEY, self.velocity.as_ref());
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        self.velocity = state.take_tensor(KEY);
        Ok(())
    }
}

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
//!
//! [`MomentumForm::Ema`] (ALGORITHMS-NOTES.md §2, the option ALGORITHMS.md
//! §4 names): a bias-corrected exponential average, Adam's first moment,
//! so the step is FedAvg-sized from the first round and follows the
//! clients' learning-rate schedule instead of growing towards `1 / (1 -
//! beta)` times it:
//!
//! ```text
//! v_t = beta * v_{t-1} + (1 - beta) * Delta_t
//! theta_{t+1} = theta_t + eta_s * v_t / (1 - beta^t)      (t = 1, 2, ...)
//! ```
//!
//! State: the velocity `v` (key `momentum`), absent before the first step;
//! with the EMA form also the number of accumulations `t` (scalar key
//! `momentum_count`). Reports `momentum_norm` (`||v_t||`, the step's
//! direction before the server lr and the bias correction).

use fedcmp_core::metrics::names;
use fedcmp_core::{ParamSet, RoundMetrics};

use serde::{Deserialize, Serialize};

use crate::compose::{state_or, ServerOptimizer};
use crate::round::RoundInput;
use crate::{ops, Result, StrategyError, StrategyState};

const KEY: &str = "momentum";
const COUNT_KEY: &str = "momentum_count";

/// How a server momentum accumulates updates (FedAvgM, OPM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MomentumForm {
    /// `v = beta v + Delta`, step `v` (Polyak; FedAvgM's paper).
    #[default]
    HeavyBall,
    /// `v = beta v + (1 - beta) Delta`, step `v / (1 - beta^t)`.
    Ema,
}

impl MomentumForm {
    /// The weight of the round's update in the accumulator.
    pub fn update_weight(self, beta: f64) -> f64 {
        match self {
            MomentumForm::HeavyBall => 1.0,
            MomentumForm::Ema => 1.0 - beta,
        }
    }

    /// The factor on the accumulator in the step after `count >= 1`
    /// accumulations (the bias correction; 1 for heavy ball).
    pub fn step_scale(self, beta: f64, count: u64) -> f64 {
        match self {
            MomentumForm::HeavyBall => 1.0,
            MomentumForm::Ema => {
                let exponent = i32::try_from(count.max(1)).unwrap_or(i32::MAX);
                1.0 / (1.0 - beta.powi(exponent))
            }
        }
    }

    /// True for the default (heavy ball): configs leave the field out then,
    /// so that settings written before the option existed read and hash
    /// the same.
    pub fn is_heavy_ball(&self) -> bool {
        *self == MomentumForm::HeavyBall
    }

    /// Nesterov's look-ahead is defined for heavy ball only; refuses the
    /// other combination, naming the field.
    pub fn check_nesterov(self, nesterov: bool) -> Result<()> {
        if nesterov && self == MomentumForm::Ema {
            return Err(StrategyError::Config {
                field: "nesterov".to_string(),
                reason:
                    "applies to momentum-form = \"heavy-ball\" only, got momentum-form = \"ema\""
                        .to_string(),
            });
        }
        Ok(())
    }

    /// Stores the accumulation count (EMA form only, so heavy-ball states
    /// are unchanged).
    pub(crate) fn save_count(self, key: &str, count: u64, state: &mut StrategyState) {
        if self == MomentumForm::Ema && count > 0 {
            state.scalars.insert(key.to_string(), count as f64);
        }
    }

    /// Reads the count back; an EMA state with a momentum but no count is
    /// refused (its bias correction would be wrong).
    pub(crate) fn load_count(
        self,
        key: &str,
        has_momentum: bool,
        state: &mut StrategyState,
    ) -> Result<u64> {
        match (self, state.take_scalar(key)) {
            (MomentumForm::HeavyBall, _) => Ok(0),
            (MomentumForm::Ema, Some(c)) if c >= 1.0 && c.fract() == 0.0 => Ok(c as u64),
            (MomentumForm::Ema, None) if !has_momentum => Ok(0),
            (MomentumForm::Ema, other) => Err(StrategyError::State {
                reason: format!(
                    "`{key}` must be the number of accumulations (>= 1) of an EMA momentum, got {other:?}"
                ),
            }),
        }
    }
}

/// Heavy-ball momentum on the aggregated update.
#[derive(Debug, Clone, PartialEq)]
pub struct HeavyBall {
    pub lr: f64,
    pub beta: f64,
    pub nesterov: bool,
    pub form: MomentumForm,
    velocity: Option<ParamSet>,
    /// Accumulations so far (read by the EMA form's bias correction).
    count: u64,
}

impl HeavyBall {
    pub fn new(lr: f64, beta: f64, nesterov: bool) -> Self {
        Self::with_form(lr, beta, nesterov, MomentumForm::HeavyBall)
    }

    pub fn with_form(lr: f64, beta: f64, nesterov: bool, form: MomentumForm) -> Self {
        Self {
            lr,
            beta,
            nesterov,
            form,
            velocity: None,
            count: 0,
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
        ops::axpy(self.form.update_weight(self.beta), update, &mut v)?;
        // Only the EMA form reads the count (heavy-ball states stay as they were).
        let count = match self.form {
            MomentumForm::HeavyBall => 0,
            MomentumForm::Ema => self.count + 1,
        };
        let mut next = input.global_flat.clone();
        if self.nesterov {
            ops::axpy(self.lr * self.beta, &v, &mut next)?;
            ops::axpy(self.lr, update, &mut next)?;
        } else {
            let scale = self.form.step_scale(self.beta, count);
            ops::axpy(self.lr * scale, &v, &mut next)?;
        }
        metrics.set(names::MOMENTUM_NORM, ops::norm(&v));
        self.velocity = Some(ops::unflatten(input.global, &v)?);
        self.count = count;
        Ok(next)
    }

    fn save(&self, state: &mut StrategyState) {
        state.put_tensor(KEY, self.velocity.as_ref());
        self.form.save_count(COUNT_KEY, self.count, state);
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        self.velocity = state.take_tensor(KEY);
        self.count = self
            .form
            .load_count(COUNT_KEY, self.velocity.is_some(), state)?;
        Ok(())
    }
}

//! Adaptive server optimisers: FedAdagrad, FedAdam and FedYogi exactly as
//! in Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR),
//! Algorithm 2, on the aggregated update `Delta_t`:
//!
//! ```text
//! m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t              (m_{-1} = 0)
//! Adagrad: v_t = v_{t-1} + Delta_t^2
//! Adam:    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
//! Yogi:    v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
//! theta_{t+1} = theta_t + eta * m_t / (sqrt(v_t) + tau)
//! ```
//!
//! elementwise, with `v_{-1} = tau^2` (the paper requires `v_{-1} >= tau^2`;
//! this takes the bound) and `sign(0) = 0`. Like the paper, there is NO bias
//! correction of `m_t` or `v_t` (unlike Kingma and Ba's Adam and some
//! federated libraries). `beta2` is not used by Adagrad.
//!
//! State: `m` (key `first_moment`) and `v` (key `second_moment`), absent
//! before the first step. Reports `momentum_norm` (`||m_t||`).

use fedcmp_core::metrics::names;
use fedcmp_core::{ParamSet, RoundMetrics};

use crate::compose::{state_or, ServerOptimizer};
use crate::round::RoundInput;
use crate::{ops, Result, StrategyError, StrategyState};

const M_KEY: &str = "first_moment";
const V_KEY: &str = "second_moment";

/// Which second-moment rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveRule {
    Adagrad,
    Adam,
    Yogi,
}

/// An adaptive server optimiser (Reddi et al. 2021, Algorithm 2).
#[derive(Debug, Clone, PartialEq)]
pub struct Adaptive {
    pub rule: AdaptiveRule,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
    m: Option<ParamSet>,
    v: Option<ParamSet>,
}

impl Adaptive {
    pub fn new(rule: AdaptiveRule, lr: f64, beta1: f64, beta2: f64, tau: f64) -> Self {
        Self {
            rule,
            lr,
            beta1,
            beta2,
            tau,
            m: None,
            v: None,
        }
    }

    /// The stored moments (None before the first step).
    pub fn moments(&self) -> (Option<&ParamSet>, Option<&ParamSet>) {
        (self.m.as_ref(), self.v.as_ref())
    }

    fn second_moment(&self, v: f64, d: f64) -> f64 {
        let d2 = d * d;
        match self.rule {
            AdaptiveRule::Adagrad => v + d2,
            AdaptiveRule::Adam => self.beta2 * v + (1.0 - self.beta2) * d2,
            AdaptiveRule::Yogi => v - (1.0 - self.beta2) * d2 * ops::sign(v - d2),
        }
    }
}

impl ServerOptimizer<Vec<f64>> for Adaptive {
    fn step(
        &mut self,
        input: &RoundInput<'_>,
        update: &Vec<f64>,
        metrics: &mut RoundMetrics,
    ) -> Result<Vec<f64>> {
        let mut m = state_or(M_KEY, self.m.as_ref(), input, 0.0)?;
        let mut v = state_or(V_KEY, self.v.as_ref(), input, self.tau * self.tau)?;
        let mut next = input.global_flat.clone();
        let n = next.len();
        if update.len() != n {
            return Err(StrategyError::Length {
                what: "aggregated update",
                expected: n,
                got: update.len(),
            });
        }
        for (((x, mi), vi), &d) in next.iter_mut().zip(&mut m).zip(&mut v).zip(update) {
            *mi = self.beta1 * *mi + (1.0 - self.beta1) * d;
            *vi = self.second_moment(*vi, d);
            *x += self.lr * *mi / (vi.sqrt() + self.tau);
        }
        metrics.set(names::MOMENTUM_NORM, ops::norm(&m));
        self.m = Some(ops::unflatten(input.global, &m)?);
        self.v = Some(ops::unflatten(input.global, &v)?);
        Ok(next)
    }

    fn save(&self, state: &mut StrategyState) {
        state.put_tensor(M_KEY, self.m.as_ref());
        state.put_tensor(V_KEY, self.v.as_ref());
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        self.m = state.take_tensor(M_KEY);
        self.v = state.take_tensor(V_KEY);
        Ok(())
    }
}

//! AdamW with explicit, serialisable state (the learning-rate schedule it
//! follows is `fedcmp_core::schedule`, since it travels with every round
//! task).
//!
//! candle-nn's AdamW keeps its moments private; a federated client must be
//! able to checkpoint and restore them bit for bit, so the optimiser here
//! exposes its state. Update (Loshchilov & Hutter 2019, PyTorch's AdamW):
//!   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//!   theta -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + lr * wd * theta.

use candle_core::{Tensor, Var};

use crate::error::{ModelError, Result};

/// AdamW hyper-parameters (PyTorch defaults except weight decay 0, LLaVA's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Moments and step count, one pair per parameter, in parameter order.
#[derive(Debug, Clone)]
pub struct AdamWState {
    pub step: u64,
    pub first_moments: Vec<Tensor>,
    pub second_moments: Vec<Tensor>,
}

/// AdamW over a fixed list of variables.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    vars: Vec<Var>,
    state: AdamWState,
}

impl AdamW {
    /// Zero moments for `vars`.
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first_moments = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let second_moments = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(Self {
            config,
            vars,
            state: AdamWState {
                step: 0,
                first_moments,
                second_moments,
            },
        })
    }

    /// The optimiser's state (for checkpoints).
    pub fn state(&self) -> &AdamWState {
        &self.state
    }

    /// Restores a state saved from an optimiser over the same variables.
    pub fn set_state(&mut self, state: AdamWState) -> Result<()> {
        let fits = |ms: &[Tensor]| {
            ms.len() == self.vars.len()
                && ms.iter().zip(&self.vars).all(|(m, v)| m.dims() == v.dims())
        };
        if !fits(&state.first_moments) || !fits(&state.second_moments) {
            return Err(ModelError::InvalidInput(
                "optimizer state does not match the projector's parameters".to_string(),
            ));
        }
        self.state = state;
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]`
    /// (None = no gradient: the parameter is left alone, as PyTorch does).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            )));
        }
        let c = self.config;
        self.state.step += 1;
        let t = self.state.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, (var, grad)) in self.vars.iter().zip(grads).enumerate() {
            let Some(g) = grad else { continue };
            let m = ((&self.state.first_moments[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.state.second_moments[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor();
            let decayed = if c.weight_decay > 0.0 {
                (theta * (1.0 - lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.state.first_moments[i] = m;
            self.state.second_moments[i] = v;
        }
        Ok(())
    }
}

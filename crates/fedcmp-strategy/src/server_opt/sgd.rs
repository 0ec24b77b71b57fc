//! Plain server SGD (FedAvg's server step, McMahan et al. 2017, in the
//! "server learning rate" form of Reddi et al. 2021):
//!
//! ```text
//! theta_{t+1} = theta_t + eta_s * Delta_t
//! ```
//!
//! `eta_s = 1` applies the aggregated update as is. No state.

use fedcmp_core::RoundMetrics;

use crate::compose::ServerOptimizer;
use crate::round::RoundInput;
use crate::{ops, Result};

/// `theta += lr * Delta`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    pub lr: f64,
}

impl Sgd {
    pub fn new(lr: f64) -> Self {
        Self { lr }
    }
}

impl ServerOptimizer<Vec<f64>> for Sgd {
    fn step(
        &mut self,
        input: &RoundInput<'_>,
        update: &Vec<f64>,
        _metrics: &mut RoundMetrics,
    ) -> Result<Vec<f64>> {
        let mut next = input.global_flat.clone();
        ops::axpy(self.lr, update, &mut next)?;
        Ok(next)
    }
}

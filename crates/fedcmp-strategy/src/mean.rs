//! The mean of the client deltas: the aggregator behind FedAvg, FedProx,
//! FedAvgM, FedAdagrad/FedAdam/FedYogi and SCAFFOLD.
//!
//! ```text
//! Delta = sum_k w_k (theta_k - theta_t)
//! ```
//!
//! with data weights `w_k = n_k / sum_j n_j` (McMahan et al. 2017; the
//! project's default, ALGORITHMS.md §2) or uniform weights `w_k = 1 / |S|`
//! (SCAFFOLD's Algorithm 1 as written). Stateless; sends nothing.

use fedcmp_core::RoundMetrics;
use serde::{Deserialize, Serialize};

use crate::compose::Aggregator;
use crate::round::RoundInput;
use crate::{ops, Result};

/// How client deltas are weighted in a mean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Weighting {
    /// `n_k / sum_j n_j`.
    #[default]
    Samples,
    /// `1 / |S|`.
    Uniform,
}

impl Weighting {
    /// The weights for a round's (sorted) clients.
    pub fn weights(self, input: &RoundInput<'_>) -> Vec<f64> {
        match self {
            Weighting::Samples => input.sample_weights.clone(),
            Weighting::Uniform => ops::uniform_weights(input.len()),
        }
    }
}

/// `sum_k w_k Delta_k`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WeightedMean {
    pub weighting: Weighting,
}

impl WeightedMean {
    pub fn new(weighting: Weighting) -> Self {
        Self { weighting }
    }
}

impl Aggregator for WeightedMean {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, _metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        ops::weighted_sum(&input.deltas, &self.weighting.weights(input))
    }
}

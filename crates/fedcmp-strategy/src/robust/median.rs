//! Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett 2018,
//! "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
//! Rates", Option I):
//!
//! ```text
//! Delta[p] = med { Delta_k[p] : k = 1..K }      (unweighted, per coordinate)
//! ```
//!
//! An even count takes the mean of the two middle values (NumPy's and
//! Flower's `FedMedian` convention; the paper leaves it open). With `f <
//! K / 2` arbitrary clients every coordinate stays within the range of the
//! honest clients' values there. Then the server step of
//! [`super::ServerStep`]. No state of its own.

use fedcmp_core::RoundMetrics;
use serde::{Deserialize, Serialize};

use super::{compose, coordinatewise, median_of, Robust, ServerStep};
use crate::compose::Aggregator;
use crate::round::RoundInput;
use crate::Result;

/// The config name.
pub const NAME: &str = "median";

/// The median's hyper-parameters: the server step only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MedianConfig {
    #[serde(flatten)]
    pub step: ServerStep,
}

/// The coordinate-wise median of the deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CoordinateMedian;

impl Aggregator for CoordinateMedian {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, _metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        Ok(coordinatewise(&input.deltas, median_of))
    }
}

/// Builds the median after validating `config`.
pub fn median(config: &MedianConfig) -> Result<Robust<CoordinateMedian>> {
    config.step.validate()?;
    Ok(compose(NAME, CoordinateMedian, &config.step))
}

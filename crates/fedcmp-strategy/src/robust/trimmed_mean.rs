//! Coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett 2018,
//! "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
//! Rates", Option II): per coordinate, the `b` largest and `b` smallest of
//! the K clients' values are removed and the rest averaged (unweighted),
//!
//! ```text
//! b = floor(beta K)        (beta = `trim` in [0, 1/2))
//! Delta[p] = mean of the middle K - 2b values of { Delta_k[p] }
//! ```
//!
//! The paper assumes `beta K` is an integer; rounding down trims
//! conservatively, as SciPy's `trim_mean` and Flower's `FedTrimmedAvg` do
//! (computed with a tolerance of 1e-9, so that `0.29 * 100` trims 29, not
//! 28). The paper's guarantee needs the byzantine fraction `alpha <= beta`:
//! with `f <= b` arbitrary clients every coordinate stays within the range
//! of the honest values there. `trim = 0` is the unweighted mean. Then the
//! server step of [`super::ServerStep`]. Reports `robust_trimmed` (`b`).

use fedcmp_core::metrics::names;
use fedcmp_core::RoundMetrics;
use serde::{Deserialize, Serialize};

use super::{compose, coordinatewise, Robust, ServerStep};
use crate::compose::Aggregator;
use crate::round::RoundInput;
use crate::validate::check;
use crate::Result;

/// The config name.
pub const NAME: &str = "trimmed-mean";

/// The trimmed mean's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrimmedMeanConfig {
    /// `beta` in [0, 1/2): the fraction trimmed at each end.
    pub trim: f64,
    #[serde(flatten)]
    pub step: ServerStep,
}

impl Default for TrimmedMeanConfig {
    fn default() -> Self {
        Self {
            trim: 0.2,
            step: ServerStep::default(),
        }
    }
}

impl TrimmedMeanConfig {
    pub fn validate(&self) -> Result<()> {
        check(
            "trim",
            self.trim,
            (0.0..0.5).contains(&self.trim),
            "in [0, 0.5)",
        )?;
        self.step.validate()
    }
}

/// Values trimmed at each end for `k` clients.
pub fn trim_count(trim: f64, k: usize) -> usize {
    // floor with a tolerance: 0.29 * 100 = 28.999999999999996.
    ((trim * k as f64) + 1e-9).floor() as usize
}

/// The coordinate-wise trimmed mean of the deltas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoordinateTrimmedMean {
    pub trim: f64,
}

impl Aggregator for CoordinateTrimmedMean {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        let k = input.len();
        let b = trim_count(self.trim, k).min(k.saturating_sub(1) / 2);
        metrics.set(names::ROBUST_TRIMMED, b as f64);
        Ok(coordinatewise(&input.deltas, |column| {
            column.sort_by(f64::total_cmp);
            let kept = &column[b..k - b];
            kept.iter().sum::<f64>() / kept.len() as f64
        }))
    }
}

/// Builds the trimmed mean after validating `config`.
pub fn trimmed_mean(config: &TrimmedMeanConfig) -> Result<Robust<CoordinateTrimmedMean>> {
    config.validate()?;
    Ok(compose(
        NAME,
        CoordinateTrimmedMean { trim: config.trim },
        &config.step,
    ))
}

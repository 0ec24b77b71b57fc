//! Norm bounding (Sun, Kairouz, Suresh, McMahan 2019, "Can You Really
//! Backdoor Federated Learning?"): every delta clipped to an L2 bound `M`
//! over all parameters, then the mean,
//!
//! ```text
//! Delta_k <- Delta_k min(1, M / ||Delta_k||)       (a zero delta stays 0)
//! Delta    = sum_k w_k Delta_k
//! ```
//!
//! with `M` fixed (`max-norm = 0.5`) or, by default, the median of the
//! round's update norms (`max-norm = "median"`, the quantile-0.5 case of
//! Andrew et al. 2021's adaptive clipping, computed exactly per round
//! rather than estimated privately): with `f < K / 2` hostile clients the
//! median norm lies within the range of honest norms, so no client moves
//! the model further than an honest one does. Weights `w_k` are FedAvg's
//! data weights by default, `weighting = "uniform"` for `1 / K`. Then the
//! server step of [`super::ServerStep`]. Reports `robust_bound` (`M`) and
//! `robust_clipped` (deltas shortened).

use fedcmp_core::metrics::names;
use fedcmp_core::RoundMetrics;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{compose, median_of, Robust, ServerStep};
use crate::compose::Aggregator;
use crate::mean::Weighting;
use crate::round::RoundInput;
use crate::{ops, Result, StrategyError};

/// The config name.
pub const NAME: &str = "norm-bound";

/// The bound `M`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// A fixed `M > 0`.
    Fixed(f64),
    /// The median of the round's delta norms.
    Median,
}

impl Serialize for Bound {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Bound::Fixed(m) => s.serialize_f64(*m),
            Bound::Median => s.serialize_str("median"),
        }
    }
}

impl<'de> Deserialize<'de> for Bound {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Number(m) => Ok(Bound::Fixed(m)),
            Repr::Text(t) if t == "median" => Ok(Bound::Median),
            Repr::Text(t) => Err(serde::de::Error::custom(format!(
                "expected a number or \"median\", got \"{t}\""
            ))),
        }
    }
}

/// Norm bounding's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NormBoundConfig {
    /// `M`: a number > 0 or `"median"`.
    pub max_norm: Bound,
    /// `samples` (default) or `uniform`.
    pub weighting: Weighting,
    #[serde(flatten)]
    pub step: ServerStep,
}

impl Default for NormBoundConfig {
    fn default() -> Self {
        Self {
            max_norm: Bound::Median,
            weighting: Weighting::Samples,
            step: ServerStep::default(),
        }
    }
}

impl NormBoundConfig {
    pub fn validate(&self) -> Result<()> {
        if let Bound::Fixed(m) = self.max_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(StrategyError::Config {
                    field: "max-norm".to_string(),
                    reason: format!("must be a number > 0 or \"median\", got {m}"),
                });
            }
        }
        self.step.validate()
    }
}

/// Clips `delta` to norm `bound` in place; true when it was shortened.
pub fn clip(delta: &mut [f64], bound: f64) -> bool {
    let n = ops::norm(delta);
    if n > bound && n > 0.0 {
        ops::scale(bound / n, delta);
        true
    } else {
        false
    }
}

/// Clipping to a norm bound, then the weighted mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormBounded {
    pub bound: Bound,
    pub weighting: Weighting,
}

impl Aggregator for NormBounded {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        let bound = match self.bound {
            Bound::Fixed(m) => m,
            Bound::Median => {
                let mut norms: Vec<f64> = input.deltas.iter().map(|d| ops::norm(d)).collect();
                median_of(&mut norms)
            }
        };
        let mut clipped = input.deltas.clone();
        let mut shortened = 0;
        for d in &mut clipped {
            shortened += usize::from(clip(d, bound));
        }
        metrics.set(names::ROBUST_BOUND, bound);
        metrics.set(names::ROBUST_CLIPPED, shortened as f64);
        ops::weighted_sum(&clipped, &self.weighting.weights(input))
    }
}

/// Builds norm bounding after validating `config`.
pub fn norm_bound(config: &NormBoundConfig) -> Result<Robust<NormBounded>> {
    config.validate()?;
    Ok(compose(
        NAME,
        NormBounded {
            bound: config.max_norm,
            weighting: config.weighting,
        },
        &config.step,
    ))
}

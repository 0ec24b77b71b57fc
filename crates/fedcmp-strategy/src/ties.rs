//! TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference
//! When Merging Models", NeurIPS), with client deltas as the task vectors
//! `tau_k = theta_k - theta_t` and the round's global model as the base:
//!
//! 1. Trim: `tau^_k` keeps the `keep = ceil(top_k_percent / 100 * P)`
//!    largest-magnitude values of `tau_k` and zeroes the rest, over the
//!    whole flattened delta (all P values, biases included, as in the
//!    paper's implementation); equal magnitudes are kept in parameter order.
//! 2. Elect: `gamma = sign(sum_k tau^_k)` per coordinate (`sign(0) = 0`).
//! 3. Disjoint merge: `tau_m[p] = mean { tau^_k[p] : sign(tau^_k[p]) = gamma[p] }`,
//!    0 where no value agrees (or `gamma[p] = 0`).
//! 4. `theta_{t+1} = theta_t + lambda * tau_m` (`lambda` = `server-lr`).
//!
//! The merge is unweighted, as in the paper. = [`TiesMerge`] + [`Sgd`].
//! Sends `LocalObjective::Plain`; keeps no state. Reports `ties_kept`
//! (values kept per client) and `ties_sign_conflict_fraction` (coordinates
//! where kept values disagree in sign).

use fedcmp_core::metrics::names;
use fedcmp_core::RoundMetrics;
use serde::{Deserialize, Serialize};

use crate::compose::{Aggregator, Composed, Plain};
use crate::round::RoundInput;
use crate::server_opt::Sgd;
use crate::validate::positive;
use crate::{ops, Result, StrategyError};

/// The config name.
pub const NAME: &str = "ties";

/// TIES-merging's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TiesConfig {
    /// k: the percentage of each delta's values kept, in (0, 100].
    pub top_k_percent: f64,
    /// `lambda` (> 0).
    pub server_lr: f64,
}

impl Default for TiesConfig {
    fn default() -> Self {
        Self {
            top_k_percent: 20.0,
            server_lr: 1.0,
        }
    }
}

impl TiesConfig {
    pub fn validate(&self) -> Result<()> {
        positive("server-lr", self.server_lr)?;
        if self.top_k_percent.is_finite() && self.top_k_percent > 0.0 && self.top_k_percent <= 100.0
        {
            Ok(())
        } else {
            Err(StrategyError::Config {
                field: "top-k-percent".to_string(),
                reason: format!("must be in (0, 100], got {}", self.top_k_percent),
            })
        }
    }
}

/// Trim, elect sign, disjoint mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TiesMerge {
    pub top_k_percent: f64,
}

impl TiesMerge {
    /// Values kept out of `n`: `ceil(k / 100 * n)`, at least 1.
    pub fn keep(&self, n: usize) -> usize {
        let keep = (self.top_k_percent * n as f64 / 100.0).ceil();
        // `keep` is a small non-negative integer-valued float here.
        (keep as usize).clamp(1.min(n), n)
    }
}

impl Aggregator for TiesMerge {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        let n = input.global_flat.len();
        let keep = self.keep(n);
        let trimmed: Vec<Vec<f64>> = input
            .deltas
            .iter()
            .map(|d| {
                let mask = ops::top_k_mask(d, keep);
                d.iter()
                    .zip(mask)
                    .map(|(&v, kept)| if kept { v } else { 0.0 })
                    .collect()
            })
            .collect();
        let total = ops::weighted_sum(&trimmed, &vec![1.0; trimmed.len()])?;
        let mut merged = vec![0.0; n];
        let mut conflicts = 0usize;
        for (p, (out, &sum)) in merged.iter_mut().zip(&total).enumerate() {
            let elected = ops::sign(sum);
            let (mut acc, mut count) = (0.0, 0usize);
            let (mut pos, mut neg) = (false, false);
            for t in &trimmed {
                let s = ops::sign(t[p]);
                pos |= s > 0.0;
                neg |= s < 0.0;
                if s != 0.0 && s == elected {
                    acc += t[p];
                    count += 1;
                }
            }
            if pos && neg {
                conflicts += 1;
            }
            if count > 0 {
                *out = acc / count as f64;
            }
        }
        metrics.set(names::TIES_KEPT, keep as f64);
        metrics.set(
            names::TIES_SIGN_CONFLICT_FRACTION,
            if n > 0 {
                conflicts as f64 / n as f64
            } else {
                0.0
            },
        );
        Ok(merged)
    }
}

/// TIES-merging as composed parts.
pub type Ties = Composed<Plain, TiesMerge, Sgd>;

/// Builds TIES-merging after validating `config`.
pub fn ties(config: &TiesConfig) -> Result<Ties> {
    config.validate()?;
    Ok(Composed::new(
        NAME,
        Plain,
        TiesMerge {
            top_k_percent: config.top_k_percent,
        },
        Sgd::new(config.server_lr),
    ))
}

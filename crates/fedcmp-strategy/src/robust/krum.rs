//! Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer 2017,
//! "Machine Learning with Adversaries: Byzantine Tolerant Gradient
//! Descent"), on the round's K deltas with `f` assumed byzantine:
//!
//! ```text
//! d(i, j) = ||Delta_i - Delta_j||^2
//! s(i)    = sum of the K - f - 2 smallest d(i, j), j != i
//! Delta   = unweighted mean of the m deltas with the lowest scores
//! ```
//!
//! `m = 1` is Krum (one client's delta, verbatim), `m = K` the unweighted
//! mean; `keep` unset takes `m = K - f` (Multi-Krum averaging all but the
//! `f` most isolated). Ties go to the lower client id. The paper's
//! resilience needs `2f + 2 < K`; a round with fewer clients is refused
//! with the reason (the state is unchanged, so the round can be retried).
//! With `f = 0` nothing is tolerated and any K is taken (scores over
//! `max(K - 2, 0)` neighbours).
//! Distances are summed exactly (no `||a||^2 + ||b||^2 - 2<a, b>`
//! cancellation), pairs in parallel. Then the server step of
//! [`super::ServerStep`]. Reports `robust_selected` (the chosen client ids).

use fedcmp_core::metrics::names;
use fedcmp_core::RoundMetrics;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{compose, Robust, ServerStep};
use crate::compose::Aggregator;
use crate::round::RoundInput;
use crate::{ops, Result, StrategyError};

/// The config name.
pub const NAME: &str = "krum";

/// Krum's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct KrumConfig {
    /// `f`: the number of byzantine clients tolerated per round.
    pub byzantine: usize,
    /// `m`: the deltas averaged; unset = `K - f`.
    pub keep: Option<usize>,
    #[serde(flatten)]
    pub step: ServerStep,
}

impl Default for KrumConfig {
    fn default() -> Self {
        Self {
            byzantine: 1,
            keep: None,
            step: ServerStep::default(),
        }
    }
}

impl KrumConfig {
    pub fn validate(&self) -> Result<()> {
        if self.keep == Some(0) {
            return Err(StrategyError::Config {
                field: "keep".to_string(),
                reason: "must be >= 1 when given, got 0".to_string(),
            });
        }
        self.step.validate()
    }
}

/// Krum's scores `s(i)` of `deltas` for `f` byzantine; requires `2f + 2 <
/// K`.
pub fn scores(deltas: &[Vec<f64>], f: usize) -> Result<Vec<f64>> {
    let k = deltas.len();
    let pairs: Vec<(usize, usize)> = (0..k)
        .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
        .collect();
    let distances: Vec<f64> = pairs
        .par_iter()
        .map(|&(i, j)| {
            let diff = ops::sub(&deltas[i], &deltas[j])?;
            Ok(diff.iter().map(|x| x * x).sum())
        })
        .collect::<Result<_>>()?;
    let mut d = vec![0.0; k * k];
    for (&(i, j), &v) in pairs.iter().zip(&distances) {
        d[i * k + j] = v;
        d[j * k + i] = v;
    }
    let neighbours = k.saturating_sub(f + 2);
    Ok((0..k)
        .map(|i| {
            let mut others: Vec<f64> = (0..k).filter(|&j| j != i).map(|j| d[i * k + j]).collect();
            others.sort_by(f64::total_cmp);
            others[..neighbours.min(others.len())].iter().sum()
        })
        .collect())
}

/// The indices of the `m` lowest scores, ties to the lower index, in
/// index order.
pub fn select(scores: &[f64], m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut chosen: Vec<usize> = order.into_iter().take(m).collect();
    chosen.sort_unstable();
    chosen
}

/// Multi-Krum over the deltas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiKrum {
    pub byzantine: usize,
    pub keep: Option<usize>,
}

impl Aggregator for MultiKrum {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        let k = input.len();
        let f = self.byzantine;
        if f > 0 && 2 * f + 2 >= k {
            return Err(StrategyError::RoundRefused {
                round: input.round,
                reason: format!(
                    "krum with byzantine = {f} needs more than {} clients (2f + 2 < K), got {k}",
                    2 * f + 2
                ),
            });
        }
        let m = self.keep.unwrap_or(k - f);
        if m > k {
            return Err(StrategyError::RoundRefused {
                round: input.round,
                reason: format!("krum keeps {m} deltas but only {k} clients answered"),
            });
        }
        let chosen = select(&scores(&input.deltas, f)?, m);
        metrics.set_series(
            names::ROBUST_SELECTED,
            chosen
                .iter()
                .map(|&i| f64::from(input.updates[i].client.0))
                .collect(),
        );
        let picked: Vec<Vec<f64>> = chosen.iter().map(|&i| input.deltas[i].clone()).collect();
        ops::weighted_sum(&picked, &ops::uniform_weights(picked.len()))
    }
}

/// Builds Multi-Krum after validating `config`.
pub fn krum(config: &KrumConfig) -> Result<Robust<MultiKrum>> {
    config.validate()?;
    Ok(compose(
        NAME,
        MultiKrum {
            byzantine: config.byzantine,
            keep: config.keep,
        },
        &config.step,
    ))
}

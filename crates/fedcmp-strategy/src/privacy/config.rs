//! The privacy settings of a federation (`[privacy]`), shared by its two
//! modes: `central` (DP-FedAvg at the server, [`super::central`]) and
//! `local` (each site clips and noises its own update before sending it,
//! [`super::local`]); and the calibration of the noise multiplier to a
//! target epsilon with [`super::accountant`].

use serde::{Deserialize, Serialize};

use super::accountant::RdpAccountant;
use crate::validate::{check, positive};
use crate::{Result, StrategyError};

/// Where the noise is added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpMode {
    /// At the server, once, on the sum of clipped updates: the server
    /// sees each site's clipped update (trusted), later readers of the
    /// projector do not learn one site's data.
    #[default]
    Central,
    /// At each site, on its own clipped update, before it leaves: the
    /// server sees only noised updates (untrusted), at the price of one
    /// noise draw per site instead of one per round.
    Local,
}

/// The privacy settings of a federation (`[privacy]`): the clipping norm,
/// and either the noise multiplier or the epsilon to stay within.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrivacyConfig {
    /// `central` (default) or `local`.
    #[serde(default)]
    pub mode: DpMode,
    /// `C` (> 0): the L2 norm each client's update is clipped to.
    pub clip_norm: f64,
    /// `z` (> 0): the noise's standard deviation, in units of `C`, on the
    /// sum (`central`) or on each site's update (`local`) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// ... or the epsilon (at `delta`) the whole run must stay within: `z`
    /// is then the smallest (to 0.1%) that keeps the planned rounds within
    /// it, and a round that would exceed it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// `delta` in (0, 1) at which epsilon is reported (default 1e-5).
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Adaptive clipping (`central` only): `clip-norm` is then the
    /// initial `C`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveClipping>,
}

fn default_delta() -> f64 {
    1e-5
}

/// Adaptive clipping's settings (`[privacy.adaptive]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdaptiveClipping {
    /// `gamma` in (0, 1): the quantile of update norms `C` follows.
    pub target_quantile: f64,
    /// `eta_C` > 0: the geometric step of `C`.
    pub learning_rate: f64,
    /// `sigma_b` > 0: the count's noise (default `m / 20`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count_stddev: Option<f64>,
}

impl Default for AdaptiveClipping {
    fn default() -> Self {
        Self {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_stddev: None,
        }
    }
}

impl PrivacyConfig {
    /// Checks the fields (naming them), without the federation.
    pub fn validate(&self) -> Result<()> {
        positive("clip-norm", self.clip_norm)?;
        check(
            "delta",
            self.delta,
            self.delta > 0.0 && self.delta < 1.0,
            "in (0, 1)",
        )?;
        if let (DpMode::Local, Some(_)) = (self.mode, &self.adaptive) {
            return Err(StrategyError::Config {
                field: "adaptive".to_string(),
                reason: "adaptive clipping estimates a quantile of the updates at the server; \
                         under `mode = \"local\"` each site clips to the fixed `clip-norm`"
                    .to_string(),
            });
        }
        if let Some(a) = &self.adaptive {
            check(
                "target-quantile",
                a.target_quantile,
                a.target_quantile > 0.0 && a.target_quantile < 1.0,
                "in (0, 1)",
            )?;
            positive("learning-rate", a.learning_rate)?;
            if let Some(s) = a.count_stddev {
                positive("count-stddev", s)?;
            }
        }
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(z), None) => positive("noise-multiplier", z),
            (None, Some(e)) => positive("target-epsilon", e),
            (Some(_), Some(_)) => Err(StrategyError::Config {
                field: "noise-multiplier".to_string(),
                reason: "give it or `target-epsilon`, not both".to_string(),
            }),
            (None, None) => Err(StrategyError::Config {
                field: "noise-multiplier".to_string(),
                reason: "or `target-epsilon` is needed".to_string(),
            }),
        }
    }
}

impl PrivacyConfig {
    /// `z`: the configured noise multiplier, or the smallest that keeps
    /// `target-epsilon` over `rounds` rounds of the sampled Gaussian
    /// mechanism at rate `q`, whose sensitivity is `sensitivity` times
    /// `C` (the accountant's multiplier is then `z / sensitivity`).
    pub fn noise_multiplier_for(
        &self,
        q: f64,
        rounds: Option<u64>,
        sensitivity: f64,
    ) -> Result<f64> {
        self.validate()?;
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(z), _) => Ok(z),
            (None, Some(target)) => {
                let Some(rounds) = rounds else {
                    return Err(StrategyError::Config {
                        field: "target-epsilon".to_string(),
                        reason: "needs the run's number of rounds (set `rounds`)".to_string(),
                    });
                };
                Ok(sensitivity * calibrate(target, self.delta, q, rounds)?)
            }
            // Refused by `validate` above.
            (None, None) => Err(StrategyError::Config {
                field: "noise-multiplier".to_string(),
                reason: "or `target-epsilon` is needed".to_string(),
            }),
        }
    }
}

/// Epsilon at `delta` after `rounds` rounds at sampling rate `q` and noise
/// multiplier `z`.
pub fn epsilon_after(q: f64, z: f64, delta: f64, rounds: u64) -> Result<f64> {
    let mut accountant = RdpAccountant::default();
    accountant.compose(q, z, rounds)?;
    Ok(accountant.epsilon(delta).0)
}

/// The smallest `z` (to 0.1%, by bisection on the monotone epsilon) with
/// `epsilon_after(q, z, delta, rounds) <= target`.
pub fn calibrate(target: f64, delta: f64, q: f64, rounds: u64) -> Result<f64> {
    let (mut lo, mut hi) = (1e-3, 1.0);
    while epsilon_after(q, hi, delta, rounds)? > target {
        hi *= 2.0;
        if hi > 1e6 {
            return Err(StrategyError::Config {
                field: "target-epsilon".to_string(),
                reason: format!("{target} cannot be reached over {rounds} rounds"),
            });
        }
    }
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if epsilon_after(q, mid, delta, rounds)? > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

pub fn sampling_rate(m: usize, n: usize) -> f64 {
    if n == 0 {
        1.0
    } else {
        (m as f64 / n as f64).min(1.0)
    }
}

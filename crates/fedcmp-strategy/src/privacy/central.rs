//! Client-level differential privacy on the server: DP-FedAvg (McMahan,
//! Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
//! Language Models", Algorithm 1 with the fixed-denominator estimator),
//! wrapped around a strategy whose aggregate is a sum of client updates
//! followed by post-processing.
//!
//! With `m` clients sampled per round out of `N` (sampling rate `q = m /
//! N`), clipping norm `C` and noise multiplier `z`:
//!
//! ```text
//! Delta_k <- Delta_k min(1, C / ||Delta_k||)          (all parameters, one norm)
//! Delta    = (sum_k Delta_k + N(0, z^2 C^2 I)) / m     (unweighted, fixed denominator)
//! ```
//!
//! then the wrapped strategy's server step (plain, momentum or adaptive:
//! post-processing, which costs no privacy). One client changes the sum by
//! at most `C`, so each round is the sampled Gaussian mechanism with noise
//! multiplier `z`, and [`super::accountant`] gives the epsilon spent after
//! `t` rounds at the configured delta, reported every round as
//! `dp_epsilon` (with `dp_clipped`, the updates shortened, and
//! `dp_noise_std`, the noise's standard deviation per value of `Delta`).
//! The sum is unweighted: weighting by a client's own sample count would
//! let one client's update count for more than `C`. Accounting treats the
//! round's sampling as Poisson with rate `q` (the usual approximation for
//! sampling a fixed number of clients; dropouts only lower the real rate).
//!
//! Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021,
//! "Differentially Private Learning with Adaptive Clipping", Algorithm 1),
//! with `[privacy.adaptive]`: `C` starts at `clip-norm` and follows the
//! `gamma`-quantile of the update norms, from a noised count of the
//! updates it did not clip,
//!
//! ```text
//! b_k   = 1 when ||Delta_k|| <= C, else 0
//! b     = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2
//! C    <- C exp(-eta_C (b - gamma))            (after this round's clipping)
//! z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)      (the update's noise multiplier)
//! ```
//!
//! The count is a second Gaussian mechanism (sensitivity 1/2, noise
//! `sigma_b`); with the update's noise multiplier lowered to `z_Delta`,
//! the pair is one Gaussian mechanism of multiplier `z`, which the
//! accountant charges (the paper's Theorem 1). It needs `z < 2 sigma_b`.
//! Defaults are the paper's: `gamma` 0.5, `eta_C` 0.2, `sigma_b = m / 20`.
//! The current `C` is state (`dp_clip_norm`), reported every round.
//!
//! The noise comes from its own stream per round, seeded by a secret the
//! server draws from the operating system at its first round and keeps in
//! its state (`dp_secret_hi`, `dp_secret_lo`, with `dp_rounds`, the rounds
//! noised): a resumed run adds the same noise, and the seed in the
//! settings (which sites and readers of a run folder see) does not reveal
//! it.
//!
//! Composes with `fedavg`, `fedprox` (its client protocol kept),
//! `fedavgm`, `fedadagrad`, `fedadam`, `fedyogi` and `opm-only` (whose
//! momentum at full span is FedAvgM's, ALGORITHMS.md §4, so under privacy
//! it is FedAvgM's server step); refuses the rest with the reason: CRA's
//! weights and basis (`cra-only`, `fed-cmp`), TIES' trimming and the
//! robust rules read individual updates, SCAFFOLD's control variates and
//! FedNova's step normalisation are client-reported quantities that would
//! need their own clipping and noise.

use super::config::{epsilon_after, sampling_rate, DpMode, PrivacyConfig};
use crate::compose::{Aggregator, Composed, Plain, ServerOptimizer};
use crate::config::StrategyConfig;
use crate::fedopt::adaptive;
use crate::fedprox::Proximal;
use crate::round::RoundInput;
use crate::server_opt::{AdaptiveRule, HeavyBall, Sgd};
use crate::validate::positive;
use crate::{ops, Result, Strategy, StrategyError, StrategyState};
use fedcmp_core::metrics::names;
use fedcmp_core::RoundMetrics;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Adaptive clipping, resolved for the federation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClip {
    pub target_quantile: f64,
    pub learning_rate: f64,
    /// `sigma_b`.
    pub count_stddev: f64,
    /// `z_Delta`: the update's noise multiplier.
    pub update_noise_multiplier: f64,
}

/// Resolved privacy: the noise multiplier known, and the budget if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CentralDp {
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    pub delta: f64,
    /// Rounds whose epsilon would exceed this are refused.
    pub budget: Option<f64>,
    /// Adaptive clipping (`clip_norm` is then the initial `C`).
    pub adaptive: Option<AdaptiveClip>,
}

impl PrivacyConfig {
    /// The noise multiplier for `rounds` rounds of `m` of `n` clients: the
    /// configured one, or the smallest that keeps `target-epsilon` (which
    /// needs the rounds).
    pub fn resolve(&self, m: usize, n: usize, rounds: Option<u64>) -> Result<CentralDp> {
        if self.mode != DpMode::Central {
            return Err(StrategyError::Config {
                field: "mode".to_string(),
                reason: "local DP is applied by the sites, not by a server-side wrapper"
                    .to_string(),
            });
        }
        let noise_multiplier = self.noise_multiplier_for(sampling_rate(m, n), rounds, 1.0)?;
        let adaptive = match self.adaptive {
            None => None,
            Some(a) => {
                let count_stddev = a.count_stddev.unwrap_or(m as f64 / 20.0);
                if noise_multiplier >= 2.0 * count_stddev {
                    return Err(StrategyError::Config {
                        field: "count-stddev".to_string(),
                        reason: format!(
                            "adaptive clipping needs the noise multiplier {noise_multiplier:.4} \
                             below 2 x count-stddev = {:.4}; raise count-stddev",
                            2.0 * count_stddev
                        ),
                    });
                }
                Some(AdaptiveClip {
                    target_quantile: a.target_quantile,
                    learning_rate: a.learning_rate,
                    count_stddev,
                    update_noise_multiplier: (noise_multiplier.powi(-2)
                        - (2.0 * count_stddev).powi(-2))
                    .powf(-0.5),
                })
            }
        };
        Ok(CentralDp {
            clip_norm: self.clip_norm,
            noise_multiplier,
            delta: self.delta,
            budget: self.target_epsilon,
            adaptive,
        })
    }
}

impl CentralDp {
    /// Epsilon after `rounds` rounds with `m` of `n` clients sampled per
    /// round.
    pub fn epsilon(&self, m: usize, n: usize, rounds: u64) -> Result<f64> {
        epsilon_after(
            sampling_rate(m, n),
            self.noise_multiplier,
            self.delta,
            rounds,
        )
    }
}

/// The federation a private strategy serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Federation {
    /// `N`: the clients in the federation.
    pub clients: usize,
    /// `m`: the clients sampled per round (the fixed denominator).
    pub per_round: usize,
}

/// The clipped, noised, unweighted mean of DP-FedAvg.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisedMean {
    pub config: CentralDp,
    pub federation: Federation,
    /// Rounds noised so far.
    rounds: u64,
    /// The noise's secret seed (drawn at the first round).
    secret: Option<u64>,
    /// The current clipping norm (adaptive clipping; `clip_norm` before the
    /// first round).
    clip: f64,
}

const ROUNDS_KEY: &str = "dp_rounds";
const CLIP_KEY: &str = "dp_clip_norm";
const SECRET_HI_KEY: &str = "dp_secret_hi";
const SECRET_LO_KEY: &str = "dp_secret_lo";

impl NoisedMean {
    pub fn new(config: CentralDp, federation: Federation) -> Self {
        Self {
            config,
            federation,
            rounds: 0,
            secret: None,
            clip: config.clip_norm,
        }
    }

    /// With a given secret instead of one from the operating system
    /// (tests that need the same noise twice).
    pub fn with_secret(mut self, secret: u64) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Rounds noised so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }
}

impl Aggregator for NoisedMean {
    type Output = Vec<f64>;

    fn combine(&mut self, input: &RoundInput<'_>, metrics: &mut RoundMetrics) -> Result<Vec<f64>> {
        let rounds = self.rounds + 1;
        let epsilon =
            self.config
                .epsilon(self.federation.per_round, self.federation.clients, rounds)?;
        if let Some(budget) = self.config.budget {
            if epsilon > budget * (1.0 + 1e-9) {
                return Err(StrategyError::RoundRefused {
                    round: input.round,
                    reason: format!(
                        "the privacy budget is spent: this round would bring epsilon to {epsilon:.4} \
                         (target {budget}) at delta {}",
                        self.config.delta
                    ),
                });
            }
        }
        let c = self.clip;
        let mut sum = vec![0.0; input.global_flat.len()];
        let mut clipped = 0usize;
        for delta in &input.deltas {
            let norm = ops::norm(delta);
            let factor = if norm > c { c / norm } else { 1.0 };
            clipped += usize::from(norm > c);
            ops::axpy(factor, delta, &mut sum)?;
        }
        let z = self
            .config
            .adaptive
            .map_or(self.config.noise_multiplier, |a| a.update_noise_multiplier);
        let std = z * c;
        let secret = *self.secret.get_or_insert_with(|| rand::rng().random());
        let mut rng =
            ChaCha8Rng::seed_from_u64(secret ^ input.round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for x in &mut sum {
            *x += std * ops::standard_normal(&mut rng);
        }
        let m = self.federation.per_round.max(1) as f64;
        ops::scale(1.0 / m, &mut sum);
        metrics.set(names::DP_CLIP_NORM, c);
        if let Some(a) = self.config.adaptive {
            let unclipped = (input.len() - clipped) as f64 - 0.5 * input.len() as f64;
            let b = (unclipped + a.count_stddev * ops::standard_normal(&mut rng)) / m + 0.5;
            self.clip = c * (-a.learning_rate * (b - a.target_quantile)).exp();
        }
        self.rounds = rounds;
        metrics.set(names::DP_EPSILON, epsilon);
        metrics.set(names::DP_CLIPPED, clipped as f64);
        metrics.set(names::DP_NOISE_STD, std / m);
        Ok(sum)
    }

    fn save(&self, state: &mut StrategyState) {
        state
            .scalars
            .insert(ROUNDS_KEY.to_string(), self.rounds as f64);
        if self.config.adaptive.is_some() {
            state.scalars.insert(CLIP_KEY.to_string(), self.clip);
        }
        if let Some(secret) = self.secret {
            // Two 32-bit halves: exact in f64 scalars.
            state
                .scalars
                .insert(SECRET_HI_KEY.to_string(), (secret >> 32) as f64);
            state
                .scalars
                .insert(SECRET_LO_KEY.to_string(), (secret & 0xffff_ffff) as f64);
        }
    }

    fn load(&mut self, state: &mut StrategyState) -> Result<()> {
        self.rounds = match state.take_scalar(ROUNDS_KEY) {
            Some(r) if r >= 0.0 && r.fract() == 0.0 => r as u64,
            None => 0,
            Some(r) => {
                return Err(StrategyError::State {
                    reason: format!("`{ROUNDS_KEY}` must be a count, got {r}"),
                })
            }
        };
        self.clip = match (self.config.adaptive, state.take_scalar(CLIP_KEY)) {
            (Some(_), Some(c)) if c.is_finite() && c > 0.0 => c,
            (Some(_), None) if self.rounds == 0 => self.config.clip_norm,
            (Some(_), other) => {
                return Err(StrategyError::State {
                    reason: format!(
                        "adaptive clipping's state needs `{CLIP_KEY}` > 0 after its first round, got {other:?}"
                    ),
                })
            }
            (None, _) => self.config.clip_norm,
        };
        let half = |key: &str, v: f64| -> Result<u64> {
            if (0.0..=f64::from(u32::MAX)).contains(&v) && v.fract() == 0.0 {
                Ok(v as u64)
            } else {
                Err(StrategyError::State {
                    reason: format!("`{key}` must be a 32-bit half of the noise's seed, got {v}"),
                })
            }
        };
        self.secret = match (state.take_scalar(SECRET_HI_KEY), state.take_scalar(SECRET_LO_KEY)) {
            (Some(hi), Some(lo)) => Some(half(SECRET_HI_KEY, hi)? << 32 | half(SECRET_LO_KEY, lo)?),
            (None, None) if self.rounds == 0 => None,
            _ => {
                return Err(StrategyError::State {
                    reason: format!(
                        "a private run's state needs `{SECRET_HI_KEY}` and `{SECRET_LO_KEY}` after its first round"
                    ),
                })
            }
        };
        Ok(())
    }
}

fn composed<P, O>(
    name: &'static str,
    protocol: P,
    mean: NoisedMean,
    optimizer: O,
) -> Box<dyn Strategy>
where
    P: crate::compose::ClientProtocol,
    O: ServerOptimizer<Vec<f64>>,
{
    Box::new(Composed::new(name, protocol, mean, optimizer))
}

/// `base` under DP-FedAvg: its client protocol and server step around the
/// clipped, noised mean; refuses strategies that do not aggregate a sum.
pub fn private(
    base: &StrategyConfig,
    config: &CentralDp,
    federation: Federation,
) -> Result<Box<dyn Strategy>> {
    private_with(base, NoisedMean::new(*config, federation))
}

/// [`private`] around a given mean (e.g. one with a fixed secret).
pub fn private_with(base: &StrategyConfig, mean: NoisedMean) -> Result<Box<dyn Strategy>> {
    let (config, federation) = (mean.config, mean.federation);
    positive("clip-norm", config.clip_norm)?;
    positive("noise-multiplier", config.noise_multiplier)?;
    base.validate(federation.clients)?;
    if federation.per_round == 0 || federation.per_round > federation.clients {
        return Err(StrategyError::Config {
            field: "privacy".to_string(),
            reason: format!(
                "needs 1 to {} clients per round, got {}",
                federation.clients, federation.per_round
            ),
        });
    }
    let name = base.name();
    Ok(match base {
        StrategyConfig::FedAvg(c) => composed(name, Plain, mean, Sgd::new(c.server_lr)),
        StrategyConfig::FedProx(c) => {
            composed(name, Proximal { mu: c.mu }, mean, Sgd::new(c.server_lr))
        }
        StrategyConfig::FedAvgM(c) => composed(name, Plain, mean, c.optimizer()),
        StrategyConfig::OpmOnly(c) => composed(
            name,
            Plain,
            mean,
            HeavyBall::with_form(c.server_lr, c.beta, c.nesterov, c.momentum_form),
        ),
        StrategyConfig::FedAdagrad(c) => composed(name, Plain, mean, c.optimizer()),
        StrategyConfig::FedAdam(c) => composed(name, Plain, mean, adaptive(AdaptiveRule::Adam, c)),
        StrategyConfig::FedYogi(c) => composed(name, Plain, mean, adaptive(AdaptiveRule::Yogi, c)),
        other => {
            let why = match other {
                StrategyConfig::CraOnly(_) | StrategyConfig::FedCmp(_) => {
                    "CRA's weights and basis are read from individual updates, not a clipped sum \
                     (opm-only keeps Fed-CMP's momentum under privacy)"
                }
                StrategyConfig::Scaffold(_) => {
                    "SCAFFOLD's control variates are client updates too and would need their own \
                     clipping and noise"
                }
                StrategyConfig::FedNova(_) => {
                    "FedNova normalises each update by its client's reported steps, which the \
                     clipping bound does not cover"
                }
                _ => "its aggregate reads individual updates (not a clipped sum)",
            };
            return Err(StrategyError::Config {
                field: "privacy".to_string(),
                reason: format!("does not compose with `{}`: {why}", other.name()),
            });
        }
    })
}
